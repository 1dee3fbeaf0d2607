"""What the report's sections show, as text: the tables' rows, the machine facts, the sample conversations.

Both renderers (render.py: HTML and Markdown) show these same rows; neither formats a number itself. A table is
a `Table` of `Cell`s; a cell may carry a heat value in [0, 1] (the HTML shades it), a stage colour (a dot) or a
status badge, which the Markdown leaves out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..stages import color, label
from .collect import REWARD_MODEL, mean_acc, num

DECODING = (("greedy", "greedy"), ("sample", "sample (T=1)"), ("vote", "self-consistency vote"),
            ("best_of", "best-of-n (RM)"))
COLLAPSE_COLS = (("entropy", "entropy (nats)"), ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
                 ("distinct_3", "distinct-3"), ("self_bleu", "self-BLEU ↓"), ("embedding_similarity", "embed. sim ↓"),
                 ("quality", "quality"))


# ---- formatting -------------------------------------------------------------------------------------------

def fmt_seconds(s) -> str:
    s = num(s)
    if s is None:
        return "—"
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_count(n) -> str:
    n = num(n)
    if n is None:
        return "—"
    for div, suf in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suf}"
    return f"{n:.0f}"


def fmt(x, digits: int = 3) -> str:
    x = num(x)
    return "—" if x is None else f"{x:.{digits}f}"


def pct(x) -> str:
    x = num(x)
    return "—" if x is None else f"{100 * x:.1f}%"


# ---- tables -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    text: str
    heat: float | None = None     # in [0, 1]: how strongly the HTML shades the cell
    dot: str | None = None        # a stage's colour, drawn before the text
    badge: str | None = None      # a status (done, skipped, failed, partial), drawn as a badge


@dataclass(frozen=True)
class Table:
    head: list[str]
    rows: list[list[Cell]]
    numeric: tuple[bool, ...] = field(default=())   # right-aligned columns; default: all but the first

    def __post_init__(self):
        if not self.numeric:
            object.__setattr__(self, "numeric", tuple(i > 0 for i in range(len(self.head))))


def _table(head: list[str], rows: list[list], numeric: tuple[bool, ...] = ()) -> Table:
    """A Table from rows of str, (text, heat) or Cell."""
    def cell(c):
        if isinstance(c, Cell):
            return c
        if isinstance(c, tuple):
            text, heat = c
            return Cell(str(text), None if heat is None else max(0.0, min(1.0, heat)))
        return Cell(str(c))
    return Table(list(head), [[cell(c) for c in row] for row in rows], numeric)


def task_names(evals: dict) -> list[str]:
    return list(dict.fromkeys(t for e in evals.values() for t in (e.get("tasks") or {})))


def _with_tasks(data) -> dict:
    return {s: e for s, e in data["evals"].items() if e.get("tasks")}


def table_stages(data) -> Table:
    rows = []
    for r in data["stages"]:
        h = r["headline"]
        result = ", ".join(f"{k.replace('_', ' ')} {fmt(v) if isinstance(v, float) else fmt_count(v)}"
                           for k, v in h.items())
        if r["error"]:
            result = (result + "; " if result else "") + str(r["error"])
        rows.append([Cell(label(r["stage"]), dot=color(r["stage"])), Cell(r["status"], badge=r["status"]),
                     fmt_seconds(r["seconds"]), fmt_count(r["steps"]), fmt_count(r["tokens"]), result or ""])
    return _table(["stage", "status", "time", "steps", "tokens", "result"], rows,
                  (False, False, True, True, True, False))


def table_throughput(data) -> Table | None:
    rows = []
    for r in data["throughput"]:
        rows.append([label(r["stage"]), f"{r['minutes']:g} min" if r["minutes"] else "steps",
                     fmt_count(r["steps"]), fmt_count(r["expected_steps"]),
                     fmt_count(round(r["tok_per_s"])) if num(r["tok_per_s"]) else "—",
                     fmt(r["steps_per_minute"], 1) if num(r["steps_per_minute"]) else "—",
                     "low" if r["warning"] else ""])
    head = ["stage", "budget", "steps", "expected steps", "tokens/s", "steps/min", ""]
    return _table(head, rows) if rows else None


def table_accuracy(data) -> Table:
    evals = _with_tasks(data)
    tasks = task_names(evals)
    head = ["stage"] + [t.replace("_", " ") for t in tasks] + ["mean"]
    rows = []
    for s, ev in evals.items():
        vals = [num((ev["tasks"].get(t) or {}).get("greedy")) for t in tasks]
        rows.append([label(s)] + [(pct(v), v) for v in vals] + [(pct(mean_acc(ev)), mean_acc(ev))])
    return _table(head, rows)


def table_decoding(data) -> Table | None:
    evals = _with_tasks(data)
    keys = [(k, name) for k, name in DECODING if any(mean_acc(e, k) is not None for e in evals.values())]
    if len(keys) < 2:
        return None
    head = ["stage"] + [name for _, name in keys]
    return _table(head, [[label(s)] + [(pct(mean_acc(e, k)), mean_acc(e, k)) for k, _ in keys]
                         for s, e in evals.items()])


def table_cot(data) -> Table | None:
    evals = _with_tasks(data)
    tasks = task_names(evals)
    pairs = [(t[:-4] + "_direct", t) for t in tasks if t.endswith("_cot") and t[:-4] + "_direct" in tasks]
    if not pairs:
        return None
    head = ["stage"]
    for d, c in pairs:
        stem = d[:-7].replace("_", " ")
        head += [f"{stem}: direct", f"{stem}: CoT", "Δ"]
    rows = []
    for s, ev in evals.items():
        row = [label(s)]
        for d, c in pairs:
            a, b = (num((ev["tasks"].get(t) or {}).get("greedy")) for t in (d, c))
            row += [(pct(a), a), (pct(b), b),
                    (f"{100 * (b - a):+.1f} pts" if a is not None and b is not None else "—", None)]
        rows.append(row)
    return _table(head, rows)


def table_json(data) -> Table | None:
    rows = [[label(s), (pct(j.get("constrained")), num(j.get("constrained"))),
             (pct(j.get("unconstrained")), num(j.get("unconstrained")))]
            for s, e in data["evals"].items() if isinstance(j := e.get("json_validity"), dict)]
    return _table(["stage", "constrained decoding", "unconstrained"], rows) if rows else None


def table_alignment(data) -> Table | None:
    """The alignment table: each chat stage's held-out accuracy (mean over tasks, greedy and sampled), KL to
    the SFT model and mean policy entropy on its own samples; and, where the evaluation measured it, accuracy on
    the RL stages' own task (pipeline.json "rl_task"; eval/<stage>.json "rl_target") on more problems."""
    rows, target = [], None
    for s, e in data["evals"].items():
        a = e.get("alignment")
        if not isinstance(a, dict):
            continue
        g, smp = mean_acc(e, "greedy"), mean_acc(e, "sample")
        row = [label(s), (pct(g), g), (pct(smp), smp), (fmt(a.get("kl_to_sft")), None),
               (fmt(a.get("entropy")), None)]
        rl = e.get("rl_target")
        if isinstance(rl, dict):   # the RL stages' own task, on enough problems to see a few points
            target = target or rl
            row += [(pct(rl.get("greedy")), num(rl.get("greedy"))), (pct(rl.get("sample")), num(rl.get("sample")))]
        rows.append(row)
    head = ["stage", "accuracy (greedy)", "accuracy (sampled)", "KL to SFT (nats/reply)", "policy entropy (nats/token)"]
    if target and all(len(r) == len(head) + 2 for r in rows):
        task = str(target.get("task") or data.get("rl_task") or "RL task")
        what = f"{task.replace('_', ' ')}, {target.get('n', '?')} problems"
        head += [f"{what} (greedy)", f"{what} (T={target.get('temperature', 1.0):g})"]
    else:
        rows = [r[:len(head)] for r in rows]
    return _table(head, rows) if rows else None


def table_retrieval(data) -> Table | None:
    rows = [[label(s), (pct(r.get("accuracy_without")), num(r.get("accuracy_without"))),
             (pct(r.get("accuracy_with_retrieval")), num(r.get("accuracy_with_retrieval"))),
             (pct(r.get("accuracy_gold_context")), num(r.get("accuracy_gold_context"))),
             (pct(r.get("retrieval_recall")), None)]
            for s, e in data["evals"].items() if isinstance(r := e.get("retrieval"), dict)]
    head = ["stage", "no context (memory)", "retrieved context", "gold context", "retrieval recall"]
    return _table(head, rows) if rows else None


def collapse_points(data) -> list[tuple[str, bool, dict]]:
    """(stage, mixed with its base model?, diversity measurements) for every measurement in the evals."""
    pts = []
    for s, ev in data["evals"].items():
        for key, mixed in (("diversity", False), ("diversity_mixed", True)):
            if isinstance(ev.get(key), dict):
                pts.append((s, mixed, ev[key]))
    return pts


def table_collapse(data) -> Table | None:
    pts = collapse_points(data)
    if not pts:
        return None
    head = ["model"] + [name for _, name in COLLAPSE_COLS]
    rows = []
    for s, mixed, d in pts:
        rows.append([label(s) + (" + base mix" if mixed else "")] +
                    [(fmt(d.get(k)), num(d.get(k)) if k == "quality" else None) for k, _ in COLLAPSE_COLS])
    return _table(head, rows)


def table_rm(data) -> Table | None:
    rm = data["runs"].get(REWARD_MODEL)
    last = ((rm or {}).get("state") or {}).get("last") or {}
    keys = [("val_accuracy", "validation pair accuracy", pct), ("val_margin", "validation score margin", fmt),
            ("val_loss", "validation loss", fmt), ("accuracy", "train pair accuracy (last step)", pct),
            ("val_pairs", "validation pairs", fmt_count)]
    rows = [[name, f(last[k])] for k, name, f in keys if num(last.get(k)) is not None]
    if data["prefs_pairs"] is not None:
        rows.append(["preference pairs (prefs.jsonl)", fmt_count(data["prefs_pairs"])])
    return _table(["reward model", "value"], rows) if rows else None


TABLES = {"stages": table_stages, "throughput": table_throughput, "accuracy": table_accuracy,
          "decoding": table_decoding, "cot": table_cot, "json": table_json, "retrieval": table_retrieval,
          "collapse": table_collapse, "alignment": table_alignment, "rm": table_rm}


# ---- facts (short lists of sentences) ---------------------------------------------------------------------

def machine_lines(data: dict) -> list[str]:
    m = data.get("machine")
    if not m:
        return []
    cpu = m.get("cpu") or {}
    probe = m.get("bf16_probe") or {}
    lines = [f"CPU: {cpu.get('model', '?')} ({cpu.get('arch', '?')}, {cpu.get('cores', '?')} cores; flags: "
             f"{', '.join(cpu.get('flags') or []) or 'none of interest'})",
             f"device {m.get('device', '?')}" + (f" ({m['gpu']})" if m.get("gpu") else "")
             + f", {m.get('threads', '?')} torch threads, torch {m.get('torch', '?')}",
             f"precision: training autocast {m.get('autocast', '?')}, Muon orthogonalisation "
             f"{m.get('optimizer_matmul', '—')}"]
    if probe:
        verdict = "fast: bf16 used" if probe.get("fast") else "slow: fp32 used"
        if probe.get("forced_by_env"):
            lines.append(f"bf16: {verdict} (forced by GPTSTACK_CPU_BF16={probe['forced_by_env']}; no probe run)")
        else:
            lines.append(f"bf16 probe: a bf16 matmul took {probe.get('bf16_over_fp32')}x the fp32 time ({verdict})")
    return lines


def pretraining_facts(data: dict, pretrain: str) -> str | None:
    """One sentence on the pretraining run: tokens, steps, epochs, tokens per parameter (None without one)."""
    base = data["runs"].get(pretrain)
    if not base:
        return None
    st = base["state"]
    data_meta = (base["config"] or {}).get("data") or {}
    facts = [f"{fmt_count(st.get('tokens'))} tokens seen in {fmt_count(st.get('step'))} steps"]
    if data_meta.get("train_tokens"):
        facts.append(f"corpus {fmt_count(data_meta['train_tokens'])} training tokens "
                     f"({(st.get('tokens') or 0) / data_meta['train_tokens']:.2f} epochs)")
    params = data["summary"]["params"]
    if params and st.get("tokens"):
        facts.append(f"{st['tokens'] / params:.2g} tokens per parameter (Chinchilla-optimal: ~20)")
    return "; ".join(facts) + "."


def low_throughput(data: dict) -> list[str]:
    """Labels of the stages whose time budget bought far fewer steps than the preset expects."""
    return [label(r["stage"]) for r in data["throughput"] if r["warning"]]


# ---- sample conversations ---------------------------------------------------------------------------------

def messages(prompt) -> list[dict]:
    """A sample's prompt as chat messages ({"role", "content"} strings)."""
    msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": "" if prompt is None else prompt}]
    return [{"role": str(m.get("role", "user")), "content": str(m.get("content", ""))}
            for m in msgs if isinstance(m, dict)]


def verdict(sample: dict) -> tuple[bool, str] | None:
    """(good?, text) from a sample's task reward, or None when it has none."""
    score = num(sample.get("reward", sample.get("correct")))
    if score is None:
        return None
    return score >= 0.5, "✓ correct" if score >= 1 else "✗ wrong" if score <= 0 else f"reward {score:.2f}"


def sample_groups(data, per_stage: int) -> list[tuple[object, str, list[tuple[str, dict]]]]:
    """(prompt, task, [(stage, sample)]): each stage's first `per_stage` prompts, with every stage's reply to
    them, so one card shows how the answer to a question changed from stage to stage."""
    groups: dict[str, tuple[object, str, list]] = {}
    for s, ev in data["evals"].items():
        samples = [x for x in (ev.get("samples") or []) if isinstance(x, dict)]
        for i, x in enumerate(samples):
            key = json.dumps(x.get("prompt"), sort_keys=True, default=str)
            if key not in groups and i >= per_stage:
                continue
            g = groups.setdefault(key, (x.get("prompt"), str(x.get("task") or ""), []))
            if all(stage != s for stage, _ in g[2]):
                g[2].append((s, x))
    return list(groups.values())


def conversations(data, per_stage: int) -> list[dict]:
    """The sample cards: {"task", "messages": [{"role", "content"}], "replies": [{"stage", "label", "color",
    "verdict", "reply"}]}."""
    return [{"task": task.replace("_", " ") or "prompt", "messages": messages(prompt),
             "replies": [{"stage": s, "label": label(s), "color": color(s), "verdict": verdict(x),
                          "reply": str(x.get("reply", ""))} for s, x in replies]}
            for prompt, task, replies in sample_groups(data, per_stage)]
