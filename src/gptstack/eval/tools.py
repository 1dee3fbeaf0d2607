"""Tool-task evaluation: accuracy with the task's tools (through the agent loop) and without them (plain
greedy, as `eval.tasks`), tool-call validity with and without constrained arguments, and paired tests.

    result = evaluate_tool_tasks(model, tokenizer, ["tool_multiply", "tool_facts"], n=400)
    print(format_tool_table(result))

Arms, each greedy on the same held-out problems:
    no_tools           the question alone, one reply (what a model without tools can do)
    tools              the agent loop with the task's tools, each call's arguments constrained to its schema
    tools_unconstrained the same loop with free-running arguments: what the model writes on its own
A call is *valid* when it names one of the offered tools and its arguments are a JSON object that validates
against that tool's parameter schema. With constraints every call should be valid by construction, so that
column is a check on the decoder, and the unconstrained one measures what training taught.

The tools: `tool_multiply` gets the calculator; `tool_facts` gets search over an index of the task's own
documents, built here (BM25: no model to load, exact on invented names) into `workdir`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError

ARMS = ("no_tools", "tools", "tools_unconstrained")


# ---- tools for a task -----------------------------------------------------------------------------------

def tool_spec(task_name: str, workdir: str | Path) -> str:
    """The agent loop's tool spec for a tool task ('calculator', 'search:DIR'). A task whose tool is a bare
    'search' searches its own `documents()`: their BM25 index is built into workdir (kept while it still
    holds the same documents)."""
    from ..data.tasks import get_task

    task = get_task(task_name)
    spec = getattr(task, "TOOL_SPEC", None)
    if spec is None:
        raise ConfigError(f"task '{task_name}' uses no tools; tool evaluation is for the tool tasks "
                          "(tool_multiply, tool_facts)")
    if spec != "search":
        return spec
    from ..infer.retrieval import Index, build_index

    directory = Path(workdir) / f"{task_name}_index"
    docs = task.documents()
    if (directory / "meta.json").exists():
        index = Index.load(directory, embedder="bm25")
        if [(c.source, c.text) for c in index.chunks] == [tuple(d) for d in docs]:
            return f"search:{directory}"
    build_index(docs, embedder="bm25").save(directory)
    return f"search:{directory}"


# ---- call validity --------------------------------------------------------------------------------------

def call_problem(call: dict, tools: Sequence[dict]) -> str | None:
    """None when an OpenAI-shaped tool call is valid for the offered tools, else why not (one short line)."""
    import jsonschema

    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return "not a function call"
    schemas = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in tools}
    if fn.get("name") not in schemas:
        return f"unknown tool {fn.get('name')!r}"
    arguments = fn.get("arguments")
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        return "arguments are not JSON"
    if not isinstance(args, dict):
        return "arguments are not a JSON object"
    try:
        jsonschema.validate(args, schemas[fn["name"]])
    except jsonschema.ValidationError as e:
        return f"arguments do not match the schema ({e.message})"
    return None


def call_validity(calls: Sequence[dict], tools: Sequence[dict]) -> dict:
    """{"calls", "valid", "rate" (None without calls), "problems": {reason: count}} over the given calls."""
    problems: dict[str, int] = {}
    for call in calls:
        why = call_problem(call, tools)
        if why is not None:
            key = why.split(" (")[0]
            problems[key] = problems.get(key, 0) + 1
    bad = sum(problems.values())
    return {"calls": len(calls), "valid": len(calls) - bad,
            "rate": (len(calls) - bad) / len(calls) if calls else None, "problems": problems}


# ---- paired comparison ----------------------------------------------------------------------------------

def sign_test(b: int, c: int) -> float:
    """Two-sided exact binomial p-value of b against c discordant pairs (McNemar's exact test)."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """Two arms scored on the same problems: solved counts, the problems only one solves, and the sign test."""
    if len(a) != len(b):
        raise ConfigError(f"paired comparison needs the same problems: {len(a)} vs {len(b)} scores")
    sa, sb = [x >= 1.0 for x in a], [x >= 1.0 for x in b]
    only_a = sum(x and not y for x, y in zip(sa, sb))
    only_b = sum(y and not x for x, y in zip(sa, sb))
    return {"n": len(a), "a": sum(sa), "b": sum(sb), "only_a": only_a, "only_b": only_b,
            "p": sign_test(only_a, only_b)}


# ---- the arms -------------------------------------------------------------------------------------------

def _agent():
    try:
        from ..infer import agent
    except ImportError as e:
        raise ConfigError(f"evaluating with tools needs the agent loop (gptstack.infer.agent), which this "
                          f"install lacks ({e}); evaluate the 'no_tools' arm only") from None
    return agent


def agent_arm(engine, examples, spec: str, params, constrained: bool, max_steps: int = 4):
    """Run each example's question through the agent loop -> (rewards, final replies, the calls made)."""
    from ..data.tasks import get_task

    agent = _agent()
    tools = agent.tools_from_spec(spec)
    rewards, replies, calls = [], [], []
    for ex in examples:
        prompt = ex.prompt_messages()
        result = agent.run_agent(engine, prompt, tools, params, max_steps=max_steps, tool_choice="auto",
                                 constrained=constrained)
        produced = result.messages[len(prompt):]
        reply = next((m.get("content") or "" for m in reversed(produced) if m["role"] == "assistant"), "")
        calls.extend(c for m in produced if m["role"] == "assistant" for c in m.get("tool_calls") or ())
        rewards.append(get_task(ex.task).check(ex, reply))
        replies.append(reply)
    return rewards, replies, calls


def evaluate_tool_tasks(model, tokenizer, task_names: Sequence[str] | str = "tool_multiply,tool_facts",
                        n: int = 400, arms: Sequence[str] = ARMS, seed: int = 0, max_steps: int = 4,
                        max_tokens: int = 0, workdir: str | Path = "runs/tool_eval", progress: bool = False) -> dict:
    """Greedy accuracy of `model` on n TEST problems of each tool task under each arm, the tool-call
    validity of the tool arms, and paired tests of every tool arm against no_tools.

    Returns {"tasks": {task: {arm: accuracy}}, "validity": {task: {arm: call_validity}}, "paired":
    {task: {"tools vs no_tools": paired(...)}}, "scores": {task: {arm: [reward per problem]}}, "n", "arms",
    "seconds"}."""
    from ..data.tasks import get_task, parse_task_list
    from ..infer.engine import Engine
    from ..infer.sampling import SamplingParams
    from .tasks import ModeSettings, default_max_tokens, greedy_mode

    names = parse_task_list(task_names) if isinstance(task_names, str) else list(task_names)
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ConfigError(f"unknown tool-eval arm(s) {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(ARMS)}")
    if n < 1:
        raise ConfigError(f"--n-examples must be at least 1, got {n}")
    untooled = [name for name in names if getattr(get_task(name), "TOOL_SPEC", None) is None]
    if untooled:
        raise ConfigError(f"task(s) {', '.join(untooled)} use no tools; name tool tasks, e.g. "
                          "--tasks tool_multiply,tool_facts")
    engine = Engine(model, tokenizer)
    t0 = time.time()
    out = {"tasks": {}, "validity": {}, "paired": {}, "scores": {}, "n": n, "arms": list(arms)}
    for name in names:
        examples = get_task(name).generate("test", n, seed)
        limit = max_tokens or default_max_tokens(tokenizer, examples)
        scores, validity = {}, {}
        for arm in arms:
            if arm == "no_tools":
                scores[arm], _ = greedy_mode(engine, examples, name, ModeSettings(max_tokens=limit), limit)
                continue
            spec = tool_spec(name, workdir)
            # a call's arguments need room beyond the answer (the search query repeats the question)
            params = SamplingParams(temperature=0.0, max_tokens=max(limit, 96))
            scores[arm], _, calls = agent_arm(engine, examples, spec, params,
                                              constrained=arm == "tools", max_steps=max_steps)
            validity[arm] = call_validity(calls, examples[0].tools)
        out["scores"][name] = scores
        out["tasks"][name] = {arm: sum(s) / len(s) for arm, s in scores.items()}
        out["validity"][name] = validity
        if "no_tools" in scores:
            out["paired"][name] = {f"{arm} vs no_tools": paired(scores[arm], scores["no_tools"])
                                   for arm in scores if arm != "no_tools"}
        if progress:
            print(f"  {name:<16} " + "  ".join(f"{a} {v:.3f}" for a, v in out["tasks"][name].items()), flush=True)
    out["seconds"] = round(time.time() - t0, 2)
    return out


def format_tool_table(result: dict, title: str = "") -> str:
    """One row per task: accuracy per arm, then the call validity of each tool arm."""
    arms = result["arms"]
    tool_arms = [a for a in arms if a != "no_tools"]
    heads = arms + [f"valid/{a}" for a in tool_arms]
    width = max([len("task")] + [len(t) for t in result["tasks"]])
    cols = [max(9, len(h)) for h in heads]
    lines = [title] if title else []
    lines.append(f"{'task':<{width}}  " + "  ".join(f"{h:>{c}}" for h, c in zip(heads, cols)))
    lines.append("-" * len(lines[-1]))
    for task, row in result["tasks"].items():
        cells = [f"{row[a]:.3f}" for a in arms]
        for a in tool_arms:
            v = result["validity"][task].get(a, {})
            cells.append("no calls" if not v.get("calls") else f"{v['valid']}/{v['calls']}")
        lines.append(f"{task:<{width}}  " + "  ".join(f"{x:>{c}}" for x, c in zip(cells, cols)))
    for task, tests in result["paired"].items():
        for what, t in tests.items():
            lines.append(f"{task}: {what}: {t['a']} vs {t['b']} solved of {t['n']}, {t['only_a']} only with "
                         f"tools, {t['only_b']} only without, sign-test p = {t['p']:.2g}")
    lines.append(f"({result['n']} test problems per task, greedy; {result['seconds']:.0f}s)")
    return "\n".join(lines)
