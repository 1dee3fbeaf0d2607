"""Task accuracy: mean checker reward on each task's TEST split, under several decoding modes.

    result = evaluate_tasks(model, tokenizer, ["arithmetic_cot", "spelling"], n=100)
    print(format_table(result))

A mode is a function (engine, examples, ModeSettings) -> list of rewards, one per example, registered in
MODES by name. Built in: "greedy" (temperature 0) and "sample" (pass@1: one sample at `temperature`, or the
mean over `samples` of them). Self-consistency or best-of-n plug in with `register_mode("maj@5", fn)`, a
mode named "maj@K" (K samples, majority vote on the extracted answer) is served by
`infer.ensemble.self_consistency`. CoT versus
direct answers for arithmetic is the two tasks side by side (they share their test problems).

Prompts are rendered with `tokenizer.render_prompt(example.prompt_messages())` and decoded many at once by the
engine, each row stopping at <|assistant_end|>.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import ConfigError

DEFAULT_MODES = ("greedy", "sample")


@dataclass
class ModeSettings:
    temperature: float = 0.8
    top_k: int = 0
    samples: int = 1              # "sample": pass@1 averaged over this many samples per example
    max_tokens: int = 0           # 0: per task, from the longest reference answer
    batch_size: int = 64          # prompts per engine call
    seed: int = 0
    extra: dict = field(default_factory=dict)   # for modes registered from outside


ModeFn = Callable[["object", list, str, ModeSettings, int], "tuple[list[float], list[str]]"]
MODES: dict[str, ModeFn] = {}


def register_mode(name: str, fn: ModeFn) -> None:
    """fn(engine, examples, task_name, settings, max_tokens) -> (rewards, one shown completion per example)."""
    MODES[name] = fn


def _generate(engine, examples, settings: ModeSettings, params) -> list[list]:
    """Completions[example][sample], in chunks of `batch_size` prompts."""
    tok = engine.tokenizer
    out = []
    for start in range(0, len(examples), settings.batch_size):
        chunk = examples[start:start + settings.batch_size]
        prompts = [tok.render_prompt(e.prompt_messages()) for e in chunk]
        out.extend(engine.generate(prompts, params))
    return out


def _params(temperature: float, settings: ModeSettings, max_tokens: int, n: int = 1, seed: int | None = None):
    from ..infer.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_k=settings.top_k if temperature > 0 else 0,
                          max_tokens=max_tokens, n=n, seed=seed)


def greedy_mode(engine, examples, task, settings: ModeSettings, max_tokens: int):
    from ..data.tasks import get_task

    checker = get_task(task).check
    comps = _generate(engine, examples, settings, _params(0.0, settings, max_tokens))
    return [checker(e, c[0].text) for e, c in zip(examples, comps)], [c[0].text for c in comps]


def sample_mode(engine, examples, task, settings: ModeSettings, max_tokens: int):
    from ..data.tasks import get_task

    checker = get_task(task).check
    k = max(1, settings.samples)
    comps = _generate(engine, examples, settings,
                      _params(settings.temperature, settings, max_tokens, n=k, seed=settings.seed))
    rewards = [sum(checker(e, s.text) for s in c) / k for e, c in zip(examples, comps)]
    return rewards, [c[0].text for c in comps]


register_mode("greedy", greedy_mode)
register_mode("sample", sample_mode)


def _resolve_mode(name: str) -> ModeFn:
    if name in MODES:
        return MODES[name]
    if name.startswith("maj@"):
        try:
            k = int(name[4:])
        except ValueError:
            raise ConfigError(f"mode '{name}': write maj@K with an integer K") from None
        try:
            from ..infer.ensemble import self_consistency
        except ImportError:
            raise ConfigError(f"mode '{name}' needs gptstack.infer.ensemble.self_consistency, which is not "
                              "available in this install") from None
        return _self_consistency_mode(self_consistency, k)
    raise ConfigError(f"unknown eval mode '{name}'; known: {', '.join(MODES)} (and maj@K)")


def _self_consistency_mode(self_consistency, k: int) -> ModeFn:
    """maj@K: K samples per example at the mode temperature, majority vote on the extracted answers."""
    def mode(engine, examples, task, settings, max_tokens):
        from ..data.tasks import get_task

        params = _params(settings.temperature, settings, max_tokens, seed=settings.seed)
        votes = self_consistency(engine, get_task(task), examples, k, params, score=True)
        return [float(v.score or 0.0) for v in votes], [v.completion.text if v.completion else "" for v in votes]
    return mode


def default_max_tokens(tokenizer, examples) -> int:
    """Room for the longest reference answer and a margin: a right answer never needs more, and a model that
    rambles is cut off (and scored) there instead of costing a full context of decoding."""
    longest = max((len(tokenizer.encode(e.reference())) for e in examples), default=16)
    return min(256, longest + longest // 4 + 16)


def evaluate_tasks(model, tokenizer, task_names: Sequence[str] | str = "all", n: int = 100,
                   modes: Sequence[str] = DEFAULT_MODES, seed: int = 0, temperature: float = 0.8,
                   samples: int = 1, batch_size: int = 64, max_tokens: int = 0, keep_examples: int = 3,
                   progress: bool = False) -> dict:
    """Accuracy (mean reward) of `model` on n TEST examples of each task, per mode.

    Returns {"tasks": {task: {mode: accuracy}}, "mean": {mode: accuracy}, "n": n, "modes": [...],
    "settings": {...}, "examples": {task: [{"prompt", "reference", "completion" (first mode), "reward"}]},
    "seconds": ...}."""
    from ..data.tasks import get_task, parse_task_list
    from ..infer.engine import Engine

    names = parse_task_list(task_names) if isinstance(task_names, str) else list(task_names)
    if n < 1:
        raise ConfigError(f"--n-examples must be at least 1, got {n}")
    if not modes:
        raise ConfigError("give at least one eval mode")
    fns = {m: _resolve_mode(m) for m in modes}
    settings = ModeSettings(temperature=temperature, samples=samples, batch_size=batch_size, seed=seed,
                            max_tokens=max_tokens)
    engine = Engine(model, tokenizer)
    t0 = time.time()
    result = {"tasks": {}, "mean": {}, "n": n, "modes": list(modes), "examples": {},
              "settings": {"temperature": temperature, "samples": samples, "seed": seed, "split": "test"}}
    for name in names:
        examples = get_task(name).generate("test", n, seed)
        limit = max_tokens or default_max_tokens(tokenizer, examples)
        row, shown = {}, None
        for mode, fn in fns.items():
            rewards, texts = fn(engine, examples, name, settings, limit)
            row[mode] = sum(rewards) / len(rewards)
            if shown is None:
                shown = [{"prompt": e.prompt_messages()[-1]["content"], "reference": e.reference(),
                          "completion": t, "reward": r} for e, t, r in list(zip(examples, texts, rewards))[:keep_examples]]
        result["tasks"][name] = row
        result["examples"][name] = shown or []
        if progress:
            print(f"  {name:<20} " + "  ".join(f"{m} {v:.3f}" for m, v in row.items()), flush=True)
    for mode in modes:
        result["mean"][mode] = sum(r[mode] for r in result["tasks"].values()) / max(1, len(result["tasks"]))
    result["seconds"] = round(time.time() - t0, 2)
    return result


def format_table(result: dict, title: str = "") -> str:
    """A fixed-width table: one row per task, one column per mode, the mean last."""
    modes = result["modes"]
    label = {"sample": f"sample@T={result['settings']['temperature']:g}"}
    heads = [label.get(m, m) for m in modes]
    width = max([len("task")] + [len(t) for t in result["tasks"]] + [4])
    cols = [max(8, len(h)) for h in heads]
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'task':<{width}}  " + "  ".join(f"{h:>{c}}" for h, c in zip(heads, cols)))
    lines.append("-" * (width + 2 + sum(c + 2 for c in cols) - 2))
    for task, row in result["tasks"].items():
        lines.append(f"{task:<{width}}  " + "  ".join(f"{row[m]:>{c}.3f}" for m, c in zip(modes, cols)))
    lines.append(f"{'mean':<{width}}  " + "  ".join(f"{result['mean'][m]:>{c}.3f}" for m, c in zip(modes, cols)))
    lines.append(f"({result['n']} test examples per task; {result['seconds']:.0f}s)")
    return "\n".join(lines)


def compare_table(results: dict[str, dict], mode_order: Sequence[str] | None = None) -> str:
    """Several runs side by side: rows = tasks, columns = run x mode (e.g. base/greedy, sft/greedy, ...)."""
    runs = list(results)
    first = results[runs[0]]
    modes = list(mode_order or first["modes"])
    tasks = list(first["tasks"])
    heads = [f"{r}/{m}" for m in modes for r in runs]
    width = max(len("task"), *(len(t) for t in tasks))
    cols = [max(7, len(h)) for h in heads]
    lines = [f"{'task':<{width}}  " + "  ".join(f"{h:>{c}}" for h, c in zip(heads, cols))]
    lines.append("-" * len(lines[0]))
    for t in tasks + ["mean"]:
        vals = [(results[r]["mean"] if t == "mean" else results[r]["tasks"].get(t, {})).get(m, math.nan)
                for m in modes for r in runs]
        lines.append(f"{t:<{width}}  " + "  ".join(f"{v:>{c}.3f}" for v, c in zip(vals, cols)))
    return "\n".join(lines)
