"""Multi-digit multiplication with a calculator: a problem the tiny model cannot do in its head.

A 3-5 digit number times a 3-5 digit number has a 5-10 digit product; getting every digit right without
working is far beyond a model of a few million parameters, so accuracy without the tool is near zero and
with it measures whether the model learned to hand the problem over and copy the result back.

A training conversation, in OpenAI's convention:

    user       What is 48213 * 739?
    assistant  tool_calls: calculator({"expression": "48213 * 739"})     (content "")
    tool       35629407                                                  (tool_call_id of the call)
    assistant  Answer: 35629407

The tool message holds what `infer.tools.calculate` returns for the expression (tests check it); the
task layer sits below `infer`, so the product is computed here with Python's exact integers, which is
what the calculator does for an integer product. The split hashes the unordered pair of operands, so
"a * b" and "b * a" are never on opposite sides.
"""

from __future__ import annotations

import json
import random

from . import Example
from ._arithmetic import extract  # noqa: F401  ("Answer: N", part of the task interface)
from ._common import check_args, collect, rng_for

NAME = "tool_multiply"
DESCRIPTION = "3-5 digit by 3-5 digit multiplication, solved by calling the calculator tool (opt-in)"
OPT_IN = True
TOOL_SPEC = "calculator"   # what the agent loop's tools_from_spec builds for this task
MIN_DIGITS, MAX_DIGITS = 3, 5
_PROMPTS = ["What is {a} * {b}?", "What is {a} times {b}?", "Compute {a} × {b}.", "Multiply {a} by {b}."]


def calculator_schema() -> dict:
    # the same schema the calculator tool publishes (infer.tools.CALCULATOR_SCHEMA; a test holds them equal),
    # written out here because the task layer may not import infer
    return {"type": "function", "function": {
        "name": "calculator",
        "description": "Exact arithmetic on integers and decimals: + - * / // % ** and parentheses. "
                       "Returns the exact result (an integer, a decimal, or a fraction with its rounded value).",
        "parameters": {"type": "object",
                       "properties": {"expression": {
                           "type": "string",
                           "description": "an arithmetic expression, e.g. (123456789 * 987654321) - 12 / 4"}},
                       "required": ["expression"], "additionalProperties": False}}}


def _operand(rng: random.Random) -> int:
    digits = rng.randint(MIN_DIGITS, MAX_DIGITS)
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def tool_call(call_id: str, name: str, arguments: dict) -> dict:
    """One entry of an assistant message's `tool_calls`: arguments as a JSON string, as OpenAI sends them."""
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def generate(split: str, n: int, seed: int = 0) -> list[Example]:
    check_args(split, n)
    tools = [calculator_schema()]

    def draw(rng: random.Random) -> Example:
        a, b = _operand(rng), _operand(rng)
        question = rng.choice(_PROMPTS).format(a=a, b=b)
        expression = f"{a} * {b}"
        product = str(a * b)
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": "", "tool_calls": [tool_call("call_1", "calculator",
                                                                          {"expression": expression})]},
            {"role": "tool", "tool_call_id": "call_1", "content": product},
            {"role": "assistant", "content": f"Answer: {product}"},
        ]
        return Example(NAME, messages, product, {"a": a, "b": b, "expression": expression,
                                                 "pair": f"{min(a, b)}*{max(a, b)}"}, tools)

    return collect(split, n, rng_for(NAME, seed), draw, key=lambda ex: ex.meta["pair"])


def check(example: Example, completion: str) -> float:
    return 1.0 if extract(completion) == example.answer else 0.0
