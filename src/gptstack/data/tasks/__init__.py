"""Synthetic verifiable tasks: the default data for SFT, RL and evaluation.

Each task is one module in this package (its file name not starting with '_') exposing:

    NAME: str, DESCRIPTION: str
    generate(split, n, seed=0) -> list[Example]   split in {"train", "test"}, disjoint by content
    OPT_IN: bool (optional)                       True: left out of 'all', used only when named
    extract(completion) -> str | None             the final answer in a reply (for voting), None if absent
    check(example, completion) -> float           reward in [0, 1]

Modules are discovered at import, so adding a task is adding one file. A task that needs tools (tool_*.py)
is OPT_IN: 'all', the default mixture, means the tasks a plain chat model can learn, and a tool task joins a
mixture only when named ('all,tool_multiply'). Splits are decided by a hash of each
example's content (see `_common.split_of`), so the same question can never appear in both.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol

from ...errors import DataError
from ._common import interleave


@dataclass(frozen=True)
class Example:
    task: str
    messages: list[dict]  # the whole conversation, ending in the reference assistant answer
    answer: str           # what extract() returns for a correct reply
    meta: dict = field(default_factory=dict)
    tools: list = field(default_factory=list)   # OpenAI function schemas the conversation may call

    def prompt_messages(self) -> list[dict]:
        """The conversation up to and including the last user turn: what a model is asked. Everything after it
        (tool calls, tool results, the final answer) is the model's to produce; for a one-reply conversation
        that is the conversation without its final assistant turn."""
        last_user = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=-1)
        if last_user < 0:
            return [dict(m) for m in self.messages]
        return [dict(m) for m in self.messages[:last_user + 1]]

    def conversation(self) -> dict:
        """The conversation as a JSONL record in OpenAI's convention: messages, and tools when it has any."""
        return {"messages": self.messages, **({"tools": self.tools} if self.tools else {})}

    def reference(self) -> str:
        return self.messages[-1]["content"] if self.messages and self.messages[-1]["role"] == "assistant" else ""


class Task(Protocol):
    NAME: str
    DESCRIPTION: str

    def generate(self, split: str, n: int, seed: int = 0) -> list[Example]: ...
    def extract(self, completion: str) -> str | None: ...
    def check(self, example: Example, completion: str) -> float: ...


_REQUIRED = ("NAME", "DESCRIPTION", "generate", "extract", "check")


def _discover() -> dict[str, ModuleType]:
    tasks = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        missing = [a for a in _REQUIRED if not hasattr(module, a)]
        if missing:  # a half-written task file should fail loudly, not vanish from the registry
            raise ImportError(f"task module {module.__name__} lacks {', '.join(missing)}")
        tasks[module.NAME] = module
    return tasks


TASKS: dict[str, ModuleType] = _discover()


def list_tasks(opt_in: bool = False) -> list[str]:
    """The tasks 'all' stands for; with opt_in, also those used only when named (the tool tasks)."""
    return [name for name, module in TASKS.items() if opt_in or not getattr(module, "OPT_IN", False)]


def get_task(name: str) -> ModuleType:
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}") from None


MAX_WEIGHT = 100.0   # a weight multiplies examples generated: beyond this, a typo rather than a mixture


def parse_task_weights(spec: str) -> dict[str, float]:
    """'all' or a comma-separated list of task names, each optionally with a mixture weight ('name:3'); 'all'
    inside a list adds every task not named (weight 1) -> {name: weight}, in order, without repeats."""
    if spec is None or not str(spec).strip():
        raise DataError(f"empty task list; use 'all' or some of: {', '.join(TASKS)}")
    weights: dict[str, float] = {}
    expand_all = False
    for item in (s.strip() for s in str(spec).split(",")):
        if not item:
            continue
        if item == "all":
            expand_all = True
            continue
        name, _, w = item.partition(":")
        name = name.strip()
        get_task(name)
        try:
            weight = float(w) if w.strip() else 1.0
        except ValueError:
            raise DataError(f"bad mixture weight in '{item}': use name:NUMBER, e.g. arithmetic_cot:3") from None
        if not 0 < weight <= MAX_WEIGHT:   # also rejects nan and inf
            raise DataError(f"mixture weight of '{name}' must be in (0, {MAX_WEIGHT}], got {w}")
        weights.setdefault(name, weight)
    if expand_all:
        for name in list_tasks():
            weights.setdefault(name, 1.0)
    if not weights:
        raise DataError(f"empty task list '{spec}'; use 'all' or some of: {', '.join(TASKS)}")
    return weights


def parse_task_list(spec: str) -> list[str]:
    """'all' or a comma-separated list of task names (weights, if given, ignored) -> validated names."""
    return list(parse_task_weights(spec))


def generate_mixture(names, split: str, n_per_task: int, seed: int = 0) -> list[Example]:
    """n_per_task examples of every named task (times its weight, with 'name:w' specs), interleaved in
    proportion so any prefix of the mixture has every task in its share (deterministic given the seed)."""
    weights = parse_task_weights(names) if isinstance(names, str) else {n: 1.0 for n in names}
    return interleave([get_task(name).generate(split, max(1, round(n_per_task * w)), seed)
                       for name, w in weights.items()])


def check_example(example: Example, completion: str) -> float:
    """Reward of a completion for an example of any registered task."""
    return get_task(example.task).check(example, completion)


__all__ = ["Example", "Task", "TASKS", "get_task", "list_tasks", "parse_task_list", "parse_task_weights",
           "generate_mixture",
           "check_example"]
