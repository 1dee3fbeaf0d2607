"""The problem generator shared by `arithmetic_cot` and `arithmetic_direct`.

Both tasks draw the same problems from the same seeded stream and split them by the same key (the bare
problem "47 + 385"), so given a seed they have identical test problems and CoT can be compared with direct
answers on equal terms. Only the prompt suffix and the reply format differ.
"""

from __future__ import annotations

import random
import re

from . import Example
from ._common import answer_line, check_args, collect, rng_for


def draw_problem(rng: random.Random) -> tuple[int, str, int]:
    # two-digit operands: multi-digit carrying and borrowing, within reach of the tiny CPU preset
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a  # keep results non-negative: a tiny model has enough to learn without signs
    return a, op, b


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def working(a: int, op: str, b: int) -> str:
    """Column-wise working from the ones, one short regular clause per column:
    47 + 385 -> "7+5=12, write 2 carry 1. 4+8+1=13, write 3 carry 1. 0+3+1=4, write 4."
    385 - 47 -> "15-7=8, write 8 borrow 1. 8-4-1=3, write 3. 3-0=3, write 3."
    A final carry gets its own column ("0+0+1=1, write 1.") so every step has the same shape."""
    da, db = str(a)[::-1], str(b)[::-1]
    width = max(len(da), len(db))
    steps, carry = [], 0
    for i in range(width):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        extra = f"{op}1" if carry else ""
        if op == "+":
            s = x + y + carry
            carry = s // 10
            steps.append(f"{x}+{y}{extra}={s}, write {s % 10}" + (" carry 1." if carry else "."))
        else:
            r = x - y - carry
            borrow = r < 0
            top = x + 10 if borrow else x
            steps.append(f"{top}-{y}{extra}={r + 10 if borrow else r}, write {r % 10}" + (" borrow 1." if borrow else "."))
            carry = int(borrow)
    if op == "+" and carry:
        steps.append("0+0+1=1, write 1.")
    return " ".join(steps)


def generate(task: str, split: str, n: int, seed: int, cot: bool) -> list[Example]:
    check_args(split, n)
    suffix = " Work it out column by column." if cot else " Give just the answer."

    def draw(rng):
        a, op, b = draw_problem(rng)
        problem = f"{a} {op} {b}"
        result = str(solve(a, op, b))
        reply = (working(a, op, b) + "\n" if cot else "") + f"Answer: {result}"
        messages = [{"role": "user", "content": f"What is {problem}?{suffix}"},
                    {"role": "assistant", "content": reply}]
        return Example(task, messages, result, {"problem": problem, "a": a, "op": op, "b": b})

    # one stream for both tasks (not seeded by task name): same seed -> same problems
    return collect(split, n, rng_for("arithmetic", seed), draw, key=lambda ex: ex.meta["problem"])


def extract(completion: str) -> str | None:
    value = answer_line(completion)
    if value is None:
        return None
    m = re.match(r"-?\d[\d,]*", value)
    if not m:
        return None
    return str(int(m.group(0).replace(",", "")))  # "0432" and "432" are the same answer


def check(example: Example, completion: str) -> float:
    return 1.0 if extract(completion) == example.answer else 0.0
