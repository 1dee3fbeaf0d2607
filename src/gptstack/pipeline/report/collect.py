"""Reading a pipeline run root into one plain dict (the numbers of report.json).

    RUN_ROOT/pipeline.json         {"preset": ..., "rl_task"?: ..., "stages": {name: {"seconds", "status", ...}}}
    RUN_ROOT/<run>/                config.json, metrics.jsonl, trainer_state.json of every training stage of
                                   the stage table (and any other run directory found)
    RUN_ROOT/eval/<stage>.json     {"stage", "tasks": {task: {"greedy", "sample", "vote"?, "best_of"?}},
                                    "json_validity"?, "diversity"?, "diversity_mixed"?, "alignment"?,
                                    "rl_target"?: {"task", "n", "greedy", "sample", ...}, "retrieval"?,
                                    "samples"?: [{"prompt": str | messages, "reply": str, "task"?, "reward"?}]}
    RUN_ROOT/tokenizer/meta.json, RUN_ROOT/prefs.jsonl

Every piece is optional; what is missing is listed in data["missing"], unreadable files in data["notes"].
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ...config import DPOConfig, PretrainConfig, RewardConfig, SFTConfig
from ...errors import DataError
from ..stages import BY_NAME, EVALUATED, NAMES, STAGES, TRAINED, label

# The stages the report treats specially, found in the stage table by the config their preset section fills.
PRETRAIN = next(s.name for s in STAGES if s.config is PretrainConfig)                    # "base"
REWARD_MODEL = next(s.name for s in STAGES if s.config is RewardConfig)                   # "rm"
SFT_STAGES = tuple(s.name for s in STAGES if s.config is SFTConfig and s.trains)          # "sft", "sft_lora"
PAIRWISE = tuple(s.name for s in STAGES if s.config in (DPOConfig, RewardConfig))         # learn from pairs, not RL
DPO_STAGES = tuple(s.name for s in STAGES if s.config is DPOConfig)                       # "dpo"
# every row of the stage table, in pipeline order ("tokenizer" runs first but has no stage of its own)
PIPELINE_ORDER = ("tokenizer",) + NAMES
# the RL task of run roots made before pipeline.json recorded it
DEFAULT_RL_TASK = "arithmetic_direct"
# A time-budgeted stage that reached fewer than this share of its expected steps gets a warning.
LOW_THROUGHPUT_SHARE = 0.5
NOT_RUN_DIRS = ("eval", "tokenizer", "report_files")


def num(x) -> float | None:
    """x as a finite float, or None (bools, strings, NaN and missing values are not numbers here)."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def mean_acc(ev: dict, key: str = "greedy") -> float | None:
    vals = [num(t.get(key)) for t in (ev.get("tasks") or {}).values() if isinstance(t, dict)]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


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


def _count_lines(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def collect(run_root: str | Path) -> dict:
    """Everything the report shows, as plain data (report.json is a part of it)."""
    root = Path(run_root)
    if not root.is_dir():
        raise DataError(f"run directory '{root}' does not exist: give the --out directory of a "
                        f"`gptstack pipeline` run")
    notes: list[str] = []
    pipeline = _read_json(root / "pipeline.json", notes) or {}
    if not isinstance(pipeline, dict) or not isinstance(pipeline.get("stages", {}), dict):
        notes.append("pipeline.json is not {\"stages\": {name: {...}}}; ignored")
        pipeline = {}
    dirs = {n: root / BY_NAME[n].output for n in TRAINED}
    dirs.update((d.name, d) for d in sorted(root.iterdir(), key=lambda d: d.name)
                if d.is_dir() and d.name not in dirs and d.name not in NOT_RUN_DIRS and _is_run_dir(d))
    runs = {}
    for n, d in dirs.items():
        if not d.is_dir() or not _is_run_dir(d):
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
    order = {s: i for i, s in enumerate(EVALUATED)}
    evals = dict(sorted(evals.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    if not runs and not evals and not pipeline and not (root / "tokenizer").is_dir():
        raise DataError(f"'{root}' holds no pipeline outputs (no pipeline.json, eval/ or run directories "
                        f"such as base/ or sft/): is it the --out directory of a `gptstack pipeline` run?")
    tokenizer = _read_json(root / "tokenizer" / "meta.json", notes) if (root / "tokenizer").is_dir() else None
    rl_task = pipeline.get("rl_task")
    data = {"run_root": str(root.resolve()), "built": time.strftime("%Y-%m-%d %H:%M"), "pipeline": pipeline,
            "rl_task": rl_task if isinstance(rl_task, str) and rl_task else DEFAULT_RL_TASK,
            "runs": runs, "evals": evals, "tokenizer": tokenizer, "notes": notes,
            "prefs_pairs": _count_lines(root / "prefs.jsonl")}
    data["stages"] = _stage_table(data)
    data["machine"] = _machine(data)
    data["throughput"] = _throughput(data)
    data["missing"] = _missing(data)
    data["summary"] = _summary(data)
    return data


_ORDER = {s: i for i, s in enumerate(PIPELINE_ORDER)}


def _order_key(stage: str) -> int:
    return _ORDER.get(stage, len(_ORDER))


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
        if status == "skipped" and not num(seconds):
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


def _machine(data: dict) -> dict | None:
    """The machine the runs recorded (config.json "machine"); the first training stage's, in pipeline order."""
    for n in list(TRAINED) + list(data["runs"]):
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
        minutes = num(budget.get("minutes")) if budget else num((cfg.get("train") or {}).get("minutes"))
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
                                 if (num(row["busy_cores"]) or 0) >= 0.75 else ""))
        rows.append(row)
    return sorted(rows, key=lambda r: _order_key(r["stage"]))


def _missing(data: dict) -> list[str]:
    pstages = data["pipeline"].get("stages") or {}
    out = []
    for n in TRAINED:
        st = (pstages.get(n) or {}).get("status")
        if n not in data["runs"]:
            out.append(f"{label(n)} ({BY_NAME[n].output}/): "
                       + ({"skipped": "skipped", "failed": "failed"}.get(st, "not found")))
        elif not data["runs"][n]["state"]:
            out.append(f"{label(n)} ({BY_NAME[n].output}/): no trainer_state.json (unfinished or interrupted)")
    if unevaluated := [s for s in EVALUATED if s in data["runs"] and s not in data["evals"]]:
        out.append("evaluation results (eval/<stage>.json) for " + ", ".join(label(s) for s in unevaluated))
    if not data["pipeline"]:
        out.append("pipeline.json (stage timings come from trainer_state.json instead)")
    return out


def params(model: dict) -> int | None:
    """Parameter count from a model config (matrices only; norms are a rounding error)."""
    try:
        C, L, V, H = model["n_embd"], model["n_layer"], model["vocab_size"], model["mlp_hidden"]
        kv = model.get("n_kv_head", model["n_head"]) * C // model["n_head"]
        per_layer = 2 * C * C + 2 * C * kv + 3 * C * H
        return V * C * (1 if model.get("tie_embeddings") else 2) + L * per_layer
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def _summary(data: dict) -> dict:
    p, runs = data["pipeline"], data["runs"]
    base = runs.get(PRETRAIN) or {}
    last = (base.get("state") or {}).get("last") or {}
    bpb = num(last.get("val_bpb"))
    if bpb is None:
        bpbs = [r["val_bpb"] for r in base.get("eval", []) if num(r.get("val_bpb")) is not None]
        bpb = bpbs[-1] if bpbs else None
    model = (base.get("config") or {}).get("model") or next(
        ((r.get("config") or {}).get("model") for r in runs.values() if (r.get("config") or {}).get("model")), None)
    total = num(p.get("total_seconds"))
    if total is None:
        secs = [num(r["seconds"]) for r in data["stages"]]
        total = sum(s for s in secs if s is not None) or None
    accs = {s: mean_acc(ev) for s, ev in data["evals"].items()}
    accs = {s: a for s, a in accs.items() if a is not None}
    best = max(accs, key=accs.get) if accs else None
    rm_last = ((runs.get(REWARD_MODEL) or {}).get("state") or {}).get("last") or {}
    preset = p.get("preset") or (p.get("config") or {}).get("preset")
    return {"preset": preset, "total_seconds": total, "final_val_bpb": bpb,
            "pretrain_tokens": (base.get("state") or {}).get("tokens"),
            "model": {k: model.get(k) for k in ("n_layer", "n_embd", "n_head", "vocab_size", "seq_len")} if model else None,
            "params": params(model) if model else None,
            "best_stage": best, "best_accuracy": accs.get(best) if best else None,
            "rm_val_accuracy": num(rm_last.get("val_accuracy")),
            "failed": [r["stage"] for r in data["stages"] if r["status"] == "failed"]}
