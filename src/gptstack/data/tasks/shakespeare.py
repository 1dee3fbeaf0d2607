"""Which play is this passage from? Grounded in the embedded corpus, over eight well-known plays.

A passage is two consecutive speeches as the corpus prints them: the speaker's heading, then the first line
of the speech. A small closed set of answers and the speakers' names (each play has its own cast) keep the
task learnable by a tiny model, while the text itself is real text the model saw in pretraining. Train and
test passages are disjoint (split by the passage text); the casts are shared, as they would be for a reader
who has seen other scenes of the same plays.
"""

from __future__ import annotations

import functools
import re

from . import Example
from ._common import answer_line, check_args, collect, first_line, rng_for

NAME = "shakespeare"
DESCRIPTION = "name the play (one of eight) a two-speech passage comes from"

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
MIN_CHARS, MAX_CHARS = 12, 70


def normalize_title(text: str) -> str:
    """'A Midsummer Night's Dream', 'midsummer_nights_dream' and 'midsummer nights dream.' all agree."""
    text = text.lower().replace("\u2019", "'").replace("'", "")
    text = re.sub(r"[^a-z0-9]+", " ", text).strip()
    return re.sub(r"^(the|a)\s+", "", text)


_CANONICAL = {normalize_title(k): v for k, v in PLAYS.items()} | {normalize_title(v): v for v in PLAYS.values()}
_CANONICAL["lear"] = "King Lear"


def _is_heading(line: str) -> bool:
    """A speaker heading as the corpus prints it: 'Ber.', 'BOATSWAIN.', 'First Lord.', 'THESEUS'"""
    return ((line.endswith(".") or line.upper() == line) and 2 <= len(line) <= 30 and "[" not in line
            and not re.match(r"(act|scene)\b", line, re.I) and line[0].isupper())


def _speeches(text: str) -> list[tuple[str, str]]:
    """(speaker heading, first spoken line) of each speech after 'ACT I', skipping stage directions."""
    lines = text.split("\n")
    start = next((i for i, l in enumerate(lines) if re.match(r"\s*act\s+(i|1)\b", l, re.I)), 0)
    out = []
    for block in "\n".join(lines[start:]).split("\n\n"):
        rows = [r.strip() for r in block.strip().split("\n") if r.strip()]
        if len(rows) < 2 or not _is_heading(rows[0]):
            continue
        spoken = next((r for r in rows[1:] if "[" not in r and "]" not in r), None)
        if spoken and MIN_CHARS <= len(spoken) <= MAX_CHARS:
            out.append((rows[0], spoken))
        elif spoken and len(spoken) > MAX_CHARS:
            out.append((rows[0], spoken[:MAX_CHARS].rsplit(" ", 1)[0]))
    return out


@functools.lru_cache(maxsize=1)
def passages_by_play() -> dict[str, tuple[str, ...]]:
    """Two-speech passages of each play; a passage found in more than one of the plays is dropped."""
    from ..corpus import shakespeare_texts

    texts = shakespeare_texts()
    per_play = {}
    for doc in PLAYS:
        sp = _speeches(texts[doc])
        per_play[doc] = sorted({f"{a}\n{x}\n{b}\n{y}" for (a, x), (b, y) in zip(sp, sp[1:])})
    owners: dict[str, int] = {}
    for passages in per_play.values():
        for p in passages:
            owners[p] = owners.get(p, 0) + 1
    return {doc: tuple(p for p in passages if owners[p] == 1) for doc, passages in per_play.items()}


def _draw(rng) -> Example:
    pool = passages_by_play()
    doc = rng.choice(list(PLAYS))  # play first: balanced classes, whatever the plays' lengths
    passage = rng.choice(pool[doc])
    title = PLAYS[doc]
    messages = [{"role": "user", "content": f"Which play is this passage from?\n\n{passage}"},
                {"role": "assistant", "content": title}]
    return Example(NAME, messages, title, {"passage": passage, "play": doc})


def generate(split: str, n: int, seed: int = 0) -> list[Example]:
    check_args(split, n)
    return collect(split, n, rng_for(NAME, seed), _draw, key=lambda ex: ex.meta["passage"])


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
