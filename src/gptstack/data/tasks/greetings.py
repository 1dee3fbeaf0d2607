"""Greetings and identity: the few exchanges every assistant needs before anything else.

Each category has one fixed reply, and check() looks for that category's key phrase, so a reply that is
friendly but wrong for the question (a greeting when asked what it can do) scores 0; the replies are worded
so that no reply contains another category's key phrase. Prompts are built from
openers x names x phrasings; the split hashes the full prompt, so test prompts are unseen combinations.
"""

from __future__ import annotations

import itertools
import re

from . import Example
from ._common import check_args, clean_completion, collect, first_line, rng_for

NAME = "greetings"
DESCRIPTION = "greetings, identity and small-talk exchanges with fixed replies"

IDENTITY = "gptstack, a small assistant trained on Shakespeare"

# category -> (user phrasings, the assistant's reply, key-phrase regex the reply must contain)
CATEGORIES = {
    "greeting": (
        ["Hi!", "Hello!", "Hey there!", "Good morning!", "Good evening!", "Greetings!", "Hi there.", "Hello.",
         "Hey!", "Good day!"],
        "Hello! How can I help you today?",
        r"\b(hello|hi|hey|greetings|good (morning|day|evening))\b",
    ),
    "identity": (
        ["Who are you?", "What is your name?", "What are you?", "Tell me about yourself.", "Are you a person?",
         "What should I call you?", "Introduce yourself."],
        f"I am {IDENTITY}.",
        r"\bgptstack\b",
    ),
    "abilities": (
        ["What can you do?", "How can you help me?", "What are you good at?", "What can I ask you?",
         "What do you know?"],
        "I can do small sums, count letters, fill in JSON, and name the play a line of Shakespeare comes from.",
        r"\bi can\b",
    ),
    "thanks": (
        ["Thanks!", "Thank you.", "Thank you very much!", "Thanks a lot.", "Cheers, thanks!"],
        "You are welcome!",
        r"\bwelcome\b",
    ),
    "goodbye": (
        ["Bye!", "Goodbye.", "See you later!", "I have to go now.", "Farewell!"],
        "Goodbye! Come back any time.",
        r"\b(good ?bye|bye|farewell)\b",
    ),
}
NAMES = ["Anna", "Ben", "Carla", "Dev", "Elif", "Femi", "Gus", "Hiro", "Ines", "Jack", "Kai", "Lucia", "Milo",
         "Nora", "Otto", "Paula", "Quinn", "Rosa", "Sam", "Tara"]
OPENERS = ["", "I'm {name}. ", "Hi, it's {name}. ", "My name is {name}. ", "Hello, I am {name}. "]
# the bare phrasing (no opener) appears once, named openers once per name
_VARIANTS = sorted({o.format(name=n) for o, n in itertools.product(OPENERS, NAMES)})


def _draw(rng) -> Example:
    category = rng.choice(list(CATEGORIES))
    phrasings, reply, _ = CATEGORIES[category]
    prompt = (rng.choice(_VARIANTS) + rng.choice(phrasings)).strip()
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    return Example(NAME, messages, reply, {"category": category})


def generate(split: str, n: int, seed: int = 0) -> list[Example]:
    check_args(split, n)
    return collect(split, n, rng_for(NAME, seed), _draw, key=lambda ex: ex.messages[0]["content"])


def extract(completion: str) -> str | None:
    return first_line(completion)


def check(example: Example, completion: str) -> float:
    pattern = CATEGORIES[example.meta["category"]][2]
    return 1.0 if re.search(pattern, clean_completion(completion), re.IGNORECASE) else 0.0
