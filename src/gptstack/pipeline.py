"""The main job: one command runs every stage and writes a report that measures the field's claims.

    tokenizer -> pretrain -> SFT (full) -> SFT (LoRA) -> preference sampling -> reward model
              -> RL (GRPO, task reward) -> RL (PPO, reward model) -> RL (PPO, task reward) -> DPO
              -> on-policy distillation (the LoRA model as student, the full SFT model as teacher)
              -> evaluation -> report

Each stage is the same library call a user makes through the CLI (the pipeline literally runs the CLI's
commands in-process), writes under RUN_ROOT, and is skipped when its finished output exists, so an
interrupted pipeline resumes where it stopped (a half-finished training stage continues with --resume).
Budgets: `--budget minutes` (the default) gives each tiny stage wall-clock minutes, so the pipeline takes
about the same time on any 2-core CPU and a faster machine trains more; `--budget steps` gives each stage a
fixed number of optimizer steps (FIXED_WORK_STEPS), so any machine trains the same assistant, in whatever time
it needs. GPU presets use step/token budgets throughout.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, GptstackError

# stage names are the names of their outputs under RUN_ROOT (base/, prefs.jsonl, rm/, ...)
STAGES = ["base", "sft", "sft_lora", "prefs", "rm", "grpo", "ppo", "ppo_task", "dpo", "distill", "eval", "report"]

# the task the RL stages train on with the task reward, in every preset (the evaluation scores it on 10x the
# examples as the RL stages' own task)
RL_TASK = "arithmetic_direct"
LORA_WITH_HEAD = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"
# Weights are in examples; by tokens this is CoT arithmetic 26%, direct 23% (its examples are short), facts 23%,
# spelling 20%, and the three quick formats 8%. Direct answers and spelling are learned from many examples or
# not at all (measured, from the same base: with weights 1 and 1 in 2.5 minutes, direct 0.03 and no word
# spelled right; alone for 2.5 minutes, direct reaches 0.285), so they get the largest shares.
TINY_SFT_MIXTURE = ("arithmetic_cot:3,arithmetic_direct:6,facts:2,spelling:4,extraction:0.6,shakespeare:0.3,"
                    "greetings:0.3")

# Per-preset stage flags. Minutes are wall-clock training budgets (the LR schedule follows the clock).
PIPELINE_PRESETS: dict[str, dict[str, list[str]]] = {
    "tiny": {
        "base": ["--preset", "tiny", "--minutes", "5.0"],
        # Small batches (more optimizer steps in the budget) and a mixture weighted towards the skills that
        # take longest to learn; the easy formats need little data. 4 minutes (was 2.5): measured from the same
        # base, greedy on 100 test examples each, CoT arithmetic 0.25 -> 0.78-0.83 and spelling 0.38 -> 0.46-0.61
        # while the other tasks held (0.90-0.98).
        "sft": ["--minutes", "4", "--steps", "0", "--batch-size", "4", "--tasks", TINY_SFT_MIXTURE],
        # LoRA on a base this young needs the head too (measured, same 1.5 min: val loss 1.32 with rank 16 on the
        # blocks only, 0.45 with rank 64 and lm_head), at a gentler LR than full SFT's: in 2.5 minutes val loss
        # 0.29 at lr 3e-3, 0.45 at 1e-3, 0.69 at 1e-2 (and 0.26, with the same task scores, with Muon on the
        # factors instead of AdamW)
        "sft_lora": ["--lora", "--lora-rank", "64", "--lora-alpha", "64", "--lora-targets", LORA_WITH_HEAD,
                     "--lr", "3e-3", "--minutes", "2.5", "--steps", "0", "--batch-size", "4",
                     "--tasks", TINY_SFT_MIXTURE],
        # preferences where the SFT model's samples disagree: it is right on ~98% of extraction replies (few
        # pairs), on about a third of sampled arithmetic working and spelling counts
        "prefs": ["--tasks", "arithmetic_cot,spelling", "--samples-per-prompt", "4", "--n-prompts", "96",
                  "--max-new-tokens", "64"],
        "rm": ["--minutes", "0.5", "--steps", "0"],
        # RL with the task reward on direct-answer arithmetic: the task where the SFT model has the most room
        # (0.29 greedy on 400 test problems) and is right on some samples of a prompt and wrong on others (the
        # groups with signal); its replies are a few tokens, so 2 minutes are ~70 steps. Measured from the same
        # SFT model (400 test problems, greedy, paired sign test): GRPO 0.290 -> 0.372 (59 newly right, 26 newly
        # wrong, p = 0.0004), PPO 0.290 -> 0.390 (63 vs 23, p = 2e-5). On chain-of-thought arithmetic, where
        # the 4-minute SFT model is already at 0.85, the same budgets moved it to 0.880 (p = 0.14) and 0.855
        # (p = 1); with the 2.5-minute SFT model (0.47) they had raised it by 5-7 points (p = 0.003, 0.013).
        # One task: on a mixture (spelling, facts, arithmetic) 2-6 minute GRPO runs raised facts but lowered
        # arithmetic. Few, large steps (32 prompts x 8 samples, one update per rollout): with 16 prompts and 4
        # updates per rollout CoT accuracy drifted down (0.515 -> 0.450 on 200 test problems), and at lr 3e-4.
        "grpo": ["--algo", "grpo", "--reward", "task", "--tasks", RL_TASK, "--n-prompts", "32",
                 "--update-epochs", "1", "--minibatches", "1", "--max-new-tokens", "12", "--minutes", "2",
                 "--steps", "0"],
        "ppo": ["--algo", "ppo", "--tasks", "arithmetic_cot,spelling", "--samples", "4", "--max-new-tokens", "64",
                "--minutes", "0.8", "--steps", "0"],
        # PPO with the task reward, same task and batch shape as GRPO (a fresh value head; the batch, not the
        # group, is the baseline)
        "ppo_task": ["--algo", "ppo", "--tasks", RL_TASK, "--n-prompts", "32", "--samples", "8",
                     "--update-epochs", "1", "--minibatches", "1", "--max-new-tokens", "12", "--minutes", "2",
                     "--steps", "0"],
        "dpo": ["--minutes", "0.4", "--steps", "0", "--lr", "3e-5"],
        "distill": ["--mode", "onpolicy", "--tasks", "extraction,spelling,facts,arithmetic_cot", "--minutes", "0.6",
                    "--steps", "0"],
        "eval": ["--n-examples", "40"],
    },
    "d12": {
        "base": ["--preset", "d12"],
        "sft": ["--steps", "1500"],
        "sft_lora": ["--lora", "--steps", "1500"],
        "prefs": ["--samples-per-prompt", "8", "--n-prompts", "256"],
        "rm": ["--steps", "500"],
        "grpo": ["--algo", "grpo", "--reward", "task", "--tasks", RL_TASK, "--steps", "300"],
        "ppo": ["--algo", "ppo", "--steps", "300"],
        "ppo_task": ["--algo", "ppo", "--tasks", RL_TASK, "--steps", "300"],
        "dpo": ["--steps", "500"],
        "distill": ["--mode", "onpolicy", "--steps", "300"],
        "eval": ["--n-examples", "200"],
    },
}
# The plumbing at the smallest scale (a depth-1 model, a few steps per stage): for tests and quick checks.
_MICRO_MODEL = ["--depth", "1", "--n-embd", "64", "--seq-len", "256", "--vocab-size", "1024", "--batch-size", "8",
                "--total-batch-tokens", "0", "--eval-every", "10", "--eval-tokens", "4096"]
PIPELINE_PRESETS["micro"] = {
    "base": ["--minutes", "0", "--steps", "10"] + _MICRO_MODEL,
    "sft": ["--minutes", "0", "--steps", "4", "--examples-per-task", "50", "--val-conversations", "20"],
    "sft_lora": ["--lora", "--minutes", "0", "--steps", "3", "--examples-per-task", "50", "--val-conversations", "20"],
    "prefs": ["--tasks", "spelling", "--samples-per-prompt", "4", "--n-prompts", "16", "--max-new-tokens", "12"],
    "rm": ["--minutes", "0", "--steps", "3"],
    "grpo": ["--algo", "grpo", "--reward", "task", "--tasks", RL_TASK, "--minutes", "0", "--steps", "2",
             "--n-prompts", "4", "--samples", "4", "--max-new-tokens", "12", "--eval-examples", "4", "--train-examples", "32"],
    "ppo": ["--algo", "ppo", "--minutes", "0", "--steps", "2", "--n-prompts", "4", "--samples", "2",
            "--max-new-tokens", "12", "--eval-examples", "4", "--train-examples", "32"],
    "ppo_task": ["--algo", "ppo", "--tasks", RL_TASK, "--minutes", "0", "--steps", "2", "--n-prompts", "4",
                 "--samples", "2", "--max-new-tokens", "12", "--eval-examples", "4", "--train-examples", "32"],
    "dpo": ["--minutes", "0", "--steps", "3"],
    "distill": ["--mode", "onpolicy", "--minutes", "0", "--steps", "2", "--n-prompts", "2", "--samples", "2",
                "--max-new-tokens", "12", "--train-examples", "16", "--eval-examples", "2"],
    "eval": ["--n-examples", "3"],
}
PIPELINE_PRESETS["d20"] = {**PIPELINE_PRESETS["d12"], "base": ["--preset", "d20"]}


# Fixed-work budgets (`--budget steps`): optimizer steps per time-budgeted stage. They are also the steps a
# minutes-budget run is expected to reach; the report warns when a stage reached far fewer (a slow or busy
# machine). Where the figures come from: bench/RESULTS.md, "The tiny pipeline's fixed-work budget".
FIXED_WORK_STEPS: dict[str, dict[str, int]] = {
    "tiny": {"base": 166, "sft": 800, "sft_lora": 600, "rm": 120, "grpo": 68, "ppo": 30, "ppo_task": 68,
             "dpo": 80, "distill": 20},
}
BUDGETS = ("minutes", "steps")


@dataclass
class PipelineConfig:
    preset: str = "tiny"
    out: str = "runs/tiny"
    corpus: str = "shakespeare"
    budget: str = "minutes"   # minutes: wall-clock per stage (tiny); steps: the same work on any machine
    only: str = ""     # comma-separated stages to run (others must already exist if needed)
    skip: str = ""     # comma-separated stages to leave out
    seed: int = 0


def stage_flags(preset: str, budget: str = "minutes") -> dict[str, list[str]]:
    """Each stage's CLI flags under `budget`: the preset's own, with `--steps N --minutes 0` appended (the last
    flag wins) for the time-budgeted stages when the budget is fixed work."""
    if preset not in PIPELINE_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose {', '.join(PIPELINE_PRESETS)}")
    flags = {k: list(v) for k, v in PIPELINE_PRESETS[preset].items()}
    if budget == "steps":
        for name, steps in FIXED_WORK_STEPS.get(preset, {}).items():
            flags[name] += ["--minutes", "0", "--steps", str(steps)]
    return flags


def _finished(run: Path) -> bool:
    from .train.checkpoint import recover_run

    recover_run(run)   # a stage killed mid-save: its checkpoint is finished (or cleared) before we look
    state = run / "trainer_state.json"
    try:
        return state.exists() and bool(json.loads(state.read_text()).get("finished"))
    except json.JSONDecodeError:
        raise GptstackError(f"'{state}' is corrupt: remove '{run}' to retrain the stage") from None


def _write_json(path: Path, obj) -> None:
    """pipeline.json is rewritten after every stage: atomically, so a kill never leaves half a record that the
    rerun could not read."""
    from .train.checkpoint import atomic_write_json

    atomic_write_json(path, obj)


def _started(run: Path) -> bool:
    """Whether the stage ran before: it continues from its last committed checkpoint, or, killed before its
    first one, starts over (`--resume` on a directory without a checkpoint starts fresh)."""
    return run.is_dir()


def _selected(cfg: PipelineConfig) -> list[str]:
    only = [s for s in cfg.only.split(",") if s]
    skip = [s for s in cfg.skip.split(",") if s]
    for s in only + skip:
        if s not in STAGES:
            raise ConfigError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
    return [s for s in STAGES if (not only or s in only) and s not in skip]


def run_pipeline(cfg: PipelineConfig) -> Path:
    from .cli import main as cli

    if cfg.budget not in BUDGETS:
        raise ConfigError(f"--budget must be one of {', '.join(BUDGETS)}, got {cfg.budget!r}")
    flags = stage_flags(cfg.preset, cfg.budget)
    root = Path(cfg.out)
    record_path = root / "pipeline.json"
    try:
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
    except json.JSONDecodeError:
        raise ConfigError(f"'{record_path}' is corrupt: remove it (the stages' own directories are kept and "
                          "reused) and rerun") from None
    if record.get("budget", "minutes") != cfg.budget and record.get("stages"):
        raise ConfigError(f"'{root}' was made with --budget {record.get('budget', 'minutes')}; its stages would "
                          f"be reused under --budget {cfg.budget}: choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    record.update({"preset": cfg.preset, "corpus": cfg.corpus, "budget": cfg.budget})
    record.setdefault("stages", {})
    paths = {name: root / name for name in ("base", "sft", "sft_lora", "rm", "grpo", "ppo", "ppo_task", "dpo",
                                            "distill")}
    paths["prefs"] = root / "prefs.jsonl"

    def train_stage(name: str, out: Path, argv: list[str]) -> None:
        if _finished(out):
            return _mark(name, "reused")
        resume = ["--resume"] if _started(out) else []
        _run(name, argv + ["--out", str(out), "--seed", str(cfg.seed), "--no-progress"] + resume)

    def _run(name: str, argv: list[str]) -> None:
        print(f"\n=== {name}: gptstack {' '.join(argv)}", flush=True)
        t0 = time.time()
        code = cli(argv)
        if code != 0:
            _mark(name, "failed", time.time() - t0)
            raise GptstackError(f"stage {name} failed (exit {code}); fix the error above and rerun the same command "
                                "to continue from this stage")
        _mark(name, "done", time.time() - t0)

    def _mark(name: str, status: str, seconds: float | None = None) -> None:
        entry = record["stages"].setdefault(name, {})
        entry["status"] = status
        if seconds is not None:
            entry["seconds"] = round(seconds, 1)
        _write_json(record_path, record)

    def n_pairs() -> int:
        return sum(1 for line in paths["prefs"].read_text().splitlines() if line.strip()) if paths["prefs"].exists() else 0

    stages = _selected(cfg)
    t_start = time.time()
    for name in stages:
        if name in FIXED_WORK_STEPS.get(cfg.preset, {}):   # what the report holds this stage's steps against
            record["stages"].setdefault(name, {})["expected_steps"] = FIXED_WORK_STEPS[cfg.preset][name]
        if name in ("rm", "ppo", "dpo") and paths["prefs"].exists() and n_pairs() == 0:
            # every sampled reply tied under the checkers: there is nothing to learn a preference from
            print(f"\n=== {name}: skipped, {paths['prefs']} has no preference pairs (all replies tied)", flush=True)
            _mark(name, "skipped")
            record["stages"][name]["error"] = "no preference pairs: every sampled reply tied"
            _write_json(record_path, record)
            continue
        if name == "base":
            train_stage(name, paths["base"], ["pretrain", "--corpus", cfg.corpus] + flags["base"])
        elif name == "sft":
            train_stage(name, paths["sft"], ["sft", str(paths["base"])] + flags["sft"])
        elif name == "sft_lora":
            train_stage(name, paths["sft_lora"], ["sft", str(paths["base"])] + flags["sft_lora"])
        elif name == "prefs":
            # prefs.jsonl only ever appears complete (save_preferences writes a temp file, fsyncs, renames), so
            # a file that exists is a finished stage; a kill mid-sampling leaves none and the stage runs again
            if paths["prefs"].exists():
                _mark(name, "reused")
            else:
                _run(name, ["preferences", str(paths["sft"]), "--out", str(paths["prefs"]), "--seed", str(cfg.seed)]
                     + flags["prefs"])
        elif name == "rm":
            train_stage(name, paths["rm"], ["reward", str(paths["sft"]), "--prefs", str(paths["prefs"])] + flags["rm"])
        elif name == "grpo":
            train_stage(name, paths["grpo"], ["rl", str(paths["sft"])] + flags["grpo"])
        elif name == "ppo":
            train_stage(name, paths["ppo"], ["rl", str(paths["sft"]), "--reward", f"rm:{paths['rm']}"] + flags["ppo"])
        elif name == "ppo_task":
            train_stage(name, paths["ppo_task"], ["rl", str(paths["sft"]), "--reward", "task"] + flags["ppo_task"])
        elif name == "dpo":
            train_stage(name, paths["dpo"], ["dpo", str(paths["sft"]), "--prefs", str(paths["prefs"])] + flags["dpo"])
        elif name == "distill":
            # the weaker LoRA model learns from the full SFT model on its own samples (reverse KL per token)
            train_stage(name, paths["distill"], ["distill", str(paths["sft_lora"]), "--teacher", str(paths["sft"])]
                        + flags["distill"])
        elif name == "eval":
            t0 = time.time()
            from .eval.pipeline_eval import evaluate_pipeline

            n = int(flags["eval"][flags["eval"].index("--n-examples") + 1])
            fresh = evaluate_pipeline(root, n_examples=n, seed=cfg.seed)
            _mark(name, "done" if fresh else "reused", time.time() - t0 if fresh else None)
        elif name == "report":
            from .eval.report import build_report

            t0 = time.time()
            path = build_report(root)
            _mark(name, "done", time.time() - t0)
            print(f"\nreport: {path.resolve()}")
    record["total_seconds_this_run"] = round(time.time() - t_start, 1)
    _write_json(record_path, record)
    return root / "report.html"
