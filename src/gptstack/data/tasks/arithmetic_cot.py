"""2-3 digit addition and subtraction with short column-wise working, then 'Answer: N'."""

from __future__ import annotations

from . import _arithmetic
from ._arithmetic import check, extract  # noqa: F401  (part of the task interface)

NAME = "arithmetic_cot"
DESCRIPTION = "2-3 digit addition/subtraction, column-wise working then 'Answer: N'"


def generate(split: str, n: int, seed: int = 0):
    return _arithmetic.generate(NAME, split, n, seed, cot=True)
