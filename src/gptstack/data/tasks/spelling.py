"""Letter counting and spelling over words from the Shakespeare corpus.

The reply always spells the word out first ("g,e,n,t,l,e,m,a,n"): with one letter per token the model can
count what it can see, which is the whole trick for letter-level questions under BPE.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

from . import Example
from ._common import answer_line, check_args, collect, rng_for

NAME = "spelling"
DESCRIPTION = "count a letter in, or spell, a 4-9 letter Shakespeare word; 'Answer: N' or 'Answer: l,e,t,t,e,r,s'"

MIN_LEN, MAX_LEN, MIN_COUNT = 4, 9, 5
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


@functools.lru_cache(maxsize=1)
def words() -> tuple[str, ...]:
    """Words of 4-9 letters seen at least MIN_COUNT times (rarer ones are mostly spelling oddities of the
    Gutenberg texts), sorted so the list, and so every example, is the same on every machine."""
    from ..corpus import shakespeare_texts

    counts = Counter()
    for text in shakespeare_texts().values():
        # tokens with apostrophes ("o'erwhelm") are skipped, not cut into pseudo-words
        counts.update(t for t in re.findall(r"[a-z']+", text.lower()) if "'" not in t)
    return tuple(sorted(w for w, c in counts.items() if MIN_LEN <= len(w) <= MAX_LEN and c >= MIN_COUNT))


def spell(word: str) -> str:
    return ",".join(word)


def _draw(rng) -> Example:
    vocab = words()
    word = vocab[rng.randrange(len(vocab))]
    if rng.random() < 0.3:
        question = f"Spell the word '{word}' letter by letter."
        answer, reply = spell(word), f"Answer: {spell(word)}"
        kind = "spell"
    else:
        # mostly letters in the word, sometimes absent ones, so "0" is a possible answer too
        letter = rng.choice(word) if rng.random() < 0.75 else rng.choice(ALPHABET)
        question = f"How many times does the letter '{letter}' appear in '{word}'?"
        answer = str(word.count(letter))
        reply = f"{spell(word)}\nAnswer: {answer}"
        kind = "count"
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return Example(NAME, messages, answer, {"word": word, "kind": kind})


def generate(split: str, n: int, seed: int = 0) -> list[Example]:
    check_args(split, n)
    return collect(split, n, rng_for(NAME, seed), _draw, key=lambda ex: ex.messages[0]["content"])


def extract(completion: str) -> str | None:
    """'Answer: 2' -> '2'; 'Answer: g, e, n' or 'Answer: gen' -> 'g,e,n'."""
    value = answer_line(completion)
    if value is None:
        return None
    value = value.lower()
    number = re.match(r"\d+", value)
    if number:
        return str(int(number.group(0)))
    letters = re.findall(r"[a-z]", value)
    return ",".join(letters) if letters else None


def check(example: Example, completion: str) -> float:
    return 1.0 if extract(completion) == example.answer else 0.0
