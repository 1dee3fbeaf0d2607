"""Helpers shared by the task modules: the split rule, seeded sampling, and tolerant answer parsing.

The split rule is the heart of the suite. An example's split is a pure function of its *content* (a hash of a
key such as the question text), never of the RNG stream or of n, so no question can ever be in both splits
whatever seeds or sizes callers ask for.
"""

from __future__ import annotations

import hashlib
import numbers
import random
import re
from typing import Callable

from ...errors import DataError

SPLITS = ("train", "test")

# Decoded completions may run on past the end of the reply (no stop token, or specials decoded as text).
_SPECIAL_CUT = re.compile(r"<\|(?:assistant_end|user_start|user_end|system_start|system_end|bos|assistant_start)\|>")
_ANSWER_LINE = re.compile(r"answer\s*:\s*(.*)", re.IGNORECASE)


def split_of(key: str, test_every: int = 10) -> str:
    """'test' for about 1 in `test_every` keys, chosen by a stable hash (Python's hash() is salted per run)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h % test_every == 0 else "train"


def check_args(split: str, n: int) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}': use 'train' or 'test'")
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise DataError(f"number of examples must be a non-negative integer, got {n!r}")


def rng_for(name: str, seed: int) -> random.Random:
    # str seeds hash through sha512 in CPython, so the stream is the same on every run and platform.
    return random.Random(f"{name}:{seed}")


def collect(split: str, n: int, rng: random.Random, draw: Callable[[random.Random], object],
            key: Callable[[object], str], test_every: int = 10, assign: Callable[[object], str] | None = None,
            patience: int = 2000) -> list:
    """Draw candidates until n belong to `split`. The split of a candidate is `assign(ex)`, by default the
    hash rule on `key(ex)`. Examples are unique by `key` while the split still yields new ones; once
    `patience` draws in a row bring nothing new (a small, exhausted space), repeats are allowed so that any n
    can be served."""
    assign = assign or (lambda ex: split_of(key(ex), test_every))
    out, seen, misses = [], set(), 0
    while len(out) < n:
        ex = draw(rng)
        k = key(ex)
        if assign(ex) != split:
            misses += 1
        elif k not in seen:
            seen.add(k)
            out.append(ex)
            misses = 0
        elif misses >= patience:
            out.append(ex)  # the split is exhausted: serve repeats
        else:
            misses += 1
        if not seen and misses > 50 * patience:
            raise DataError(f"the {split} split of this task is empty: no drawn example belongs to it")
    return out


def clean_completion(completion: str) -> str:
    """The reply proper: text before any chat special token, stripped."""
    if not isinstance(completion, str):
        return ""
    m = _SPECIAL_CUT.search(completion)
    return (completion[:m.start()] if m else completion).strip()


def answer_line(completion: str) -> str | None:
    """What follows the first 'Answer:' (the model commits there; text after it may be rambling)."""
    m = _ANSWER_LINE.search(clean_completion(completion))
    if not m:
        return None
    value = m.group(1).strip()
    return value or None


def first_line(completion: str) -> str | None:
    for line in clean_completion(completion).splitlines():
        if line.strip():
            return line.strip()
    return None


def interleave(groups: list[list]) -> list:
    """Merge in proportion to the groups' sizes (round-robin when they are equal), so any prefix of a
    mixture holds every task in its share: a time-budgeted run that sees a third of the data sees a third
    of each task."""
    keyed = [((i + 0.5) / len(g), gi, item) for gi, g in enumerate(groups) for i, item in enumerate(g)]
    return [item for _, _, item in sorted(keyed, key=lambda k: (k[0], k[1]))]
