"""The arithmetic_cot problems (same seed -> same test problems) answered with just 'Answer: N'."""

from __future__ import annotations

from . import _arithmetic
from ._arithmetic import check, extract  # noqa: F401  (part of the task interface)

NAME = "arithmetic_direct"
DESCRIPTION = "2-3 digit addition/subtraction answered directly with 'Answer: N'"


def generate(split: str, n: int, seed: int = 0):
    return _arithmetic.generate(NAME, split, n, seed, cot=False)
