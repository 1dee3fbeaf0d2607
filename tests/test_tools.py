"""The exact calculator: big integers, Python's precedence and floor rules, exact decimals and fractions, and
a one-line ToolError for anything that is not arithmetic or cannot be computed."""

import json
import random
import time
from fractions import Fraction

import pytest

from gptstack.errors import GptstackError, ToolError
from gptstack.infer.tools import CALCULATOR_SCHEMA, MAX_DIGITS, calculate, calculator_call, evaluate

EXACT = [
    ("123456789*987654321", "121932631112635269"),
    ("99999999999999999999 * 99999999999999999999", "9999999999999999999800000000000000000001"),
    ("2**100", "1267650600228229401496703205376"),
    ("12345678901234567890123 - 12345678901234567890124", "-1"),
    ("1 + 2 * 3", "7"),
    ("(1 + 2) * 3", "9"),
    ("10 - 4 - 3", "3"),            # left-associative
    ("100 / 10 / 5", "2"),
    ("2 ** 3 ** 2", "512"),         # right-associative
    ("(2 ** 3) ** 2", "64"),
    ("-2 ** 2", "-4"),              # unary minus binds looser than **, as in Python
    ("(-2) ** 2", "4"),
    ("2 ** -2", "0.25"),
    ("--3", "3"),
    ("-(-(4))", "4"),
    ("+5 - -5", "10"),
    ("7 // 2", "3"),
    ("-7 // 2", "-4"),              # floor, as Python
    ("7 % 3", "1"),
    ("-7 % 3", "2"),                # the remainder takes the divisor's sign
    ("7 % -3", "-2"),
    ("7.5 // 2", "3"),
    ("7.5 % 2", "1.5"),
    ("0.1 + 0.2", "0.3"),           # exact decimals, not floats
    ("1.10 * 3", "3.3"),
    ("10 / 4", "2.5"),
    ("1 / 8", "0.125"),
    ("-1 / 8", "-0.125"),
    ("6 / 3", "2"),
    ("1 / 7 * 7", "1"),
    ("1 / 3", "1/3 ≈ 0.333333333333"),
    ("-2 / 3", "-2/3 ≈ -0.666666666667"),
    ("22 / 7", "22/7 ≈ 3.14285714286"),
    ("1e3 + 2.5E-1", "1000.25"),
    (".5 * 4", "2"),
    ("007 + 1", "8"),
    ("2 ^ 10", "1024"),             # ^ reads as **
    ("3 × 4 ÷ 2 − 1", "5"),
    ("8 ** (1/3)", "2"),            # exact roots are allowed
    ("(-8) ** (1/3)", "-2"),
    ("(4/9) ** 0.5", "2/3 ≈ 0.666666666667"),
    ("0 ** 0", "1"),
    ("1 ** 100000000000", "1"),
    ("(-1) ** 100000000001", "-1"),
    (" \t( 1 +\n 2 ) ", "3"),
    ("1 / 2 ** 20", "0.00000095367431640625"),            # exact decimals up to 30 places,
    ("1 / 2 ** 40", "1/1099511627776 ≈ 9.09494701773E-13"),  # then the fraction
    ("1 / 2 ** 200", "1/1606938044258990275541962092341162602522202993782792835301376 ≈ 6.22301527786E-61"),
]


@pytest.mark.parametrize("expression,expected", EXACT)
def test_exact_results(expression, expected):
    assert calculate(expression) == expected


def test_random_big_integer_arithmetic_matches_python():
    rng = random.Random(0)
    for _ in range(200):
        a, b, c = (rng.randrange(-10 ** 30, 10 ** 30) for _ in range(3))
        assert calculate(f"{a} * {b} + {c}".replace("+ -", "- ")) == str(a * b + c)
        if c:
            assert evaluate(f"({a}) // ({c})") == a // c and evaluate(f"({a}) % ({c})") == a % c
            assert evaluate(f"({a}) / ({c})") == Fraction(a, c)


def test_largest_allowed_result_and_limits_are_fast():
    assert len(calculate("2 ** 3321")) == 1000 and calculate("2 ** 3321") == str(2 ** 3321)
    t0 = time.perf_counter()
    for expression in ("2 ** 10 ** 9", "10 ** 10 ** 10", "(2 ** 3000) ** 3000", "1.5 ** 99999999"):
        with pytest.raises(ToolError, match=f"result too large \\(over {MAX_DIGITS} digits\\)"):
            calculate(expression)
    assert time.perf_counter() - t0 < 1.0   # refused before computing, not after


ERRORS = [
    ("1 / 0", "calculator: division by zero at position 3 in '1 / 0'"),
    ("5 // (3 - 3)", "calculator: division by zero at position 3 in '5 // (3 - 3)'"),
    ("5 % 0", "calculator: modulo by zero at position 3 in '5 % 0'"),
    ("0 ** -1", "calculator: division by zero (0 to a negative power) at position 3 in '0 ** -1'"),
    ("2 ** 0.5", "calculator: 2 ** 0.5 is irrational (the calculator is exact) at position 3 in '2 ** 0.5'"),
    ("2 ** (1/3)", "calculator: 2 ** (1/3) is irrational (the calculator is exact) at position 3 in '2 ** (1/3)'"),
    ("(-4) ** 0.5", "calculator: (-4) ** 0.5 is not a real number at position 6 in '(-4) ** 0.5'"),
    ("2 ** 4000", "calculator: result too large (over 1000 digits) at position 3 in '2 ** 4000'"),
    ("1e5000", "calculator: number 1e5000 is too large (over 1000 digits) at position 1 in '1e5000'"),
    ("1 +", "calculator: expression ends where a number was expected at position 4 in '1 +'"),
    ("(1 + 2", "calculator: '(' is never closed at position 1 in '(1 + 2'"),
    ("1 + 2)", "calculator: unexpected ')' at position 6 in '1 + 2)'"),
    ("2 (3)", "calculator: expected an operator at position 3 in '2 (3)'"),
    ("1 2", "calculator: expected an operator at position 3 in '1 2'"),
    ("* 3", "calculator: expected a number, got '*' at position 1 in '* 3'"),
    ("3 ** * 2", "calculator: expected a number, got '*' at position 6 in '3 ** * 2'"),
    ("()", "calculator: expected a number, got ')' at position 2 in '()'"),
    ("2 + x", "calculator: unexpected 'x' (only numbers, + - * / // % **, parentheses) at position 5 in '2 + x'"),
    ("1,000 + 1", "calculator: unexpected ',' (only numbers, + - * / // % **, parentheses) at position 2 in "
                  "'1,000 + 1'"),
    ("", "calculator: empty expression (give arithmetic such as 12 * (3 + 4))"),
    ("   ", "calculator: empty expression (give arithmetic such as 12 * (3 + 4))"),
]


@pytest.mark.parametrize("expression,message", ERRORS)
def test_errors_are_one_line_with_the_position(expression, message):
    with pytest.raises(ToolError) as e:
        calculate(expression)
    assert str(e.value) == message and "\n" not in str(e.value)
    assert isinstance(e.value, GptstackError)


@pytest.mark.parametrize("code", ["__import__('os')", "__import__('os').system('echo hi')", "open('/etc/passwd')",
                                  "(lambda: 1)()", "[1, 2]", "'a' * 3", "1 if 1 else 2", "2 .real", "True + 1",
                                  "exec('1')", "1; 2", "1 == 1", "~1", "1 << 3", "1e", "0x10"])
def test_code_is_a_syntax_error_never_run(code):
    with pytest.raises(ToolError, match=r"^calculator: (unexpected|expected an operator).* at position \d+ in "):
        calculate(code)


def test_nesting_and_length_limits():
    assert calculate("(" * 100 + "1" + ")" * 100) == "1"
    assert calculate("-" * 100 + "1") == "1"
    with pytest.raises(ToolError, match="nested more than 100 deep at position 101"):
        calculate("(" * 101 + "1" + ")" * 101)
    with pytest.raises(ToolError, match="nested more than 100 deep"):
        calculate("-" * 150 + "1")
    with pytest.raises(ToolError, match=r"^calculator: expression is 2001 characters long \(at most 2000\)$"):
        calculate("1" + "+1" * 1000)
    with pytest.raises(ToolError, match="over 1000 digits at position 1 in '9999"):
        calculate("9" * 1001)
    with pytest.raises(ToolError, match="must be a string, got int"):
        calculate(12)


def test_schema_and_tool_call_arguments():
    fn = CALCULATOR_SCHEMA["function"]
    assert CALCULATOR_SCHEMA["type"] == "function" and fn["name"] == "calculator"
    assert fn["parameters"]["required"] == ["expression"]
    assert fn["parameters"]["properties"]["expression"]["type"] == "string"
    json.dumps(CALCULATOR_SCHEMA)   # serialisable, as a request's `tools` list needs
    assert calculator_call('{"expression": "123456789 * 987654321"}') == "121932631112635269"
    assert calculator_call({"expression": "1/4"}) == "0.25"
    with pytest.raises(ToolError, match="not valid JSON"):
        calculator_call('{"expression": ')
    with pytest.raises(ToolError, match=r"just 'expression', got \['expr'\]"):
        calculator_call('{"expr": "1"}')
    with pytest.raises(ToolError, match="got list"):
        calculator_call("[1]")
