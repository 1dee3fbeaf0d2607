"""The main job: one command runs every stage and writes a report that measures the field's claims.

    tokenizer -> pretrain -> SFT (full) -> SFT (LoRA) -> preference sampling -> reward model
              -> RL (GRPO, task reward) -> RL (PPO, reward model) -> RL (PPO, task reward) -> DPO
              -> on-policy distillation (the LoRA model as student, the full SFT model as teacher)
              -> evaluation -> report

Each stage is the library call a user makes through the CLI, with the stage's config built from the preset
(presets.py; the stage table in stages.py names the stages). Each writes under RUN_ROOT and is skipped when
its finished output exists, so an interrupted pipeline resumes where it stopped (a half-finished training
stage continues from its last checkpoint). Budgets: `--budget minutes` (the default) gives each tiny stage
wall-clock minutes, so the pipeline takes about the same time on any 2-core CPU and a faster machine trains
more; `--budget steps` gives each training stage the preset's fixed step count, so any machine trains the
same assistant in whatever time it needs.

Under torchrun (`--parallel ddp|fsdp` for every training stage) every rank runs the pipeline: the training
stages together (the loop shards their data and models), the rest on rank 0 alone — preference sampling
(prefs.jsonl has one writer; the others wait at a barrier before a stage reads it), evaluation and the
report, and pipeline.json — so every file has one writer and no rank reads a file before it is complete.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import PipelineConfig
from ..errors import ConfigError, GptstackError, Interrupted
from ..runs import is_finished
from .presets import Preset, load_preset
from .stages import NAMES, STAGES

__all__ = ["PipelineConfig", "run_pipeline", "selected_stages"]


def selected_stages(cfg: PipelineConfig) -> list[str]:
    only = [s for s in cfg.only.split(",") if s]
    skip = [s for s in cfg.skip.split(",") if s]
    for s in only + skip:
        if s not in NAMES:
            raise ConfigError(f"unknown stage {s!r}; stages are {', '.join(NAMES)}")
    return [s for s in NAMES if (not only or s in only) and s not in skip]


# stages one rank runs for all: they sample or measure without a training loop, and write one file each
RANK0_STAGES = ("prefs", "eval", "report")


def _distributed() -> tuple[int, int]:
    """(rank, world); under torchrun the process group is created here, once, for every stage."""
    import os

    if int(os.environ.get("WORLD_SIZE", 1) or 1) < 2:
        return 0, 1
    from ..train.loop import distributed_context

    rank, world, _ = distributed_context()
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        import torch

        torch.distributed.barrier()


class _Record:
    """RUN_ROOT/pipeline.json: what ran, with which preset and budget, how long each stage took. Rewritten
    atomically after every stage, so a kill never leaves half a record that the rerun could not read."""

    def __init__(self, root: Path, cfg: PipelineConfig, preset: Preset, writer: bool = True):
        from ..io import read_json

        self.path, self.writer = root / "pipeline.json", writer   # under torchrun only rank 0 writes it
        try:
            self.data = read_json(self.path) if self.path.exists() else {}
        except GptstackError:
            raise ConfigError(f"'{self.path}' is corrupt: remove it (the stages' own directories are kept and "
                              "reused) and rerun") from None
        made_with = self.data.get("budget", "minutes")
        if made_with != cfg.budget and self.data.get("stages"):
            raise ConfigError(f"'{root}' was made with --budget {made_with}; its stages would be reused under "
                              f"--budget {cfg.budget}: choose another --out")
        self.data.update({"preset": preset.name, "corpus": cfg.corpus, "budget": cfg.budget,
                          "rl_task": preset.rl_task, "base_model": cfg.base or None})
        self.data.setdefault("stages", {})

    def mark(self, name: str, status: str, seconds: float | None = None, **extra) -> None:
        entry = self.data["stages"].setdefault(name, {})
        entry["status"] = status
        if seconds is not None:
            entry["seconds"] = round(seconds, 1)
        entry.update(extra)
        self.save()

    def save(self) -> None:
        from ..io import atomic_write_json

        if self.writer:
            atomic_write_json(self.path, self.data)


def run_pipeline(cfg: PipelineConfig) -> Path:
    cfg.validate()
    preset = load_preset(cfg.preset).with_budget(cfg.budget)   # every section checked before any stage runs
    stages = selected_stages(cfg)
    rank, world = _distributed()
    main = rank == 0
    root = Path(cfg.out)
    record = _Record(root, cfg, preset, writer=main)
    root.mkdir(parents=True, exist_ok=True)
    record.save()
    paths = {s.name: root / s.output for s in STAGES if s.output}
    configs = _stage_configs(preset, cfg, paths, world)
    _barrier(world)   # every rank has decided which stages resume before any stage writes

    t_start = time.time()
    for i, name in enumerate(stages):
        if name in preset.budget_steps and cfg.budget == "minutes":   # what the report holds the steps against
            record.data["stages"].setdefault(name, {})["expected_steps"] = preset.budget_steps[name]
        spec = next(s for s in STAGES if s.name == name)
        if spec.needs_prefs and paths["prefs"].exists() and _count_pairs(paths["prefs"]) == 0:
            # every sampled reply tied under the checkers: there is nothing to learn a preference from
            if main:
                print(f"\n=== {name}: skipped, {paths['prefs']} has no preference pairs (all replies tied)", flush=True)
            record.mark(name, "skipped", error="no preference pairs: every sampled reply tied")
            continue
        if spec.trains and is_finished(paths[name]):
            record.mark(name, "reused")
            continue
        if name == "prefs" and paths["prefs"].exists():
            # prefs.jsonl only ever appears complete (written to a temp file, fsynced, renamed)
            record.mark(name, "reused")
            continue
        _barrier(world)   # every rank has made the checks above before any rank writes this stage's files
        if world > 1 and name in RANK0_STAGES:
            if not main:   # rank 0 runs it; wait for its file only where a later stage trains on it
                if any(next(s for s in STAGES if s.name == later).trains for later in stages[i + 1:]):
                    _barrier(world)
                continue
        if main:
            print(f"\n=== {name}: {_describe(name, configs.get(name), cfg.base)}"
                  + (f"  [{world} ranks, {cfg.parallel}]" if world > 1 and name not in RANK0_STAGES else ""),
                  flush=True)
        t0 = time.time()
        try:
            fresh = _run_stage(name, configs.get(name), paths, root, preset, cfg)
            if world > 1 and name in RANK0_STAGES and any(
                    next(s for s in STAGES if s.name == later).trains for later in stages[i + 1:]):
                _barrier(world)
        except KeyboardInterrupt:
            record.mark(name, "interrupted", time.time() - t0)
            raise Interrupted(f"interrupted in stage {name}; rerun the same command to continue") from None
        except GptstackError as e:
            record.mark(name, "failed", time.time() - t0, error=str(e))
            raise GptstackError(f"stage {name} failed: {e} (fix it and rerun the same command to continue from "
                                "this stage)") from None
        record.mark(name, "done" if fresh else "reused", time.time() - t0 if fresh else None)
    record.data["total_seconds_this_run"] = round(time.time() - t_start, 1)
    record.save()
    return root / "report.html"


def _count_pairs(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _stage_configs(preset: Preset, cfg: PipelineConfig, paths: dict[str, Path], world: int = 1) -> dict:
    """Every stage's config, from the preset plus what the pipeline decides: outputs, seed, resume, the
    wiring between stages (the RL task, the reward model's path), and under `world` ranks the rows per rank
    of a stage whose preset fixes the tokens per step (`total_batch_tokens`): its batch is split among the
    ranks where one rank's rows x ranks would overshoot it (tiny: 32 rows = one step; 2 ranks take 16 each),
    so the step is the preset's. Other stages' --batch-size stays per rank (their step grows with the ranks)."""
    common = dict(seed=cfg.seed, progress=False)
    out = {}
    for s in STAGES:
        if s.config is None or s.name == "eval":
            continue
        fixed = dict(common) if s.trains else {"seed": cfg.seed}
        if s.output:
            fixed["out"] = str(paths[s.name])
        if s.trains:
            fixed["resume"] = paths[s.name].is_dir()   # continue from its last commit; none: start fresh
            fixed["parallel"] = cfg.parallel
        if s.name == "base":
            fixed["corpus"] = cfg.corpus
        if s.name in ("grpo", "ppo_task"):
            fixed["tasks"] = preset.rl_task
        if s.name == "ppo":
            fixed["reward"] = f"rm:{paths['rm']}"
        if s.name == "distill":
            fixed["teacher"] = str(paths["sft"])
        if s.name in ("rm", "dpo"):
            fixed["prefs"] = str(paths["prefs"])
        c = preset.config(s.name, **fixed)
        total, rows, seq = (getattr(c, k, 0) for k in ("total_batch_tokens", "batch_size", "seq_len"))
        if world > 1 and total and seq and total % (rows * seq * world) and rows % world == 0 \
                and total % (rows * seq) == 0:
            c = preset.config(s.name, **fixed, batch_size=rows // world)
        out[s.name] = c
    out["eval"] = preset.config("eval")
    return out


def _describe(name: str, cfg, base: str = "") -> str:
    """The one line printed when a stage starts: its budget, or what it samples or scores."""
    if name == "base" and base:
        return f"import {base} (no pretraining)"
    if name == "prefs":
        return f"{cfg.n_prompts} prompts x {cfg.samples} samples of {cfg.tasks}"
    if name == "eval":
        return f"{cfg.n_examples} test examples per task"
    if cfg is None:
        return "from the run directories"
    budget = [f"{cfg.minutes:g} min" if cfg.minutes else "", f"{cfg.steps} steps" if cfg.steps else ""]
    return " or ".join(b for b in budget if b) or "the token budget"


def _run_stage(name: str, cfg, paths: dict[str, Path], root: Path, preset: Preset, pcfg: PipelineConfig) -> bool:
    """One stage through the library; True if it did work (False: its output was already there)."""
    if name == "base" and pcfg.base:
        from ..runs import import_model

        rank, world = _distributed()
        if rank == 0:   # one writer; the other ranks wait for the finished run
            import_model(pcfg.base, paths["base"])
        _barrier(world)
    elif name == "base":
        from ..train.pretrain import pretrain

        pretrain(cfg)
    elif name in ("sft", "sft_lora"):
        from ..train.sft import sft

        sft(str(paths["base"]), cfg)
    elif name == "prefs":
        from ..train.reward_model import build_preferences

        _, stats = build_preferences(str(paths["sft"]), cfg)
        print(f"{stats['prompts']} prompts x {cfg.samples} samples: {stats['pairs']} pairs, {stats['ties']} tied")
    elif name == "rm":
        from ..train.reward_model import train_reward

        train_reward(str(paths["sft"]), cfg)
    elif name in ("grpo", "ppo", "ppo_task"):
        from ..train.rl import train_rl

        train_rl(str(paths["sft"]), cfg)
    elif name == "dpo":
        from ..train.dpo import train_dpo

        train_dpo(str(paths["sft"]), cfg)
    elif name == "distill":
        from ..train.distill import distill

        distill(str(paths["sft_lora"]), cfg)
    elif name == "eval":
        from .evaluate import evaluate_pipeline

        return evaluate_pipeline(root, n_examples=cfg.n_examples, seed=pcfg.seed, rl_task=preset.rl_task)
    elif name == "report":
        from .report import build_report

        path = build_report(root)
        print(f"\nreport: {path.resolve()}")
    return True


def load_record(root: Path) -> dict:
    """pipeline.json of a run root ({} when there is none)."""
    from ..io import read_json

    path = Path(root) / "pipeline.json"
    return read_json(path) if path.exists() else {}
