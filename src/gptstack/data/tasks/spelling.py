"""Letter counting and spelling over the frequent words of the Shakespeare corpus.

Every reply starts by spelling the word ("g,e,n,t,l,e,m,a,n"; for a spelling question that line is the
answer): with one letter per token the model can count what it can see, which is the whole trick for
letter-level questions under BPE. A counting reply keeps a tally as it spells, marking each occurrence of the
asked letter with its running count ("b,o,l,d,n,e,s=1,s=2\nAnswer: 2"), so the count is a chain of local
steps (is this the letter? one more than the last mark) rather than a count over the whole spelling at once.
Measured on the tiny preset with a bare spelling (spelling-only SFT, 1.5 min): half the words spelled right,
and the count right for only 53% of those.

Words are the 821 that occur at least MIN_COUNT times (4-9 letters). The splits are disjoint in questions
(a word's spelling question, and each (word, letter) counting question, belong to one split), not in words:
the model learns the spellings of a fixed vocabulary from its training questions, as it learns facts, and the
test asks new questions about them. With all 7,267 words seen five times or more, 2.5 minutes of mixed SFT
learned no spelling at all (0 of 200 words spelled right).
"""

from __future__ import annotations

import functools
import re
from collections import Counter

from . import Example
from ._common import answer_line, check_args, clean_completion, collect, rng_for

NAME = "spelling"
DESCRIPTION = "count a letter in, or spell, a frequent 4-9 letter Shakespeare word; 'Answer: N' or 'l,e,t,t,e,r,s'"

MIN_LEN, MAX_LEN, MIN_COUNT = 4, 9, 100
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


@functools.lru_cache(maxsize=1)
def words() -> tuple[str, ...]:
    """Words of 4-9 letters seen at least MIN_COUNT times, sorted so the list, and so every example, is the
    same on every machine."""
    from ..corpus import shakespeare_texts

    counts = Counter()
    for text in shakespeare_texts().values():
        # tokens with apostrophes ("o'erwhelm") are skipped, not cut into pseudo-words
        counts.update(t for t in re.findall(r"[a-z']+", text.lower()) if "'" not in t)
    return tuple(sorted(w for w, c in counts.items() if MIN_LEN <= len(w) <= MAX_LEN and c >= MIN_COUNT))


def spell(word: str) -> str:
    return ",".join(word)


def tally(word: str, letter: str) -> str:
    """The spelling with each occurrence of `letter` marked by its running count: ('boldness', 's') ->
    'b,o,l,d,n,e,s=1,s=2'."""
    out, seen = [], 0
    for c in word:
        if c == letter:
            seen += 1
            out.append(f"{c}={seen}")
        else:
            out.append(c)
    return ",".join(out)


COUNTS = (0, 1, 2)   # answers of counting questions, in equal shares ("2" covers the rare 3s and 4s too)
SPELL_SHARE = 0.3    # the rest are counting questions


def _spell_example(rng, vocab) -> Example:
    word = vocab[rng.randrange(len(vocab))]
    question = f"Spell the word '{word}' letter by letter."
    # the spelling is the answer, on the reply's first line as in a counting reply (a repeat of it after
    # "Answer:" was re-spelled, not copied, and often wrong: measured)
    return _example(question, spell(word), spell(word), word, "spell")


def _count_example(rng, vocab, target: int) -> Example:
    while True:
        word = vocab[rng.randrange(len(vocab))]
        if target == 0:
            letters = [c for c in ALPHABET if c not in word]
        else:
            letters = sorted({c for c in word if (word.count(c) >= 2 if target == 2 else word.count(c) == 1)})
        if letters:
            letter = rng.choice(letters)
            break
    answer = str(word.count(letter))
    question = f"How many times does the letter '{letter}' appear in '{word}'?"
    return _example(question, f"{tally(word, letter)}\nAnswer: {answer}", answer, word, "count")


def _example(question: str, reply: str, answer: str, word: str, kind: str) -> Example:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return Example(NAME, messages, answer, {"word": word, "kind": kind})


def _quotas(n: int) -> list[int]:
    """n split over (spell, count 0, count 1, count 2) by largest remainder."""
    shares = [SPELL_SHARE] + [(1 - SPELL_SHARE) / len(COUNTS)] * len(COUNTS)
    raw = [n * s for s in shares]
    out = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (out[i] - raw[i], i))[:n - sum(out)]:
        out[i] += 1
    return out


def generate(split: str, n: int, seed: int = 0) -> list[Example]:
    """Spelling questions and counting questions with each count class in equal shares, drawn per stratum
    (a stratum with few distinct questions, like the 2s of a small vocabulary, would otherwise lose its share
    to duplicates), then shuffled together."""
    check_args(split, n)
    vocab = words()
    draws = [lambda rng: _spell_example(rng, vocab)] + [
        (lambda rng, t=t: _count_example(rng, vocab, t)) for t in COUNTS]
    out = []
    for i, (draw, k) in enumerate(zip(draws, _quotas(n))):
        if k:
            out += collect(split, k, rng_for(f"{NAME}:{i}", seed), draw, key=lambda ex: ex.messages[0]["content"])
    rng_for(NAME, seed).shuffle(out)
    return out


def extract(completion: str) -> str | None:
    """'Answer: 2' -> '2'; 'Answer: g, e, n' or 'Answer: gen' -> 'g,e,n'; without an answer line, a first line
    that spells ('g,e,n') -> 'g,e,n'."""
    value = answer_line(completion)
    if value is None:
        first = clean_completion(completion).split("\n")[0].lower()
        return first.replace(" ", "") if re.fullmatch(r"\s*[a-z](\s*,\s*[a-z])*\s*", first) else None
    value = value.lower()
    number = re.match(r"\d+", value)
    if number:
        return str(int(number.group(0)))
    letters = re.findall(r"[a-z]", value)
    return ",".join(letters) if letters else None


def check(example: Example, completion: str) -> float:
    return 1.0 if extract(completion) == example.answer else 0.0
