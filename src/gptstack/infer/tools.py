"""Tools a model can call: the exact calculator, with its OpenAI function schema.

The calculator has its own tokenizer and recursive-descent parser: it reads numbers, + - * / // % **,
unary signs and parentheses, and nothing else, so a call can never run code (no `eval`, no `ast`).
Arithmetic is exact (Python big integers and `fractions.Fraction`), with Python's precedence and rules:

    expression := term (("+" | "-") term)*
    term       := unary (("*" | "/" | "//" | "%") unary)*
    unary      := ("+" | "-") unary | power
    power      := atom ("**" unary)?          right-associative: 2**3**2 = 2**9; -2**2 = -(2**2)
    atom       := NUMBER | "(" expression ")"

NUMBER is an integer or a decimal (`12`, `3.25`, `.5`, `1e-3`: read exactly, 0.1 is 1/10). `^` is read as
`**`, and `×`, `·`, `÷`, `−` as `*`, `*`, `/`, `-`. `//` and `%` floor as in Python (the remainder takes
the divisor's sign). An exponent must be an integer, or a fraction whose root is exact (`8 ** (1/3)` = 2);
an irrational result (`2 ** 0.5`) is an error rather than a rounded number, since the tool is exact.

Results are shown as an integer when integral (`121932631112635269`), as an exact decimal when the
decimal is finite and at most 30 places long (`0.125`), and otherwise as the exact fraction and a 12-digit
rounded decimal (`1/3 ≈ 0.333333333333`). Every failure is a one-line ToolError: bad syntax (with its
1-based position), division by zero, a result over 1000 digits, an over-long or over-nested expression.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, localcontext
from fractions import Fraction

from ..errors import ToolError

CALCULATOR_SCHEMA = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Exact arithmetic on integers and decimals: + - * / // % ** and parentheses. "
                       "Returns the exact result (an integer, a decimal, or a fraction with its rounded value).",
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {"type": "string",
                               "description": "an arithmetic expression, e.g. (123456789 * 987654321) - 12 / 4"},
            },
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
}

MAX_LENGTH = 2000        # characters in one expression
MAX_DEPTH = 100          # nested parentheses and unary signs (the parser recurses on both)
MAX_DIGITS = 1000        # digits of any value, numerator or denominator, along the way
MAX_DECIMALS = 30        # places of an exact decimal before the fraction form is shown instead
_LIMIT = 10 ** MAX_DIGITS
_ALIASES = {"^": "**", "×": "*", "·": "*", "÷": "/", "−": "-"}
_TOKEN = re.compile(r"(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<op>\*\*|//|[-+*/%()^×·÷−]))")


def _fail(message: str, expression: str, pos: int | None = None) -> ToolError:
    shown = expression if len(expression) <= 80 else expression[:77] + "..."
    where = f" at position {pos}" if pos is not None else ""
    return ToolError(f"calculator: {message}{where} in {shown!r}")


def _tokens(expression: str) -> list[tuple[str, object, int]]:
    """(kind, value, 1-based position) for each token, then ("end", None, position)."""
    out, i = [], 0
    while True:
        while i < len(expression) and expression[i].isspace():
            i += 1
        if i == len(expression):
            break
        m = _TOKEN.match(expression, i)
        if m is None:
            raise _fail(f"unexpected {expression[i]!r} (only numbers, + - * / // % **, parentheses)", expression, i + 1)
        pos = i + 1
        if m.group("num"):
            text = m.group("num")
            mantissa, _, exp = text.lower().partition("e")
            if exp and abs(int(exp)) > MAX_DIGITS:
                raise _fail(f"number {text} is too large (over {MAX_DIGITS} digits)", expression, pos)
            value = Fraction(mantissa) * Fraction(10) ** int(exp or 0)
            if value.numerator >= _LIMIT or value.denominator >= _LIMIT:
                raise _fail(f"number {text[:20]}... has over {MAX_DIGITS} digits", expression, pos)
            out.append(("num", value, pos))
        else:
            op = m.group("op")
            out.append(("op", _ALIASES.get(op, op), pos))
        i = m.end()
    out.append(("end", None, len(expression) + 1))
    return out


class _Parser:
    def __init__(self, expression: str):
        self.expression = expression
        self.toks = _tokens(expression)
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str, object, int]:
        return self.toks[self.i]

    def take(self):
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def error(self, message: str, pos: int) -> ToolError:
        return _fail(message, self.expression, pos)

    def parse(self) -> Fraction:
        value = self.expression_()
        kind, tok, pos = self.peek()
        if kind != "end":
            raise self.error("expected an operator" if kind == "num" or tok == "(" else f"unexpected {tok!r}", pos)
        return value

    def expression_(self) -> Fraction:
        value = self.term()
        while self.peek()[1] in ("+", "-"):
            _, op, pos = self.take()
            rhs = self.term()
            value = self.check(value + rhs if op == "+" else value - rhs, pos)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek()[1] in ("*", "/", "//", "%"):
            _, op, pos = self.take()
            rhs = self.unary()
            if op != "*" and rhs == 0:
                raise self.error("division by zero" if op != "%" else "modulo by zero", pos)
            if op == "*":
                value = value * rhs
            elif op == "/":
                value = value / rhs
            elif op == "//":
                value = Fraction(value // rhs)
            else:
                value = value % rhs
            value = self.check(value, pos)
        return value

    def unary(self) -> Fraction:
        kind, tok, pos = self.peek()
        if tok in ("+", "-"):
            self.take()
            self.enter(pos)
            value = self.unary()
            self.depth -= 1
            return -value if tok == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek()[1] == "**":
            _, _, pos = self.take()
            return self.check(self.pow(base, self.unary(), pos), pos)
        return base

    def atom(self) -> Fraction:
        kind, tok, pos = self.take()
        if kind == "num":
            return tok
        if tok == "(":
            self.enter(pos)
            value = self.expression_()
            self.depth -= 1
            kind, close, cpos = self.take()
            if close != ")":
                if kind == "end":
                    raise self.error("'(' is never closed", pos)
                raise self.error("expected ')'", cpos)
            return value
        if kind == "end":
            raise self.error("expression ends where a number was expected", pos)
        raise self.error(f"expected a number, got {tok!r}", pos)

    def enter(self, pos: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"nested more than {MAX_DEPTH} deep", pos)

    def check(self, value: Fraction, pos: int) -> Fraction:
        if abs(value.numerator) >= _LIMIT or value.denominator >= _LIMIT:
            raise self.error(f"result too large (over {MAX_DIGITS} digits)", pos)
        return value

    def pow(self, base: Fraction, exp: Fraction, pos: int) -> Fraction:
        if base == 0 and exp < 0:
            raise self.error("division by zero (0 to a negative power)", pos)
        if base in (0, 1) or exp == 0:
            return Fraction(1) if exp == 0 else base
        if base == -1 and exp.denominator == 1:
            return Fraction(-1 if exp.numerator % 2 else 1)
        p, q = exp.numerator, exp.denominator
        if q > 1:   # a rational exponent: exact only when the q-th root of base is rational
            if base < 0 and q % 2 == 0:
                raise self.error(f"{_operand(base)} ** {_operand(exp)} is not a real number", pos)
            if q > MAX_DIGITS * 4:
                raise self.error(f"{_operand(base)} ** {_operand(exp)} is irrational (the calculator is exact)", pos)
            sign = -1 if base < 0 else 1
            num, den = _iroot(abs(base.numerator), q), _iroot(base.denominator, q)
            if num ** q != abs(base.numerator) or den ** q != base.denominator:
                raise self.error(f"{_operand(base)} ** {_operand(exp)} is irrational (the calculator is exact)", pos)
            base = Fraction(sign * num, den)
        bits = max(base.numerator.bit_length(), base.denominator.bit_length()) - 1
        if bits * abs(p) > MAX_DIGITS * 3.33 + 64:   # checked before computing: 2 ** 10**9 would hang
            raise self.error(f"result too large (over {MAX_DIGITS} digits)", pos)
        return base ** p


def _iroot(n: int, k: int) -> int:
    """floor(n ** (1/k)) for n >= 0, exactly, by Newton's method on integers."""
    if n < 2:
        return n
    x = 1 << -(-n.bit_length() // k)   # an upper bound
    while True:
        y = ((k - 1) * x + n // x ** (k - 1)) // k
        if y >= x:
            return x
        x = y


def _operand(value: Fraction) -> str:
    text = _show(value).split(" ≈ ")[0]
    return f"({text})" if value < 0 or "/" in text else text


def _decimal_text(d: Decimal) -> str:
    text = format(d, "f") if -12 <= d.adjusted() < 30 else str(d)
    return text.rstrip("0").rstrip(".") if "." in text and "E" not in text else text


def _show(value: Fraction) -> str:
    """The exact text of a value: integer, finite decimal (<= MAX_DECIMALS places), or fraction ≈ decimal."""
    n, d = value.numerator, value.denominator
    if d == 1:
        return str(n)
    twos = fives = 0
    rest = d
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    places = max(twos, fives)
    if rest == 1 and places <= MAX_DECIMALS:
        scaled = abs(n) * 10 ** places // d
        whole, frac = divmod(scaled, 10 ** places)
        return ("-" if n < 0 else "") + f"{whole}.{frac:0{places}d}"
    with localcontext() as ctx:
        ctx.prec = 12
        approx = Decimal(n) / Decimal(d)
    return f"{n}/{d} ≈ {_decimal_text(approx)}"


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; ToolError (one line) when it is not one or cannot be computed."""
    if not isinstance(expression, str):
        raise ToolError(f"calculator: the expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_LENGTH:
        raise ToolError(f"calculator: expression is {len(expression)} characters long (at most {MAX_LENGTH})")
    if not expression.strip():
        raise ToolError("calculator: empty expression (give arithmetic such as 12 * (3 + 4))")
    return _Parser(expression).parse()


def calculate(expression: str) -> str:
    """The exact result of `expression` as text (see the module docstring for the forms it takes)."""
    return _show(evaluate(expression))


def calculator_call(arguments: str | dict) -> str:
    """Run a calculator tool call from its arguments: the JSON string an assistant's tool call carries
    (`{"expression": "..."}`) or the dict parsed from it."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ToolError(f"calculator: arguments are not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(arguments, dict) or set(arguments) != {"expression"}:
        keys = sorted(arguments) if isinstance(arguments, dict) else type(arguments).__name__
        raise ToolError(f"calculator: arguments must be an object with just 'expression', got {keys}")
    return calculate(arguments["expression"])
