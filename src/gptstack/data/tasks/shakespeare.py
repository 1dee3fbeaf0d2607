"""Which play is this line from? Grounded in the embedded corpus, over eight well-known plays.

A small closed set of answers keeps the task learnable by a tiny model (character names and vocabulary give
plays away), while the lines themselves are real text the model saw in pretraining.
"""

from __future__ import annotations

import functools
import re

from . import Example
from ._common import answer_line, check_args, collect, first_line, rng_for

NAME = "shakespeare"
DESCRIPTION = "name the play (one of eight) a spoken line comes from"

# corpus document name -> the title the assistant answers with
PLAYS = {
    "hamlet": "Hamlet",
    "macbeth": "Macbeth",
    "romeo_and_juliet": "Romeo and Juliet",
    "midsummer_nights_dream": "A Midsummer Night's Dream",
    "othello": "Othello",
    "lear": "King Lear",
    "julius_caesar": "Julius Caesar",
    "tempest": "The Tempest",
}
MIN_CHARS, MAX_CHARS = 30, 80


def normalize_title(text: str) -> str:
    """'A Midsummer Night's Dream', 'midsummer_nights_dream' and 'midsummer nights dream.' all agree."""
    text = text.lower().replace("\u2019", "'").replace("'", "")
    text = re.sub(r"[^a-z0-9]+", " ", text).strip()
    return re.sub(r"^(the|a)\s+", "", text)


_CANONICAL = {normalize_title(k): v for k, v in PLAYS.items()} | {normalize_title(v): v for v in PLAYS.values()}
_CANONICAL["lear"] = "King Lear"


def _spoken_lines(text: str) -> list[str]:
    """Lines of verse or prose after 'ACT I', without stage directions, headings or speaker names."""
    lines = text.split("\n")
    start = next((i for i, l in enumerate(lines) if re.match(r"\s*act\s+(i|1)\b", l, re.I)), 0)
    out = []
    for raw in lines[start:]:
        line = raw.strip()
        if not (MIN_CHARS <= len(line) <= MAX_CHARS):
            continue
        if "[" in line or "]" in line or re.match(r"(act|scene)\b", line, re.I) or line.upper() == line:
            continue
        out.append(line)
    return out


@functools.lru_cache(maxsize=1)
def lines_by_play() -> dict[str, tuple[str, ...]]:
    """Spoken lines of each play; a line found in more than one of the plays is dropped (it has no answer)."""
    from ..corpus import shakespeare_texts

    texts = shakespeare_texts()
    per_play = {doc: sorted(set(_spoken_lines(texts[doc]))) for doc in PLAYS}
    owners: dict[str, int] = {}
    for lines in per_play.values():
        for line in lines:
            owners[line] = owners.get(line, 0) + 1
    return {doc: tuple(l for l in lines if owners[l] == 1) for doc, lines in per_play.items()}


def _draw(rng) -> Example:
    pool = lines_by_play()
    doc = rng.choice(list(PLAYS))  # play first: balanced classes, whatever the plays' lengths
    line = rng.choice(pool[doc])
    title = PLAYS[doc]
    messages = [{"role": "user", "content": f"Which play is this line from? {line}"},
                {"role": "assistant", "content": title}]
    return Example(NAME, messages, title, {"line": line, "play": doc})


def generate(split: str, n: int, seed: int = 0) -> list[Example]:
    check_args(split, n)
    return collect(split, n, rng_for(NAME, seed), _draw, key=lambda ex: ex.meta["line"])


def extract(completion: str) -> str | None:
    """The canonical title when the reply names one of the plays, else the reply's first line."""
    value = answer_line(completion) or first_line(completion)
    if value is None:
        return None
    value = value.strip().strip("\"'").rstrip(".!")
    return _CANONICAL.get(normalize_title(value), value)


def check(example: Example, completion: str) -> float:
    got = extract(completion)
    return 1.0 if got is not None and normalize_title(got) == normalize_title(example.answer) else 0.0
