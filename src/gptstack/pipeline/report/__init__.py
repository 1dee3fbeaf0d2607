"""The pipeline report: one page that shows what a run made, rebuilt from the run directories alone.

    build_report(RUN_ROOT) -> RUN_ROOT/report.html   (+ report.md, report.json, report_files/*.png)

It reads what the stages left behind and nothing else:

    RUN_ROOT/pipeline.json         {"preset": ..., "stages": {name: {"seconds", "status": done|skipped|failed, ...}}}
    RUN_ROOT/<run>/                config.json, metrics.jsonl, trainer_state.json of base, sft, sft_lora, rm,
                                   grpo, ppo, dpo (and any other run directory found)
    RUN_ROOT/eval/<stage>.json     {"stage", "tasks": {task: {"greedy", "sample", "vote"?, "best_of"?}},
                                    "json_validity"?: {"constrained", "unconstrained"},
                                    "diversity"?: measure_stage(...), "diversity_mixed"?: measure_stage(...),
                                    "samples"?: [{"prompt": str | messages, "reply": str, "task"?, "reward"?}]}

Every piece is optional: a skipped or failed stage is shown as such and the page says what is missing.
The HTML is self-contained (plots are base64 PNGs drawn with matplotlib's Agg canvas, CSS is inline, the only
links are in-page anchors), so it can be mailed or archived as one file. The Markdown carries the same tables
and links the plots in report_files/; the JSON is the collected numbers for machines.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import time
from pathlib import Path

from ...errors import DataError
from ...io import atomic_write_bytes

RUN_DIRS = ("base", "sft", "sft_lora", "rm", "grpo", "ppo", "ppo_task", "dpo", "distill")
POLICY_STAGES = ("base", "sft", "sft_lora", "grpo", "ppo", "ppo_task", "dpo", "distill")  # evaluated on tasks
PIPELINE_ORDER = ("tokenizer", "base", "sft", "sft_lora", "prefs", "rm", "grpo", "ppo", "ppo_task", "dpo", "distill",
                  "eval", "report")
LABELS = {"tokenizer": "Tokenizer", "base": "Base (pretrain)", "sft": "SFT", "sft_lora": "SFT · LoRA",
          "prefs": "Preference pairs", "rm": "Reward model", "grpo": "GRPO (task)", "ppo": "PPO (RM)",
          "ppo_task": "PPO (task)", "dpo": "DPO",
          "distill": "Distilled (LoRA ← SFT)", "eval": "Evaluation", "report": "Report"}
COLORS = {"base": "#6b7280", "sft": "#2563eb", "sft_lora": "#0891b2", "rm": "#dc2626", "grpo": "#16a34a",
          "ppo": "#d97706", "ppo_task": "#b45309", "dpo": "#9333ea", "distill": "#db2777"}
EXTRA_COLORS = ("#db2777", "#65a30d", "#0f766e", "#7c3aed", "#b45309")
DECODING = (("greedy", "greedy"), ("sample", "sample (T=1)"), ("vote", "self-consistency vote"),
            ("best_of", "best-of-n (RM)"))
COLLAPSE_COLS = (("entropy", "entropy (nats)"), ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
                 ("distinct_3", "distinct-3"), ("self_bleu", "self-BLEU ↓"), ("embedding_similarity", "embed. sim ↓"),
                 ("quality", "quality"))
SECTIONS = (("stages", "Stages & time"), ("machine", "Machine"), ("pretraining", "Pretraining"), ("sft", "SFT"),
            ("accuracy", "Task accuracy"), ("collapse", "Model collapse"), ("alignment", "Reward model & RL"),
            ("samples", "Samples"))


def label(stage: str) -> str:
    return LABELS.get(stage, stage)


def color(stage: str) -> str:
    if stage in COLORS:
        return COLORS[stage]
    return EXTRA_COLORS[sum(map(ord, stage)) % len(EXTRA_COLORS)]


# ---- reading the run --------------------------------------------------------------------------------------

def _read_json(path: Path, notes: list[str]):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        notes.append(f"{path.name} in {path.parent.name}/ is unreadable ({type(e).__name__}); ignored")
        return None


def _read_metrics(path: Path, notes: list[str]) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a metrics.jsonl; a torn last line is skipped."""
    train, evals, bad = [], [], 0
    if not path.exists():
        return train, evals
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            (train if "lr_mult" in rec or "loss" in rec else evals).append(rec)
    if bad:
        notes.append(f"{path.parent.name}/metrics.jsonl: {bad} unreadable line(s) skipped")
    return train, evals


def _is_run_dir(d: Path) -> bool:
    return any((d / f).exists() for f in ("trainer_state.json", "metrics.jsonl", "config.json"))


def collect(run_root: str | Path) -> dict:
    """Everything the report shows, as plain data (this is report.json)."""
    root = Path(run_root)
    if not root.is_dir():
        raise DataError(f"run directory '{root}' does not exist: give the --out directory of a "
                        f"`gptstack pipeline` run")
    notes: list[str] = []
    pipeline = _read_json(root / "pipeline.json", notes) or {}
    if not isinstance(pipeline, dict) or not isinstance(pipeline.get("stages", {}), dict):
        notes.append("pipeline.json is not {\"stages\": {name: {...}}}; ignored")
        pipeline = {}
    names = [n for n in RUN_DIRS if (root / n).is_dir()]
    names += sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in RUN_DIRS
                    and d.name not in ("eval", "tokenizer", "report_files") and _is_run_dir(d))
    runs = {}
    for n in names:
        d = root / n
        if not _is_run_dir(d):
            continue
        train, evals = _read_metrics(d / "metrics.jsonl", notes)
        runs[n] = {"config": _read_json(d / "config.json", notes) or {},
                   "state": _read_json(d / "trainer_state.json", notes) or {}, "train": train, "eval": evals}
    evals = {}
    if (root / "eval").is_dir():
        for f in sorted((root / "eval").glob("*.json")):
            data = _read_json(f, notes)
            if isinstance(data, dict):
                evals[str(data.get("stage") or f.stem)] = data
    order = {s: i for i, s in enumerate(POLICY_STAGES)}
    evals = dict(sorted(evals.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    if not runs and not evals and not pipeline and not (root / "tokenizer").is_dir():
        raise DataError(f"'{root}' holds no pipeline outputs (no pipeline.json, eval/ or run directories "
                        f"such as base/ or sft/): is it the --out directory of a `gptstack pipeline` run?")
    tokenizer = _read_json(root / "tokenizer" / "meta.json", notes) if (root / "tokenizer").is_dir() else None
    data = {"run_root": str(root.resolve()), "built": time.strftime("%Y-%m-%d %H:%M"), "pipeline": pipeline,
            "runs": runs, "evals": evals, "tokenizer": tokenizer, "notes": notes,
            "prefs_pairs": _count_lines(root / "prefs.jsonl")}
    data["stages"] = _stage_table(data)
    data["machine"] = _machine(data)
    data["throughput"] = _throughput(data)
    data["missing"] = _missing(data)
    data["summary"] = _summary(data)
    return data


def _count_lines(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def _stage_table(data: dict) -> list[dict]:
    """One row per pipeline stage: status, time, steps, tokens, headline numbers."""
    pstages = data["pipeline"].get("stages") or {}
    names = [n for n in PIPELINE_ORDER if n in pstages or n in data["runs"]
             or (n == "tokenizer" and data["tokenizer"]) or (n == "prefs" and data["prefs_pairs"] is not None)
             or (n == "eval" and data["evals"])]
    names += [n for n in list(pstages) + list(data["runs"]) if n not in names]
    rows = []
    for n in dict.fromkeys(names):
        p = pstages.get(n) or {}
        run = data["runs"].get(n) or {}
        state = run.get("state") or {}
        status = p.get("status") or ("done" if state.get("finished") else "partial" if state else "done")
        seconds = p.get("seconds", state.get("elapsed"))
        if status == "skipped" and not _num(seconds):
            seconds = None
        last = state.get("last") or {}
        headline = {k: last[k] for k in ("val_bpb", "val_loss", "val_accuracy", "reward", "eval_accuracy",
                                         "val_reward_margin") if isinstance(last.get(k), (int, float))}
        if n == "tokenizer" and data["tokenizer"]:
            headline["vocab_size"] = data["tokenizer"].get("vocab_size")
        if n == "prefs" and data["prefs_pairs"] is not None:
            headline["pairs"] = data["prefs_pairs"]
        rows.append({"stage": n, "status": status, "seconds": seconds, "steps": state.get("step"),
                     "tokens": state.get("tokens"), "headline": headline,
                     "error": p.get("error") or p.get("message") if status == "failed" else None})
    return rows


# A time-budgeted stage that reached fewer than this share of its expected steps gets a warning.
LOW_THROUGHPUT_SHARE = 0.5


def _machine(data: dict) -> dict | None:
    """The machine the runs recorded (config.json "machine"); the first training stage's, in pipeline order."""
    for n in list(RUN_DIRS) + list(data["runs"]):
        m = ((data["runs"].get(n) or {}).get("config") or {}).get("machine")
        if isinstance(m, dict):
            return m
    return None


def _throughput(data: dict) -> list[dict]:
    """Per training stage: budget, steps reached vs the steps the preset expects, tokens/s, and a warning when
    a time budget bought far fewer steps than expected (a slow or busy machine trains a weaker model)."""
    pstages = data["pipeline"].get("stages") or {}
    rows = []
    for n, run in data["runs"].items():
        cfg, state = run.get("config") or {}, run.get("state") or {}
        tp = cfg.get("throughput") or {}
        budget = tp.get("budget") or {}
        minutes = _num(budget.get("minutes")) if budget else _num((cfg.get("train") or {}).get("minutes"))
        steps = state.get("step") if isinstance(state.get("step"), int) else tp.get("steps")
        expected = (pstages.get(n) or {}).get("expected_steps")
        row = {"stage": n, "minutes": minutes or None, "steps": steps, "expected_steps": expected,
               "tok_per_s": tp.get("tok_per_s"), "steps_per_minute": tp.get("steps_per_minute"),
               "threads": (cfg.get("machine") or {}).get("threads"),
               "busy_cores": (cfg.get("machine") or {}).get("busy_cores_at_start"), "warning": None}
        if minutes and isinstance(expected, int) and isinstance(steps, int) and steps < LOW_THROUGHPUT_SHARE * expected:
            row["warning"] = (f"{label(n)} reached {steps} steps in its {minutes:g}-minute budget; the preset expects "
                              f"~{expected} (its fixed-work budget). This machine trained {steps / expected:.0%} of "
                              f"the planned work, so this stage's model is weaker than the README's: rerun with "
                              f"--budget steps for the same work on any machine"
                              + (f" (other processes kept ~{row['busy_cores']} cores busy at its start)"
                                 if (_num(row["busy_cores"]) or 0) >= 0.75 else ""))
        rows.append(row)
    order = {s: i for i, s in enumerate(PIPELINE_ORDER)}
    return sorted(rows, key=lambda r: order.get(r["stage"], len(order)))


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


def table_throughput(data):
    rows = []
    for r in data["throughput"]:
        rows.append([label(r["stage"]), f"{r['minutes']:g} min" if r["minutes"] else "steps",
                     fmt_count(r["steps"]), fmt_count(r["expected_steps"]),
                     fmt_count(round(r["tok_per_s"])) if _num(r["tok_per_s"]) else "—",
                     fmt(r["steps_per_minute"], 1) if _num(r["steps_per_minute"]) else "—",
                     "low" if r["warning"] else ""])
    return (["stage", "budget", "steps", "expected steps", "tokens/s", "steps/min", ""], rows) if rows else None


def _missing(data: dict) -> list[str]:
    pstages = data["pipeline"].get("stages") or {}
    out = []
    for n in RUN_DIRS:
        st = (pstages.get(n) or {}).get("status")
        if n not in data["runs"]:
            out.append(f"{label(n)} ({n}/): " + ({"skipped": "skipped", "failed": "failed"}.get(st, "not found")))
        elif not data["runs"][n]["state"]:
            out.append(f"{label(n)} ({n}/): no trainer_state.json (unfinished or interrupted)")
    if unevaluated := [s for s in POLICY_STAGES if s in data["runs"] and s not in data["evals"]]:
        out.append("evaluation results (eval/<stage>.json) for " + ", ".join(label(s) for s in unevaluated))
    if not data["pipeline"]:
        out.append("pipeline.json (stage timings come from trainer_state.json instead)")
    return out


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _params(model: dict) -> int | None:
    """Parameter count from a model config (matrices only; norms are a rounding error)."""
    try:
        C, L, V, H = model["n_embd"], model["n_layer"], model["vocab_size"], model["mlp_hidden"]
        kv = model.get("n_kv_head", model["n_head"]) * C // model["n_head"]
        per_layer = 2 * C * C + 2 * C * kv + 3 * C * H
        return V * C * (1 if model.get("tie_embeddings") else 2) + L * per_layer
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def _mean_acc(ev: dict, key: str = "greedy") -> float | None:
    vals = [_num(t.get(key)) for t in (ev.get("tasks") or {}).values() if isinstance(t, dict)]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def _summary(data: dict) -> dict:
    p, runs = data["pipeline"], data["runs"]
    base = runs.get("base") or {}
    last = (base.get("state") or {}).get("last") or {}
    bpb = _num(last.get("val_bpb"))
    if bpb is None:
        bpbs = [r["val_bpb"] for r in base.get("eval", []) if _num(r.get("val_bpb")) is not None]
        bpb = bpbs[-1] if bpbs else None
    model = (base.get("config") or {}).get("model") or next(
        ((r.get("config") or {}).get("model") for r in runs.values() if (r.get("config") or {}).get("model")), None)
    total = _num(p.get("total_seconds"))
    if total is None:
        secs = [_num(r["seconds"]) for r in data["stages"]]
        total = sum(s for s in secs if s is not None) or None
    accs = {s: _mean_acc(ev) for s, ev in data["evals"].items()}
    accs = {s: a for s, a in accs.items() if a is not None}
    best = max(accs, key=accs.get) if accs else None
    rm_last = ((runs.get("rm") or {}).get("state") or {}).get("last") or {}
    preset = p.get("preset") or (p.get("config") or {}).get("preset")
    return {"preset": preset, "total_seconds": total, "final_val_bpb": bpb,
            "pretrain_tokens": (base.get("state") or {}).get("tokens"),
            "model": {k: model.get(k) for k in ("n_layer", "n_embd", "n_head", "vocab_size", "seq_len")} if model else None,
            "params": _params(model) if model else None,
            "best_stage": best, "best_accuracy": accs.get(best) if best else None,
            "rm_val_accuracy": _num(rm_last.get("val_accuracy")),
            "failed": [r["stage"] for r in data["stages"] if r["status"] == "failed"]}


# ---- formatting -------------------------------------------------------------------------------------------

def fmt_seconds(s) -> str:
    s = _num(s)
    if s is None:
        return "—"
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_count(n) -> str:
    n = _num(n)
    if n is None:
        return "—"
    for div, suf in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suf}"
    return f"{n:.0f}"


def fmt(x, digits: int = 3) -> str:
    x = _num(x)
    return "—" if x is None else f"{x:.{digits}f}"


def pct(x) -> str:
    x = _num(x)
    return "—" if x is None else f"{100 * x:.1f}%"


# ---- plots ------------------------------------------------------------------------------------------------

def _figure(ncols: int = 1, width: float = 10.5, height: float = 3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)     # no pyplot: no global state, no display backend
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, color="#e5e7eb", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        for side in ("left", "bottom"):
            ax.spines[side].set_color("#9ca3af")
        ax.tick_params(colors="#374151", labelsize=9)
    return fig, axes


def _title(ax, text: str) -> None:
    ax.set_title(text, loc="left", fontsize=11, color="#111827", fontweight="bold")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def _smooth(ys: list[float], half: int) -> list[float]:
    """Centred moving average (the window shrinks at the ends): no lag, unlike an EMA."""
    out = []
    for i in range(len(ys)):
        w = min(half, i, len(ys) - 1 - i)
        out.append(sum(ys[i - w:i + w + 1]) / (2 * w + 1))
    return out


def _series(records: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    pts = [(_num(r.get(x)), _num(r.get(key))) for r in records]
    pts = [(a, b) for a, b in pts if a is not None and b is not None]
    return [a for a, _ in pts], [b for _, b in pts]


def _curve(ax, xs, ys, stage: str, name: str | None = None, smooth: bool = False) -> None:
    if not xs:
        return
    c = color(stage)
    if smooth and len(ys) > 8:
        ax.plot(xs, ys, color=c, alpha=0.25, linewidth=1)
        ax.plot(xs, _smooth(ys, max(2, len(ys) // 20)), color=c, linewidth=2, label=name or label(stage))
    else:
        ax.plot(xs, ys, color=c, linewidth=2, marker="o" if len(xs) < 12 else None, markersize=3.5,
                label=name or label(stage))


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=9)


def plot_pretraining(data) -> bytes | None:
    base = data["runs"].get("base")
    if not base or not (base["train"] or base["eval"]):
        return None
    fig, (a, b) = _figure(2)
    xs, ys = _series(base["train"], "loss", "tokens")
    _curve(a, xs, ys, "base", "train loss", smooth=True)
    vx, vy = _series(base["eval"], "val_loss", "tokens")
    if vx:
        a.plot(vx, vy, color="#111827", linewidth=1.5, linestyle="--", marker="o", markersize=4, label="val loss")
    _title(a, "Loss (nats/token) vs tokens seen")
    a.set_xlabel("tokens", fontsize=9)
    _legend(a)
    bx, by = _series(base["eval"], "val_bpb", "tokens")
    if bx:
        b.plot(bx, by, color=color("base"), linewidth=2, marker="o", markersize=4)
        b.annotate(f"{by[-1]:.3f}", (bx[-1], by[-1]), textcoords="offset points", xytext=(-6, 8), ha="right",
                   fontsize=9, color="#111827")
    else:
        b.text(0.5, 0.5, "no validation evaluations logged", ha="center", va="center", transform=b.transAxes,
               color="#6b7280")
    _title(b, "Validation bits per byte")
    b.set_xlabel("tokens", fontsize=9)
    if xs or vx:
        b.set_xlim(a.get_xlim())      # same token axis as the loss panel, even with one evaluation
    for ax in (a, b):
        ax.xaxis.set_major_formatter(_count_formatter())
    return _png(fig)


def _count_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: fmt_count(v) if v else "0")


def plot_sft(data) -> bytes | None:
    stages = [s for s in ("sft", "sft_lora") if data["runs"].get(s) and data["runs"][s]["train"]]
    if not stages:
        return None
    fig, (a, b) = _figure(2)
    for s in stages:
        xs, ys = _series(data["runs"][s]["train"], "loss")
        _curve(a, xs, ys, s, smooth=True)
        vx, vy = _series(data["runs"][s]["eval"], "val_loss")
        _curve(b, vx, vy, s)
    _title(a, "Training loss (assistant tokens)")
    _title(b, "Validation loss")
    if not b.lines:
        b.text(0.5, 0.5, "no validation evaluations logged", ha="center", va="center", transform=b.transAxes,
               color="#6b7280")
    for ax in (a, b):
        ax.set_xlabel("step", fontsize=9)
        _legend(ax)
    return _png(fig)


RL_KEYS = (("reward", "Reward (mean of rollouts)"), ("kl", "KL to reference"), ("entropy", "Policy entropy (nats)"))
DPO_KEYS = (("accuracy", "val_accuracy", "Preference accuracy"),
            ("reward_margin", "val_reward_margin", "Implicit reward margin"))
RM_KEYS = (("accuracy", "val_accuracy", "Pair accuracy"), ("margin", "val_margin", "Score margin (chosen − rejected)"))


def plot_rl(data) -> bytes | None:
    stages = [s for s, r in data["runs"].items() if any(k in rec for rec in r["train"] for k, _ in RL_KEYS)
              and s not in ("dpo", "rm")]
    if not stages:
        return None
    fig, axes = _figure(3, height=3.2)
    for ax, (key, title) in zip(axes, RL_KEYS):
        for s in stages:
            xs, ys = _series(data["runs"][s]["train"], key)
            _curve(ax, xs, ys, s, smooth=True)
        _title(ax, title)
        ax.set_xlabel("step", fontsize=9)
    _legend(axes[0])
    return _png(fig)


def _plot_pairs(run: dict, keys, stage: str) -> bytes | None:
    if not any(k in rec for rec in run["train"] for k, _, _ in keys):
        return None
    fig, axes = _figure(len(keys), height=3.0)
    for ax, (key, val_key, title) in zip(axes, keys):
        xs, ys = _series(run["train"], key)
        _curve(ax, xs, ys, stage, "train", smooth=True)
        vx, vy = _series(run["eval"], val_key)
        if vx:
            ax.plot(vx, vy, color="#111827", linestyle="--", linewidth=1.5, marker="o", markersize=4, label="validation")
        _title(ax, title)
        ax.set_xlabel("step", fontsize=9)
        _legend(ax)
    return _png(fig)


def plot_time(data) -> bytes | None:
    rows = [(r["stage"], _num(r["seconds"])) for r in data["stages"] if _num(r["seconds"])]
    if not rows:
        return None
    fig, (ax,) = _figure(1, height=0.26 * len(rows) + 0.9)
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [s for _, s in rows], color=[color(n) if n in COLORS else "#94a3b8" for n, _ in rows], height=0.62)
    ax.set_yticks(ys, [label(n) for n, _ in rows])
    for y, (_, s) in zip(ys, rows):
        ax.text(s, y, "  " + fmt_seconds(s), va="center", fontsize=9, color="#374151")
    ax.set_xlim(0, max(s for _, s in rows) * 1.18)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("seconds", fontsize=9)
    _title(ax, "Wall-clock time per stage")
    return _png(fig)


def plot_accuracy(data) -> bytes | None:
    evals = {s: e for s, e in data["evals"].items() if e.get("tasks")}
    tasks = _task_names(evals)
    if not tasks:
        return None
    import numpy as np

    fig, (ax,) = _figure(1, height=3.6)
    width = 0.8 / len(evals)
    x = np.arange(len(tasks))
    for i, (s, ev) in enumerate(evals.items()):
        vals = [_num((ev["tasks"].get(t) or {}).get("greedy")) for t in tasks]
        ax.bar(x + (i - (len(evals) - 1) / 2) * width, [v or 0 for v in vals], width * 0.92, color=color(s),
               label=label(s))
    ax.set_xticks(x, [t.replace("_", " ") for t in tasks], fontsize=9)
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(_pct_formatter())
    ax.grid(axis="x", visible=False)
    _title(ax, "Greedy task accuracy by stage")
    ax.legend(frameon=False, fontsize=9, ncol=min(6, len(evals)), loc="upper left", bbox_to_anchor=(0, -0.12))
    return _png(fig)


def _pct_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{100 * v:.0f}%")


def _collapse_points(data) -> list[tuple[str, bool, dict]]:
    pts = []
    for s, ev in data["evals"].items():
        for key, mixed in (("diversity", False), ("diversity_mixed", True)):
            if isinstance(ev.get(key), dict):
                pts.append((s, mixed, ev[key]))
    return pts


def plot_collapse(data) -> bytes | None:
    pts = [(s, m, d) for s, m, d in _collapse_points(data) if _num(d.get("quality")) is not None]
    if not pts:
        return None
    fig, axes = _figure(2, height=3.7)
    for ax, (key, ylabel) in zip(axes, (("distinct_2", "distinct-2 (higher: more varied wording)"),
                                        ("entropy", "next-token entropy (nats)"))):
        plain = {s: d for s, m, d in pts if not m}
        for s, mixed, d in pts:
            x, y = _num(d.get("quality")), _num(d.get(key))
            if y is None:
                continue
            ax.scatter([x], [y], s=70, color="white" if mixed else color(s), edgecolors=color(s), linewidths=2,
                       zorder=3)
            ax.annotate(label(s) + (" + base mix" if mixed else ""), (x, y), textcoords="offset points",
                        xytext=(7, 5), fontsize=8.5, color="#374151")
            if mixed and s in plain and _num(plain[s].get(key)) is not None:
                ax.annotate("", xy=(x, y), xytext=(plain[s]["quality"], plain[s][key]),
                            arrowprops=dict(arrowstyle="->", color=color(s), lw=1.3, alpha=0.7))
        ax.set_xlabel("quality (mean task reward of the samples)", fontsize=9)
        _title(ax, ylabel)
        ax.margins(0.18)
    return _png(fig)


def _task_names(evals: dict) -> list[str]:
    return list(dict.fromkeys(t for e in evals.values() for t in (e.get("tasks") or {})))


# ---- tables (shared by HTML and Markdown: header + rows of (text, heat value or None)) ----------------------

def table_stages(data):
    head = ["stage", "status", "time", "steps", "tokens", "result"]
    rows = []
    for r in data["stages"]:
        h = r["headline"]
        result = ", ".join(f"{k.replace('_', ' ')} {fmt(v) if isinstance(v, float) else fmt_count(v)}"
                           for k, v in h.items())
        if r["error"]:
            result = (result + "; " if result else "") + str(r["error"])
        rows.append([label(r["stage"]), r["status"], fmt_seconds(r["seconds"]), fmt_count(r["steps"]),
                     fmt_count(r["tokens"]), result or ""])
    return head, rows


def table_accuracy(data):
    evals = {s: e for s, e in data["evals"].items() if e.get("tasks")}
    tasks = _task_names(evals)
    head = ["stage"] + [t.replace("_", " ") for t in tasks] + ["mean"]
    rows = []
    for s, ev in evals.items():
        vals = [_num((ev["tasks"].get(t) or {}).get("greedy")) for t in tasks]
        rows.append([label(s)] + [(pct(v), v) for v in vals] + [(pct(_mean_acc(ev)), _mean_acc(ev))])
    return head, rows


def table_decoding(data):
    evals = {s: e for s, e in data["evals"].items() if e.get("tasks")}
    keys = [(k, name) for k, name in DECODING if any(_mean_acc(e, k) is not None for e in evals.values())]
    if len(keys) < 2:
        return None
    head = ["stage"] + [name for _, name in keys]
    return head, [[label(s)] + [(pct(_mean_acc(e, k)), _mean_acc(e, k)) for k, _ in keys] for s, e in evals.items()]


def table_cot(data):
    evals = {s: e for s, e in data["evals"].items() if e.get("tasks")}
    tasks = _task_names(evals)
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
            a, b = (_num((ev["tasks"].get(t) or {}).get("greedy")) for t in (d, c))
            row += [(pct(a), a), (pct(b), b),
                    (f"{100 * (b - a):+.1f} pts" if a is not None and b is not None else "—", None)]
        rows.append(row)
    return head, rows


def table_json(data):
    rows = [[label(s), (pct(j.get("constrained")), _num(j.get("constrained"))),
             (pct(j.get("unconstrained")), _num(j.get("unconstrained")))]
            for s, e in data["evals"].items() if isinstance(j := e.get("json_validity"), dict)]
    return (["stage", "constrained decoding", "unconstrained"], rows) if rows else None


def table_alignment(data):
    """The alignment table: each chat stage's held-out accuracy (mean over tasks, greedy and sampled), KL to
    the SFT model and mean policy entropy on its own samples."""
    rows, target = [], None
    for s, e in data["evals"].items():
        a = e.get("alignment")
        if not isinstance(a, dict):
            continue
        g, smp = _mean_acc(e, "greedy"), _mean_acc(e, "sample")
        row = [label(s), (pct(g), g), (pct(smp), smp), (fmt(a.get("kl_to_sft")), None),
               (fmt(a.get("entropy")), None)]
        rl = e.get("rl_target")
        if isinstance(rl, dict):   # the RL stages' own task, on enough problems to see a few points
            target = target or rl
            row += [(pct(rl.get("greedy")), _num(rl.get("greedy"))), (pct(rl.get("sample")), _num(rl.get("sample")))]
        rows.append(row)
    head = ["stage", "accuracy (greedy)", "accuracy (sampled)", "KL to SFT (nats/reply)", "policy entropy (nats/token)"]
    if target and all(len(r) == len(head) + 2 for r in rows):
        what = f"{target['task'].replace('_', ' ')}, {target['n']} problems"
        head += [f"{what} (greedy)", f"{what} (T={target.get('temperature', 1.0):g})"]
    else:
        rows = [r[:len(head)] for r in rows]
    return (head, rows) if rows else None


def table_retrieval(data):
    rows = [[label(s), (pct(r.get("accuracy_without")), _num(r.get("accuracy_without"))),
             (pct(r.get("accuracy_with_retrieval")), _num(r.get("accuracy_with_retrieval"))),
             (pct(r.get("accuracy_gold_context")), _num(r.get("accuracy_gold_context"))),
             (pct(r.get("retrieval_recall")), None)]
            for s, e in data["evals"].items() if isinstance(r := e.get("retrieval"), dict)]
    head = ["stage", "no context (memory)", "retrieved context", "gold context", "retrieval recall"]
    return (head, rows) if rows else None


def table_collapse(data):
    pts = _collapse_points(data)
    if not pts:
        return None
    head = ["model"] + [name for _, name in COLLAPSE_COLS]
    rows = []
    for s, mixed, d in pts:
        rows.append([label(s) + (" + base mix" if mixed else "")] +
                    [(fmt(d.get(k)), _num(d.get(k)) if k == "quality" else None) for k, _ in COLLAPSE_COLS])
    return head, rows


def table_rm(data):
    rm = data["runs"].get("rm")
    last = ((rm or {}).get("state") or {}).get("last") or {}
    keys = [("val_accuracy", "validation pair accuracy", pct), ("val_margin", "validation score margin", fmt),
            ("val_loss", "validation loss", fmt), ("accuracy", "train pair accuracy (last step)", pct),
            ("val_pairs", "validation pairs", fmt_count)]
    rows = [[name, f(last[k])] for k, name, f in keys if _num(last.get(k)) is not None]
    if data["prefs_pairs"] is not None:
        rows.append(["preference pairs (prefs.jsonl)", fmt_count(data["prefs_pairs"])])
    return (["reward model", "value"], rows) if rows else None


# ---- HTML -------------------------------------------------------------------------------------------------

CSS = """
:root { --ink:#111827; --muted:#6b7280; --line:#e5e7eb; --bg:#f8fafc; --card:#fff; --accent:#2563eb; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink); line-height:1.5;
  font:15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background:linear-gradient(135deg,#0f172a 0%,#1e3a8a 100%); color:#fff; padding:36px 0 28px; }
.wrap { max-width:1160px; margin:0 auto; padding:0 28px; }
header h1 { margin:0 0 4px; font-size:28px; letter-spacing:-0.02em; font-weight:700; }
header .sub { color:#c7d2fe; font-size:13px; word-break:break-all; }
.tiles { display:grid; grid-template-columns:repeat(auto-fit,minmax(128px,1fr)); gap:10px; margin-top:22px; }
.tile { background:rgba(255,255,255,.08); border:1px solid rgba(255,255,255,.14); border-radius:10px; padding:12px 14px; }
.tile .k { font-size:11px; text-transform:uppercase; letter-spacing:.06em; color:#c7d2fe; }
.tile .v { font-size:21px; font-weight:650; margin-top:2px; font-variant-numeric:tabular-nums; }
.tile .v small { font-size:12px; font-weight:400; color:#c7d2fe; }
nav { position:sticky; top:0; z-index:5; background:rgba(255,255,255,.94); backdrop-filter:blur(6px);
  border-bottom:1px solid var(--line); }
nav .wrap { display:flex; gap:4px; flex-wrap:wrap; padding-top:8px; padding-bottom:8px; }
nav a { color:#374151; text-decoration:none; font-size:13px; padding:4px 10px; border-radius:999px; }
nav a:hover { background:#eef2ff; color:var(--accent); }
section { background:var(--card); border:1px solid var(--line); border-radius:12px; padding:22px 26px;
  margin:22px 0; box-shadow:0 1px 2px rgba(15,23,42,.04); scroll-margin-top:56px; }
h2 { margin:0 0 4px; font-size:20px; letter-spacing:-0.01em; }
h3 { margin:22px 0 8px; font-size:15px; color:#1f2937; }
p.lead { margin:0 0 14px; color:var(--muted); font-size:14px; }
img.plot { display:block; width:100%; height:auto; margin:10px 0 4px; border-radius:6px; }
table { border-collapse:collapse; width:100%; font-size:13.5px; margin:8px 0 6px; }
th { text-align:left; font-weight:600; color:#374151; border-bottom:2px solid var(--line); padding:7px 10px;
  white-space:nowrap; }
td { border-bottom:1px solid var(--line); padding:6px 10px; font-variant-numeric:tabular-nums; }
td.n, th.n { text-align:right; }
tr:last-child td { border-bottom:none; }
.scroll { overflow-x:auto; }
.badge { display:inline-block; font-size:11.5px; font-weight:600; padding:1px 8px; border-radius:999px; }
.b-done { background:#dcfce7; color:#166534; } .b-skipped { background:#f1f5f9; color:#475569; }
.b-failed { background:#fee2e2; color:#991b1b; } .b-partial { background:#fef3c7; color:#92400e; }
.dot { display:inline-block; width:9px; height:9px; border-radius:50%; margin-right:7px; vertical-align:0; }
.notice { border-left:4px solid #f59e0b; background:#fffbeb; padding:10px 14px; border-radius:6px; font-size:13.5px;
  margin:12px 0; }
.notice ul { margin:4px 0 0; padding-left:18px; }
.warn { border-left:4px solid #dc2626; background:#fef2f2; color:#991b1b; padding:10px 14px; border-radius:6px;
  font-size:13.5px; margin:0 0 10px; }
ul.facts { margin:6px 0 12px; padding-left:18px; font-size:13.5px; }
.empty { color:var(--muted); font-style:italic; font-size:14px; }
.convs { display:grid; grid-template-columns:repeat(auto-fit,minmax(340px,1fr)); gap:14px; align-items:start; }
.conv { border:1px solid var(--line); border-radius:10px; padding:12px; background:#fcfcfd; }
.conv .meta { font-size:11.5px; color:var(--muted); margin-bottom:6px; }
.msg { white-space:pre-wrap; word-break:break-word; font-size:13.5px; padding:7px 11px; border-radius:10px;
  margin:6px 0; width:fit-content; max-width:92%; }
.who { font-size:11.5px; color:var(--muted); margin:10px 0 -2px; }
.msg.user { background:#eef2ff; margin-left:auto; border-bottom-right-radius:3px; }
.msg.system { background:#f1f5f9; color:#475569; font-size:12.5px; }
.msg.assistant { background:#fff; border:1px solid var(--line); border-bottom-left-radius:3px;
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:12.5px; }
.ok { color:#15803d; font-weight:600; } .bad { color:#b91c1c; font-weight:600; }
.grid2 { display:grid; grid-template-columns:1fr 1fr; gap:20px; }
@media (max-width: 800px) { .grid2 { grid-template-columns:1fr; } }
footer { color:var(--muted); font-size:12px; text-align:center; padding:10px 0 40px; }
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _heat(v: float | None) -> str:
    if v is None:
        return ""
    v = max(0.0, min(1.0, v))
    return f' style="background:rgba(37,99,235,{0.06 + 0.34 * v:.3f})"'


def _html_table(t) -> str:
    if not t:
        return ""
    head, rows = t
    out = ['<div class="scroll"><table><thead><tr>']
    out += [f'<th{" class=n" if i else ""}>{_e(h)}</th>' for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            text, heat = cell if isinstance(cell, tuple) else (cell, None)
            if i == 0:
                out.append(f"<td>{_e(text)}</td>")
            else:
                out.append(f'<td class="n"{_heat(heat)}>{_e(text)}</td>')
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _stages_html(data) -> str:
    out = ['<div class="scroll"><table><thead><tr><th>stage</th><th>status</th><th class="n">time</th>'
           '<th class="n">steps</th><th class="n">tokens</th><th>result</th></tr></thead><tbody>']
    head, rows = table_stages(data)
    for r, row in zip(data["stages"], rows):
        dot = f'<span class="dot" style="background:{color(r["stage"])}"></span>'
        out.append(f'<tr><td>{dot}{_e(row[0])}</td><td><span class="badge b-{_e(r["status"])}">{_e(r["status"])}'
                   f'</span></td><td class="n">{_e(row[2])}</td><td class="n">{_e(row[3])}</td>'
                   f'<td class="n">{_e(row[4])}</td><td>{_e(row[5])}</td></tr>')
    out.append("</tbody></table></div>")
    return "".join(out)


def _messages(prompt) -> list[dict]:
    if isinstance(prompt, list):
        return [m for m in prompt if isinstance(m, dict)]
    return [{"role": "user", "content": "" if prompt is None else str(prompt)}]


def _verdict(x: dict) -> str:
    score = _num(x.get("reward", x.get("correct")))
    if score is None:
        return ""
    text = "✓ correct" if score >= 1 else "✗ wrong" if score <= 0 else f"reward {score:.2f}"
    return f' · <span class="{"ok" if score >= 0.5 else "bad"}">{text}</span>'


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


def _samples_html(data, per_stage: int) -> str:
    cards = []
    for prompt, task, replies in sample_groups(data, per_stage):
        msgs = "".join(f'<div class="msg {_e(m.get("role", "user"))}">{_e(m.get("content", ""))}</div>'
                       for m in _messages(prompt))
        for s, x in replies:
            msgs += (f'<div class="who"><span class="dot" style="background:{color(s)}"></span>{_e(label(s))}'
                     f'{_verdict(x)}</div><div class="msg assistant">{_e(x.get("reply", ""))}</div>')
        meta = task.replace("_", " ") or "prompt"
        cards.append(f'<div class="conv"><div class="meta">{_e(meta)}</div>{msgs}</div>')
    if not cards:
        return '<p class="empty">No sample conversations were saved (eval/&lt;stage&gt;.json "samples").</p>'
    return f'<div class="convs">{"".join(cards)}</div>'


def _tiles(data) -> str:
    s = data["summary"]
    m = s["model"] or {}
    tiles = [("preset", _e(s["preset"] or "—")),
             ("total time", _e(fmt_seconds(s["total_seconds"]))),
             ("final val bpb", _e(fmt(s["final_val_bpb"]))),
             ("model", _e(f"d{m['n_layer']}") + f" <small>{_e(fmt_count(s['params']))} params</small>"
              if m.get("n_layer") else "—"),
             ("pretrain tokens", _e(fmt_count(s["pretrain_tokens"]))),
             ("best accuracy", _e(pct(s["best_accuracy"])) + (f" <small>{_e(label(s['best_stage']))}</small>"
                                                                    if s["best_stage"] else "")),
             ("RM accuracy", _e(pct(s["rm_val_accuracy"])))]
    return "".join(f'<div class="tile"><div class="k">{k}</div><div class="v">{v}</div></div>' for k, v in tiles)


def _section(sid: str, title: str, lead: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2><p class="lead">{lead}</p>{body}</section>'


def _empty(text: str) -> str:
    return f'<p class="empty">{_e(text)}</p>'


def render_html(data: dict, plots: dict[str, bytes | None], samples_per_stage: int = 3) -> str:
    s = data["summary"]
    nav = "".join(f'<a href="#{sid}">{_e(t)}</a>' for sid, t in SECTIONS)
    missing = ""
    if data["missing"] or data["notes"] or s["failed"]:
        items = [f"<li>{_e(x)}</li>" for x in data["missing"] + data["notes"]]
        missing = (f'<div class="notice"><strong>Not in this report</strong>'
                   f'{" — failed: " + _e(", ".join(label(f) for f in s["failed"])) if s["failed"] else ""}'
                   f'<ul>{"".join(items)}</ul></div>')
    sections = []
    if low := [label(r["stage"]) for r in data["throughput"] if r["warning"]]:
        missing = (f'<div class="warn"><strong>Less training than planned:</strong> {_e(", ".join(low))} reached '
                   f'far fewer steps than the preset expects on this machine; see <a href="#machine">Machine</a>.'
                   f'</div>') + missing

    sections.append(_section("stages", "Stages & time", "What ran, how long it took and what it ended at.",
                             missing + _stages_html(data) + _img(plots.get("time"), "time per stage")))

    mlines = machine_lines(data)
    warnings = "".join(f'<div class="warn">{_e(r["warning"])}</div>' for r in data["throughput"] if r["warning"])
    tput = table_throughput(data)
    sections.append(_section(
        "machine", "Machine & throughput",
        "Where these figures came from, the precision chosen there, and whether each time-budgeted stage got "
        "the work the preset plans.",
        warnings + ("<ul class=\"facts\">" + "".join(f"<li>{_e(x)}</li>" for x in mlines) + "</ul>" if mlines
                    else _empty("No machine recorded (runs made before gptstack recorded their machine)."))
        + (_html_table(tput) if tput else "")))

    base = data["runs"].get("base")
    body = _img(plots.get("pretraining"), "pretraining loss and validation bpb") if base else ""
    if base:
        st = base["state"]
        data_meta = (base["config"] or {}).get("data") or {}
        facts = [f"{fmt_count(st.get('tokens'))} tokens seen in {fmt_count(st.get('step'))} steps"]
        if data_meta.get("train_tokens"):
            facts.append(f"corpus {fmt_count(data_meta['train_tokens'])} training tokens "
                         f"({(st.get('tokens') or 0) / data_meta['train_tokens']:.2f} epochs)")
        if s["params"] and st.get("tokens"):
            facts.append(f"{st['tokens'] / s['params']:.2g} tokens per parameter (Chinchilla-optimal: ~20)")
        body = f'<p class="lead">{_e("; ".join(facts))}.</p>' + body
    sections.append(_section("pretraining", "Pretraining",
                             "Next-token loss on the training stream and bits per byte on held-out text "
                             "(lower is better; bpb does not depend on the tokenizer).",
                             body or _empty("No pretraining run (base/) in this directory.")))

    sections.append(_section("sft", "Supervised fine-tuning",
                             "Loss on assistant tokens only, full fine-tuning and LoRA.",
                             _img(plots.get("sft"), "SFT loss curves") or _empty("No SFT run (sft/, sft_lora/).")))

    acc = _html_table(table_accuracy(data))
    extra = ""
    if t := table_decoding(data):
        extra += "<h3>Decoding strategies (mean over tasks)</h3>" + _html_table(t)
    if t := table_cot(data):
        extra += "<h3>Chain of thought vs direct answers (greedy)</h3>" + _html_table(t)
    if t := table_json(data):
        extra += "<h3>Valid JSON (extraction task)</h3>" + _html_table(t)
    if t := table_retrieval(data):
        extra += ("<h3>Retrieval vs memory (facts task: questions about invented facts, BM25 top-1 passage "
                  "from the facts corpus)</h3>" + _html_table(t))
    sections.append(_section("accuracy", "Task accuracy",
                             "Held-out accuracy on the synthetic verifiable tasks, greedy decoding, per stage.",
                             (acc + _img(plots.get("accuracy"), "task accuracy by stage") + extra)
                             if acc and table_accuracy(data)[1] else _empty("No evaluation results (eval/*.json).")))

    col = table_collapse(data)
    sections.append(_section(
        "collapse", "Model collapse",
        "K samples per prompt at temperature 1. Alignment trades diversity for quality: entropy and distinct-n "
        "fall, self-BLEU and embedding similarity rise. Hollow points: the chat model's logits mixed with its "
        "base model's at sampling time.",
        (_html_table(col) + _img(plots.get("collapse"), "diversity versus quality")) if col
        else _empty("No diversity measurements (\"diversity\" in eval/*.json).")))

    align = ""
    if t := table_alignment(data):
        align += "<h3>SFT → RL → DPO → distilled: accuracy, distance from SFT, entropy</h3>" + _html_table(t)
    if t := table_rm(data):
        align += "<h3>Reward model</h3>" + _html_table(t) + _img(plots.get("rm"), "reward model curves")
    if plots.get("rl"):
        align += "<h3>RL (GRPO / PPO)</h3>" + _img(plots["rl"], "RL reward, KL and entropy curves")
    if plots.get("dpo"):
        align += "<h3>DPO</h3>" + _img(plots["dpo"], "DPO accuracy and margin curves")
    sections.append(_section("alignment", "Reward model & RL",
                             "Bradley–Terry reward model on preference pairs; policy optimisation against it "
                             "and the task checker, held near the SFT model by a KL penalty.",
                             align or _empty("No reward model, RL or DPO run in this directory.")))

    sections.append(_section("samples", "Sample conversations", "Held-out prompts and each stage's reply.",
                             _samples_html(data, samples_per_stage)))

    m = s["model"] or {}
    arch = (f"d{m.get('n_layer')} · {m.get('n_embd')} wide · {m.get('n_head')} heads · vocab "
            f"{fmt_count(m.get('vocab_size'))} · context {m.get('seq_len')}") if m else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>gptstack report — {_e(Path(data["run_root"]).name)}</title><style>{CSS}</style></head>
<body><header><div class="wrap"><h1>gptstack run report</h1>
<div class="sub">{_e(data["run_root"])} · built {_e(data["built"])}{" · " + _e(arch) if arch else ""}</div>
<div class="tiles">{_tiles(data)}</div></div></header>
<nav><div class="wrap">{nav}</div></nav>
<main class="wrap">{"".join(sections)}</main>
<footer>Rebuild with <code>gptstack report {_e(data["run_root"])}</code></footer>
</body></html>
"""


# ---- Markdown ---------------------------------------------------------------------------------------------

def _md_table(t, empty: str = "") -> str:
    if not t or not t[1]:
        return f"_{empty}_\n" if empty else ""
    head, rows = t
    esc = lambda x: str(x[0] if isinstance(x, tuple) else x).replace("|", "\\|").replace("\n", " ")
    numeric = [i > 0 and all(re.match(r"^[-+—\d.]", esc(r[i]) or "—") for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_markdown(data: dict, plot_files: dict[str, str], samples_per_stage: int = 3) -> str:
    s = data["summary"]
    img = lambda k, alt: f"\n![{alt}]({plot_files[k]})\n" if k in plot_files else ""
    out = [f"# gptstack run report\n\n`{data['run_root']}` — built {data['built']}\n",
           f"- preset: **{s['preset'] or '—'}**\n- total time: **{fmt_seconds(s['total_seconds'])}**\n"
           f"- final val bpb: **{fmt(s['final_val_bpb'])}**\n- parameters: {fmt_count(s['params'])}; "
           f"pretraining tokens: {fmt_count(s['pretrain_tokens'])}\n"
           f"- best task accuracy: {pct(s['best_accuracy'])}"
           f"{' (' + label(s['best_stage']) + ')' if s['best_stage'] else ''}\n"]
    if data["missing"] or data["notes"]:
        out.append("\n**Not in this report:**\n\n" + "".join(f"- {x}\n" for x in data["missing"] + data["notes"]))
    out.append("\n## Stages & time\n\n" + _md_table(table_stages(data)) + img("time", "time per stage"))
    out.append("\n## Machine & throughput\n\n"
               + "".join(f"> **Warning:** {r['warning']}\n\n" for r in data["throughput"] if r["warning"])
               + ("".join(f"- {x}\n" for x in machine_lines(data)) or "_no machine recorded_\n")
               + ("\n" + _md_table(table_throughput(data)) if table_throughput(data) else ""))
    out.append("\n## Pretraining\n" + (img("pretraining", "pretraining curves") or "\n_no pretraining run_\n"))
    out.append("\n## SFT\n" + (img("sft", "SFT curves") or "\n_no SFT run_\n"))
    out.append("\n## Task accuracy (greedy)\n\n" + _md_table(table_accuracy(data), "no evaluation results")
               + img("accuracy", "accuracy"))
    for title, t in (("Decoding strategies", table_decoding(data)), ("CoT vs direct", table_cot(data)),
                     ("JSON validity", table_json(data)), ("Retrieval vs memory (facts)", table_retrieval(data))):
        if t:
            out.append(f"\n### {title}\n\n" + _md_table(t))
    out.append("\n## Model collapse\n\n" + _md_table(table_collapse(data), "no diversity measurements")
               + img("collapse", "diversity vs quality"))
    out.append("\n## Reward model & RL\n\n" + (_md_table(table_alignment(data)) + "\n" if table_alignment(data) else "")
               + _md_table(table_rm(data), "no reward model run") + img("rm", "reward model")
               + img("rl", "RL curves") + img("dpo", "DPO curves"))
    groups = sample_groups(data, samples_per_stage)
    if groups:
        out.append("\n## Sample conversations\n")
        quote = lambda text: "\n".join("> " + line for line in str(text).splitlines() or [""])
        for prompt, _, replies in groups:
            out.append("\n" + "\n>\n".join(quote(f"**{m.get('role', 'user')}:** {m.get('content', '')}")
                                              for m in _messages(prompt)) + "\n")
            for st, x in replies:
                out.append(f"\n*{label(st)}:*\n\n```\n{str(x.get('reply', '')).replace('```', '` ` `')}\n```\n")
    return "".join(out)


# ---- entry point ------------------------------------------------------------------------------------------

def build_plots(data: dict) -> dict[str, bytes]:
    plots = {"time": plot_time(data), "pretraining": plot_pretraining(data), "sft": plot_sft(data),
             "accuracy": plot_accuracy(data), "collapse": plot_collapse(data), "rl": plot_rl(data)}
    if "rm" in data["runs"]:
        plots["rm"] = _plot_pairs(data["runs"]["rm"], RM_KEYS, "rm")
    if "dpo" in data["runs"]:
        plots["dpo"] = _plot_pairs(data["runs"]["dpo"], DPO_KEYS, "dpo")
    return {k: v for k, v in plots.items() if v}


def build_report(run_root: str | Path, samples_per_stage: int = 3) -> Path:
    """Write RUN_ROOT/report.html (self-contained), report.md (+ report_files/*.png) and report.json from the
    run directories alone; returns the HTML's path."""
    root = Path(run_root)
    data = collect(root)
    plots = build_plots(data)
    files = root / "report_files"
    files.mkdir(exist_ok=True)
    for name, png in plots.items():
        atomic_write_bytes(files / f"{name}.png", png)
    plot_files = {name: f"report_files/{name}.png" for name in plots}
    atomic_write_bytes(root / "report.html", render_html(data, plots, samples_per_stage).encode("utf-8"))
    atomic_write_bytes(root / "report.md", render_markdown(data, plot_files, samples_per_stage).encode("utf-8"))
    summary = {k: data[k] for k in ("run_root", "built", "summary", "stages", "machine", "throughput", "missing",
                                    "notes", "evals")}
    summary["reward_model"] = ((data["runs"].get("rm") or {}).get("state") or {}).get("last")
    summary["final"] = {n: (r["state"] or {}).get("last") for n, r in data["runs"].items()}
    summary["plots"] = plot_files
    atomic_write_bytes(root / "report.json", json.dumps(summary, indent=2, default=str).encode("utf-8"))
    return root / "report.html"
