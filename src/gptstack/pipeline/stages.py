"""The stage table: every stage of the pipeline named once, in order.

The pipeline runs these in order, the presets have one section per stage (validated against the stage's
config class), the evaluation scores the stages marked `evaluated`, and the report takes each stage's label
and plot colour from here. Torch-free (the CLI's `--help` reads it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import (DistillConfig, DPOConfig, EvalConfig, PreferencesConfig, PretrainConfig, RewardConfig,
                      RLConfig, SFTConfig)
from ..errors import ConfigError


@dataclass(frozen=True)
class StageSpec:
    name: str              # key in presets, pipeline.json, report.json; also its output's name under RUN_ROOT
    label: str             # in the report's tables and plots
    config: type | None    # the config class its preset section fills (None: nothing to set)
    output: str = ""       # path under RUN_ROOT ("" for stages that write only the root's own files)
    color: str = "#94a3b8"
    evaluated: bool = False    # a policy: scored on the tasks, diversity and JSON by the evaluation stage
    trains: bool = False       # runs the training loop: has steps, a run directory, a --budget steps count
    needs_prefs: bool = False  # learns from the preference pairs (skipped when every reply tied)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("base", "Base (pretrain)", PretrainConfig, "base", "#6b7280", evaluated=True, trains=True),
    StageSpec("sft", "SFT", SFTConfig, "sft", "#2563eb", evaluated=True, trains=True),
    StageSpec("sft_lora", "SFT · LoRA", SFTConfig, "sft_lora", "#0891b2", evaluated=True, trains=True),
    StageSpec("prefs", "Preference pairs", PreferencesConfig, "prefs.jsonl"),
    StageSpec("rm", "Reward model", RewardConfig, "rm", "#dc2626", trains=True, needs_prefs=True),
    StageSpec("grpo", "GRPO (task)", RLConfig, "grpo", "#16a34a", evaluated=True, trains=True),
    StageSpec("ppo", "PPO (RM)", RLConfig, "ppo", "#d97706", evaluated=True, trains=True, needs_prefs=True),
    StageSpec("ppo_task", "PPO (task)", RLConfig, "ppo_task", "#b45309", evaluated=True, trains=True),
    StageSpec("dpo", "DPO", DPOConfig, "dpo", "#9333ea", evaluated=True, trains=True, needs_prefs=True),
    StageSpec("distill", "Distilled (LoRA ← SFT)", DistillConfig, "distill", "#db2777", evaluated=True, trains=True),
    StageSpec("eval", "Evaluation", EvalConfig),
    StageSpec("report", "Report", None),
)
BY_NAME = {s.name: s for s in STAGES}
NAMES = tuple(s.name for s in STAGES)
EVALUATED = tuple(s.name for s in STAGES if s.evaluated)
TRAINED = tuple(s.name for s in STAGES if s.trains)
# colours for stages a user adds that the table does not know (stable per name)
EXTRA_COLORS = ("#db2777", "#65a30d", "#0f766e", "#7c3aed", "#b45309")


def stage(name: str) -> StageSpec:
    if name not in BY_NAME:
        raise ConfigError(f"unknown stage {name!r}; stages are {', '.join(NAMES)}")
    return BY_NAME[name]


def label(name: str) -> str:
    return BY_NAME[name].label if name in BY_NAME else ("Tokenizer" if name == "tokenizer" else name)


def color(name: str) -> str:
    if name in BY_NAME and BY_NAME[name].color != StageSpec.color:
        return BY_NAME[name].color
    return EXTRA_COLORS[sum(map(ord, name)) % len(EXTRA_COLORS)]
