"""Facts about invented entities that only a document collection knows, found with the search tool.

The entities come from the `facts` task's world generator with a world seed of their own (TOOL_WORLD), so
their names and values appear nowhere else in the suite: not in pretraining text, not in the `facts` task's
contexts. The question carries no context, so a model without the tool can only guess one of the values it
has seen (about 1 in 20); with the tool it searches the documents and reads the answer from the result.

A training conversation, in OpenAI's convention:

    user       What is the capital of Droushia?
    assistant  tool_calls: search({"query": "What is the capital of Droushia?"})     (content "")
    tool       [tool_facts/droushia] Droushia is a country. The capital of Droushia is Kelmith. ...
    assistant  Kelmith

The query is the question itself: copying it is the easiest call to learn, and the entity's invented name
makes it the top hit of a BM25 search over `documents()` (tests check this for every entity). The tool
message is the entity's document in the form the search tool shows a hit (`search_result`); the index the
tool searches is built from `documents()` by `eval.tools` (this layer sits below the retrieval code). Train
and test ask about different entities (the split hashes the entity name), so training teaches the calls and
the reading, not the facts. The checker is the `facts` one: the answer, and no other value of the document.
"""

from __future__ import annotations

import json
import random
import re

from . import Example, facts
from ._common import check_args, collect, rng_for, split_of

NAME = "tool_facts"
DESCRIPTION = "questions about invented entities answered by calling the search tool over their documents (opt-in)"
OPT_IN = True
TOOL_SPEC = "search"   # search over this task's documents(); eval.tools builds their index
TOOL_WORLD = 16        # the world seed: other entities than the `facts` task's world 0
TEST_EVERY = 4         # a quarter of the entities: ~200 entities, ~500 distinct held-out questions
SOURCE_PREFIX = "tool_facts/"

extract = facts.extract   # part of the task interface
check = facts.check


def search_schema() -> dict:
    """The OpenAI function schema of the search tool these conversations call."""
    return {"type": "function", "function": {
        "name": "search",
        "description": "Search a collection of documents; returns the best-matching passages with their sources.",
        "parameters": {"type": "object",
                       "properties": {"query": {"type": "string", "description": "what to look for"}},
                       "required": ["query"], "additionalProperties": False}}}


def _source(entity: facts.Entity) -> str:
    return SOURCE_PREFIX + re.sub(r"[^a-z]+", "_", entity.name.lower())


def documents(world_seed: int = TOOL_WORLD) -> list[tuple[str, str]]:
    """(source, text) of every entity, train and test alike: the collection the search tool indexes."""
    return [(_source(e), e.text()) for e in facts.world(world_seed)]


def search_result(source: str, text: str) -> str:
    """How the search tool shows one hit: its source in brackets, then the passage."""
    return f"[{source}] {text}"


def generate(split: str, n: int, seed: int = 0, world_seed: int = TOOL_WORLD) -> list[Example]:
    check_args(split, n)
    pool = [e for e in facts.world(world_seed) if split_of(e.name, TEST_EVERY) == split]
    tools = [search_schema()]

    def draw(rng: random.Random) -> Example:
        entity = rng.choice(pool)
        attribute = rng.choice(sorted(entity.attributes))
        answer = entity.attributes[attribute]
        question = facts.QUESTIONS[attribute].format(e=entity.name)
        call = {"id": "call_1", "type": "function",
                "function": {"name": "search", "arguments": json.dumps({"query": question})}}
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": search_result(_source(entity), entity.text())},
            {"role": "assistant", "content": answer},
        ]
        distractors = sorted({v for v in entity.attributes.values() if v.lower() != answer.lower()})
        return Example(NAME, messages, answer, {"question": question, "entity": entity.name,
                                                "source": _source(entity), "attribute": attribute,
                                                "distractors": distractors}, tools)

    return collect(split, n, rng_for(NAME, seed), draw, key=lambda ex: ex.meta["question"],
                   assign=lambda ex: split_of(ex.meta["entity"], TEST_EVERY))
