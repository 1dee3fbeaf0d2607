"""Sentence in, JSON object with named fields out: the task that exercises constrained decoding.

Every reference validates against SCHEMA, which the JSON-constrained decoder is handed; check() gives partial
credit per field so RL has a gradient between "unparseable" and "all correct".
"""

from __future__ import annotations

import json
import re

from . import Example
from ._common import check_args, clean_completion, collect, rng_for

NAME = "extraction"
DESCRIPTION = "extract name, age and city from a sentence as a JSON object"

FIELDS = ("name", "age", "city")
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "minLength": 1},
    },
    "required": list(FIELDS),
    "additionalProperties": False,
}

NAMES = ["Maria", "John", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam", "Chen", "Sofia", "Omar", "Elena",
         "Tom", "Priya", "Lucas", "Hana", "Ivan", "Grace", "Mateo", "Zara", "Noah", "Ingrid", "Ravi", "Chloe",
         "Yusuf", "Anna", "Diego", "Mei", "Felix", "Leila", "Oscar", "Nadia", "Arjun", "Emma", "Tariq", "Lena"]
CITIES = ["Lisbon", "Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Berlin", "Madrid", "Nairobi", "Seoul", "Dublin",
          "Quito", "Rome", "Vienna", "Delhi", "Toronto", "Sydney", "Prague", "Athens", "Manila", "Bogota", "Helsinki",
          "Warsaw", "Accra", "Hanoi", "Boston", "Denver", "Kyoto", "Porto", "Munich"]
TEMPLATES = [
    "{name} is {age} and lives in {city}.",
    "{name}, aged {age}, lives in {city}.",
    "{name} lives in {city} and is {age} years old.",
    "At {age}, {name} moved to {city}.",
    "Meet {name} from {city}, who is {age}.",
    "{name} ({age}) works in {city}.",
    "In {city} lives {name}, who turned {age} this year.",
    "{name} is a {age}-year-old from {city}.",
]


def _draw(rng) -> Example:
    record = {"name": rng.choice(NAMES), "age": rng.randint(18, 90), "city": rng.choice(CITIES)}
    sentence = rng.choice(TEMPLATES).format(**record)
    answer = json.dumps(record)
    messages = [{"role": "user", "content": f"Extract name, age and city as JSON: {sentence}"},
                {"role": "assistant", "content": answer}]
    return Example(NAME, messages, answer, {"fields": record, "sentence": sentence})


def generate(split: str, n: int, seed: int = 0) -> list[Example]:
    check_args(split, n)
    return collect(split, n, rng_for(NAME, seed), _draw, key=lambda ex: ex.meta["sentence"])


def parse(completion: str):
    """The first JSON object in the reply, or None. Models often wrap JSON in prose or a code fence."""
    text = clean_completion(completion)
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def extract(completion: str) -> str | None:
    """The object re-serialised with the schema's fields first, so equal answers vote together."""
    obj = parse(completion)
    if obj is None:
        return None
    ordered = {k: obj[k] for k in FIELDS if k in obj}
    ordered.update({k: obj[k] for k in sorted(obj, key=str) if k not in ordered})
    return json.dumps(ordered)


def _same(field: str, got, want) -> bool:
    if field == "age":
        if isinstance(got, bool):
            return False
        if isinstance(got, str) and got.strip().isdigit():
            got = int(got.strip())
        return isinstance(got, (int, float)) and got == want
    return isinstance(got, str) and got.strip().lower() == want.lower()


def check(example: Example, completion: str) -> float:
    """Fraction of the fields that are right; 0 when no JSON object can be parsed."""
    obj = parse(completion)
    if obj is None:
        return 0.0
    want = example.meta["fields"]
    return sum(_same(f, obj.get(f), want[f]) for f in FIELDS) / len(FIELDS)
