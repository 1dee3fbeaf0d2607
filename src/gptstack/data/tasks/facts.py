"""Made-up facts about fictional countries and people: the retrieval study's task.

No model can know "The capital of Zorvania is Kelmith" from pretraining, so accuracy without the right
context is chance, and with it measures reading from context. Train and test ask about *different* entities
(the split hashes the entity name), so SFT teaches the format of answering from a context, not the facts.

Every example's prompt carries the entity's document as its context; the question picks one of the two or
three values in it, so the model has to read the attribute asked for rather than copy the first name in
sight (the checker fails a reply that also names another value of the context). Each attribute draws its
values from a small fixed vocabulary of invented words (24 capitals, 12 languages, 12 currencies, 20
professions): which value belongs to which entity is only in the documents, so without a context the best
a model can do is guess one of the vocabulary (about 1 in 20), while a small model learns the values' spelling
quickly and spends its capacity on the reading. `meta` keeps the bare question, the context and the gold
source, so a retrieval-augmented prompt can be built from retrieved passages instead (`rag_prompt`), and
`documents()` is the corpus a retrieval index is built from.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from . import Example
from ._common import answer_line, check_args, clean_completion, collect, first_line, rng_for, split_of

NAME = "facts"
DESCRIPTION = "answer questions about fictional countries and people from a given context"

N_COUNTRIES, N_PEOPLE = 500, 300
N_CAPITALS, N_LANGUAGES, N_CURRENCIES = 24, 12, 12
TEST_EVERY = 5  # a fifth of the entities: enough distinct test questions for a stable accuracy
PROFESSIONS = ["painter", "baker", "sailor", "farmer", "weaver", "potter", "teacher", "doctor", "miner", "tailor",
               "singer", "poet", "judge", "merchant", "builder", "gardener", "hunter", "carpenter", "brewer", "scribe"]
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "tr", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m"]
QUESTIONS = {
    "capital": "What is the capital of {e}?",
    "language": "What language is spoken in {e}?",
    "currency": "What is the currency of {e}?",
    "profession": "What does {e} do for a living?",
    "birthplace": "Where was {e} born?",
}


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str          # "country" or "person"
    attributes: dict   # attribute -> single-word value

    @property
    def source(self) -> str:
        return "facts/" + re.sub(r"[^a-z]+", "_", self.name.lower())

    def text(self) -> str:
        a, e = self.attributes, self.name
        if self.kind == "country":
            return (f"{e} is a country. The capital of {e} is {a['capital']}. The people of {e} speak "
                    f"{a['language']}. The currency of {e} is the {a['currency']}.")
        return f"{e} is a {a['profession']}. {e} was born in {a['birthplace']}."


@functools.lru_cache(maxsize=4)
def world(seed: int = 0) -> tuple[Entity, ...]:
    """The fictional world: unique invented words for every name and value, fixed by the seed."""
    rng = rng_for("facts-world", seed)
    used: set[str] = set()

    def word(syllables: int, suffix: str = "") -> str:
        while True:
            w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
            w = (w + suffix).capitalize()
            if w.lower() not in used and 4 <= len(w) <= 12:
                used.add(w.lower())
                return w

    capitals = [word(2, rng.choice(["", "th", "holm", "grad"])) for _ in range(N_CAPITALS)]
    languages = [word(2, rng.choice(["ish", "ese", "ic"])) for _ in range(N_LANGUAGES)]
    currencies = [word(1).lower() for _ in range(N_CURRENCIES)]
    entities = []
    for _ in range(N_COUNTRIES):
        entities.append(Entity(word(2) + rng.choice(["ia", "land", "mark", "ovia"]), "country", {
            "capital": rng.choice(capitals), "language": rng.choice(languages), "currency": rng.choice(currencies),
        }))
    for _ in range(N_PEOPLE):
        entities.append(Entity(f"{word(2)} {word(2)}", "person", {
            "profession": rng.choice(PROFESSIONS), "birthplace": rng.choice(capitals)}))
    return tuple(entities)


def documents(seed: int = 0) -> list[tuple[str, str]]:
    """(source name, text) of every fact in the world, train and test entities alike: a retrieval corpus."""
    return [(e.source, e.text()) for e in world(seed)]


def rag_prompt(question: str, passages: list[str]) -> str:
    """The user message format the task trains: context passages, then the question."""
    return "Answer from the context.\n\nContext:\n" + "\n".join(passages) + f"\n\nQuestion: {question}"


def generate(split: str, n: int, seed: int = 0, world_seed: int = 0) -> list[Example]:
    """`seed` picks the questions and distractors; `world_seed` the facts (fixed by default, so the
    examples of any seed are about the world that `documents()` returns)."""
    check_args(split, n)
    pool = [e for e in world(world_seed) if split_of(e.name, TEST_EVERY) == split]

    def draw(rng: random.Random) -> Example:
        entity = rng.choice(pool)
        attribute = rng.choice(sorted(entity.attributes))
        answer = entity.attributes[attribute]
        question = QUESTIONS[attribute].format(e=entity.name)
        context = entity.text()
        distractors = sorted({v for v in entity.attributes.values() if v.lower() != answer.lower()})
        messages = [{"role": "user", "content": rag_prompt(question, [context])},
                    {"role": "assistant", "content": answer}]
        return Example(NAME, messages, answer, {
            "question": question, "context": context, "source": entity.source, "entity": entity.name,
            "attribute": attribute, "distractors": distractors})

    # the pool is already one split's entities; `assign` re-states the rule rather than trusting the filter
    return collect(split, n, rng_for(NAME, seed), draw, key=lambda ex: ex.messages[0]["content"],
                   assign=lambda ex: split_of(ex.meta["entity"], TEST_EVERY))


def extract(completion: str) -> str | None:
    """The answer word: the 'Answer:' value or first line, its last word without punctuation."""
    line = answer_line(completion) or first_line(completion)
    if line is None:
        return None
    words = re.findall(r"[A-Za-z]+", line)
    return words[-1] if words else None


def check(example: Example, completion: str) -> float:
    """1 when the reply names the answer and none of the context's other values. Without the second rule a
    reply that parrots the whole context would score 1, and RL would find that out fast."""
    reply = clean_completion(completion)

    def has(word: str) -> bool:
        return re.search(rf"\b{re.escape(word)}\b", reply, re.IGNORECASE) is not None

    if not has(example.answer):
        return 0.0
    return 0.0 if any(has(v) for v in example.meta.get("distractors", ())) else 1.0
