"""Configuration: every stage's config dataclass, documented field by field, torch-free.

Each field is declared with `opt(default, help, choices=...)`: its documentation and its allowed values live
here once, and the CLI's `--help`, the flag parser, the preset validator and `validate()` all read them.
Presets (src/gptstack/presets/*.toml, loaded by pipeline/presets.py) fill these same fields.

The depth dial (after nanochat; model/gpt.py `model_config_from_depth`): everything follows from the
number of layers.
    n_embd     = 64 · depth                      (aspect ratio 64)
    head_dim   = 64 below 1024 wide, else 128;   n_head = n_embd / head_dim;  n_kv_head = n_head (GQA by flag)
    mlp_hidden = 8/3 · n_embd rounded up to 64   (SwiGLU keeps the 4x MLP's parameter count)
    LRs        = Muon 0.02 for hidden matrices; AdamW for embeddings 0.2 and the head 0.004, both scaled by
                 (n_embd / 768)^-0.5 so wider models take smaller Adam steps
    tokens     = 20 · parameters (Chinchilla) unless a step or time budget is given
    batch      = 2^19 tokens per step on GPU presets (d12, d20), 8 Ki on the CPU preset (tiny)
Each value stays overridable by its own flag.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from .errors import ConfigError


def opt(default: Any, help: str, choices: tuple | None = None):
    """A config field with its documentation (shown by `--help`) and, optionally, its allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


def again(cls, name: str, default: Any):
    """The field `name` of `cls` with another default: a subclass changes a default, not the documentation."""
    f = cls.__dataclass_fields__[name]
    return field(default=default, metadata=f.metadata)


def field_help(f) -> str:
    return f.metadata.get("help", "")


def field_choices(f) -> tuple | None:
    return f.metadata.get("choices")


def settable_fields(cls) -> list:
    """The fields a user sets (flags, preset keys): all but those the stage derives itself (`DERIVED`)."""
    derived = getattr(cls, "DERIVED", {})
    return [f for f in fields(cls) if f.name not in derived]


def check_choices(cfg) -> None:
    for f in fields(cfg):
        allowed = field_choices(f)
        if allowed and getattr(cfg, f.name) not in allowed:
            raise ConfigError(f"--{f.name.replace('_', '-')} must be one of {', '.join(map(str, allowed))}, "
                              f"got {getattr(cfg, f.name)!r}")


def apply_preset(cfg, values: dict, explicit: set[str] = frozenset()):
    """Fill `cfg` from a preset's values for its stage, leaving fields the user set explicitly untouched."""
    check_fields(type(cfg), values, "preset")
    return replace(cfg, **{k: v for k, v in values.items() if k not in explicit})


def check_fields(cls, values: dict, where: str) -> None:
    """Every key must be a settable field of `cls` with a value of the field's type (a clear error otherwise)."""
    known = {f.name: f for f in settable_fields(cls)}
    derived = getattr(cls, "DERIVED", {})
    for key, value in values.items():
        if key in derived:
            raise ConfigError(f"{where}: '{key}' is not a setting of {cls.__name__}: {derived[key]}")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"{where}: unknown field '{key}' for {cls.__name__}"
                              + (f" (did you mean '{close[0]}'?)" if close else ""))
        default = known[key].default
        ok = (isinstance(value, bool) if isinstance(default, bool) else
              isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float) else
              isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int) else
              isinstance(value, str) if isinstance(default, str) else True)
        if not ok:
            raise ConfigError(f"{where}: '{key}' must be {type(default).__name__}, got {value!r}")


def env_world() -> int:
    """The number of ranks torchrun started (WORLD_SIZE); 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def check_batch_divides(total_batch_tokens: int, batch_size: int, seq_len: int, world: int) -> None:
    """--total-batch-tokens must be whole micro-batches of every rank: the one message for it (TrainConfig
    .validate checks it before any process group exists, the loop again once a stage has derived seq_len)."""
    micro = batch_size * seq_len * world
    if total_batch_tokens and micro and total_batch_tokens % micro:
        raise ConfigError(f"--total-batch-tokens {total_batch_tokens} is not a multiple of batch-size x seq-len x "
                          f"world = {batch_size} x {seq_len} x {world} = {micro}"
                          f"{f': {world} ranks do not divide the batch' if world > 1 else ''}")


def config_to_dict(cfg) -> dict:
    return asdict(cfg)


def config_from_dict(cls, d: dict):
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


# ---- what every training stage shares ---------------------------------------------------------------------

# SFT curricula (data/datamap.py orders the data set by its map)
CURRICULA = ("random", "center-out", "outside-in", "easy-first", "hard-first")

@dataclass
class TrainConfig:
    """Budget, batch, optimizer, schedule, logging, checkpoints: the training loop's settings."""
    # fields a stage derives itself instead of reading (not offered as flags; a preset setting one is an error)
    DERIVED: ClassVar[dict[str, str]] = {
        "eval_tokens": "only pretraining measures held-out text", "sample_every": "only pretraining samples text"}
    FSDP: ClassVar[bool] = False   # whether the stage can train with --parallel fsdp (every stage of gptstack's)

    out: str = opt("runs/base", "the run directory to write (and resume)")
    steps: int = opt(0, "optimizer steps; 0: follow from --minutes, or from the token budget")
    minutes: float = opt(0.0, "wall-clock training budget; the LR schedule then runs on elapsed time "
                              "(with --steps too, whichever ends first); 0: no time limit")
    batch_size: int = opt(16, "rows per micro-batch (per rank)")
    seq_len: int = opt(256, "tokens per row")
    total_batch_tokens: int = opt(0, "tokens per optimizer step; more than a micro-batch x ranks means gradient "
                                     "accumulation; 0: one micro-batch per step")
    optimizer: str = opt("muon", "muon: Muon on hidden matrices + AdamW elsewhere; adamw: AdamW everywhere",
                         ("muon", "adamw"))
    lr: float = opt(3e-3, "AdamW learning rate with --optimizer adamw; also of LoRA factors and heads")
    matrix_lr: float = opt(0.02, "Muon learning rate (hidden matrices)")
    embedding_lr: float = opt(0.2, "AdamW learning rate of the embeddings (scaled by (n_embd/768)^-0.5)")
    unembedding_lr: float = opt(0.004, "AdamW learning rate of lm_head (scaled likewise)")
    scalar_lr: float = opt(0.02, "AdamW learning rate of norm gains and other vectors")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    schedule: str = opt("wsd", "LR schedule: warmup-stable-decay, cosine, or constant after warmup",
                        ("wsd", "cosine", "constant"))
    warmup_frac: float = opt(0.02, "fraction of the budget spent warming up")
    decay_frac: float = opt(0.4, "wsd: the final fraction of the budget spent decaying to --min-lr-frac")
    min_lr_frac: float = opt(0.0, "the LR at the end, as a fraction of the peak")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    eval_every: int = opt(100, "evaluate every N steps (0: only at the end)")
    eval_tokens: int = opt(131072, "held-out tokens per evaluation")
    log_every: int = opt(10, "log every N steps")
    sample_every: int = opt(0, "print a sample every N steps (0: never)")
    save_every: int = opt(0, "checkpoint every N steps (0: at the end, and when interrupted)")
    seed: int = opt(0, "random seed (data order, initialisation, sampling)")
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "auto: bf16 autocast on GPUs and on CPUs with native bf16, else fp32",
                     ("auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"))
    compile: bool = opt(False, "torch.compile the model")
    parallel: str = opt("ddp", "under torchrun: ddp (every rank holds the whole model) or fsdp (FSDP2: parameters, "
                               "gradients and optimizer state sharded across ranks)", ("ddp", "fsdp"))
    activation_checkpointing: bool = opt(False, "recompute each Transformer block in the backward pass instead of "
                                                "keeping its activations (less memory, ~1/3 more compute)")
    resume: bool = opt(False, "continue from the run's last committed checkpoint")
    progress: bool = opt(True, "show a progress bar")
    wandb: str = opt("", "a wandb project name: log there too (when wandb is installed)")
    tensorboard: bool = opt(False, "also write TensorBoard logs under the run directory")

    def validate(self) -> None:
        check_choices(self)
        if self.batch_size < 1 or self.seq_len < 2:
            raise ConfigError("--batch-size must be >= 1 and --seq-len >= 2")
        if self.steps < 0 or self.minutes < 0:
            raise ConfigError("--steps and --minutes cannot be negative")
        if self.parallel == "fsdp" and not self.FSDP:
            raise ConfigError(f"--parallel fsdp is not supported yet for this stage ({type(self).__name__}): train "
                              "it with --parallel ddp (the default)")
        if self.parallel == "fsdp" and env_world() < 2:
            # checked here, before any data is read or model built, not when the loop starts
            raise ConfigError("--parallel fsdp shards the model across processes: run it under torchrun "
                              "--nproc_per_node N (N >= 2), or drop --parallel fsdp")
        # before any process group exists: under torchrun every rank exits 2 at once, nothing waits on a peer
        check_batch_divides(self.total_batch_tokens, self.batch_size, self.seq_len, env_world())

    def check_rollout_divides(self, n_prompts: int) -> None:
        """RL and on-policy distillation give each FSDP rank whole prompts' groups of every rollout."""
        world = env_world()
        if self.parallel == "fsdp" and world > 1 and n_prompts % world:
            raise ConfigError(f"--n-prompts {n_prompts} is not a multiple of the {world} ranks: under --parallel "
                              "fsdp each rank trains on whole prompts' samples of every rollout")


@dataclass
class LoraOptions:
    """LoRA through PEFT, the same flags and defaults in every stage that trains a policy."""
    lora: bool = opt(False, "train LoRA adapters on a frozen base instead of every weight")
    lora_rank: int = opt(16, "LoRA rank r")
    lora_alpha: float = opt(32.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input")
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                            "comma-separated module names that get adapters (lm_head / embed_tokens only when listed)")

    def validate_lora(self) -> None:
        if self.lora and (self.lora_rank < 1 or self.lora_alpha <= 0):
            raise ConfigError("--lora-rank must be at least 1 and --lora-alpha positive")


DEFAULT_LORA_TARGETS = LoraOptions.__dataclass_fields__["lora_targets"].default


@dataclass
class PretrainConfig(TrainConfig):
    DERIVED: ClassVar[dict[str, str]] = {}
    FSDP: ClassVar[bool] = True
    corpus: str = opt("shakespeare", "the text: shakespeare (embedded), a .txt file or folder, .jsonl, .parquet, "
                                     "or a datasets name")
    text_field: str = opt("text", "the text field of .jsonl / .parquet / datasets documents")
    tokenizer: str = opt("", "a tokenizer or run directory to reuse; empty: train one on the corpus")
    vocab_size: int = opt(8192, "vocabulary size of a newly trained tokenizer")
    val_frac: float = opt(0.05, "fraction of documents held out for validation bits per byte")
    depth: int = opt(4, "Transformer layers: the dial the width, heads and LRs follow")
    n_kv_head: int = opt(0, "key/value heads for grouped-query attention; 0: as many as query heads")
    n_embd: int = opt(0, "model width; 0: 64 x depth")
    qk_norm: bool = opt(True, "RMS-normalise queries and keys per head")
    tie_embeddings: bool = opt(False, "share the embedding and lm_head matrices")
    tokens_per_param: float = opt(20.0, "token budget in tokens per parameter (Chinchilla: 20), when neither "
                                        "--steps nor --minutes is given")


@dataclass
class SFTConfig(LoraOptions, TrainConfig):
    FSDP: ClassVar[bool] = True
    data: str = opt("tasks", "tasks (the embedded suite), a conversations .jsonl/.json, or hf:NAME[:SPLIT]")
    tasks: str = opt("all", "with --data tasks: 'all' or task names, each optionally NAME:WEIGHT")
    examples_per_task: int = opt(3000, "with --data tasks: train-split examples per task (times its weight)")
    max_examples: int = opt(0, "file data: read at most this many conversations (0: all)")
    val_conversations: int = opt(280, "conversations held out for the periodic masked val loss (tasks: from the "
                                      "test split)")
    pack: bool = opt(True, "pack several conversations per row (measured 2.0x the trained tokens/s of padding)")
    order: str = opt("random", "the curriculum: random (a fresh shuffle each epoch), or one fixed order every "
                               "epoch: center-out (nearest the MiniLM embedding centroid first), outside-in, "
                               "easy-first (highest cartography confidence first) or hard-first (lowest first; "
                               "both need --cartography-from)", CURRICULA)
    cartography: bool = opt(False, "record each conversation's training dynamics (confidence, variability, "
                                   "correctness over epochs) from the loss the step already computes, into "
                                   "RUN/cartography.jsonl; draw it with 'gptstack datamap --cartography RUN'")
    cartography_from: str = opt("", "with --order easy-first/hard-first: a run trained with --cartography on the "
                                    "same data (or its cartography.jsonl)")
    kl_to_base: float = opt(0.0, "beta: add beta * KL(policy || starting model) on the assistant tokens to the "
                                 "cross-entropy, anchoring SFT to the base's distribution (0: plain SFT)")
    lora_train_specials: bool = opt(True, "with --lora: also train the embedding and head rows of the chat special "
                                          "tokens (a young base has never seen them)")
    qlora: bool = opt(False, "LoRA on a 4-bit (nf4) base through bitsandbytes; implies --lora")
    # SFT defaults: the formats are new but the model is not, so the steps are smaller than pretraining's
    out: str = again(TrainConfig, "out", "runs/sft")
    steps: int = again(TrainConfig, "steps", 200)
    minutes: float = again(TrainConfig, "minutes", 2.5)
    batch_size: int = again(TrainConfig, "batch_size", 8)
    seq_len: int = opt(0, "tokens per row; 0: the parent model's context")
    lr: float = opt(1e-2, "AdamW learning rate: LoRA factors (with Muon, nothing else); lower it for "
                          "--optimizer adamw")
    matrix_lr: float = again(TrainConfig, "matrix_lr", 0.01)
    embedding_lr: float = again(TrainConfig, "embedding_lr", 0.1)
    warmup_frac: float = again(TrainConfig, "warmup_frac", 0.05)
    decay_frac: float = again(TrainConfig, "decay_frac", 0.5)
    eval_every: int = again(TrainConfig, "eval_every", 25)
    log_every: int = again(TrainConfig, "log_every", 5)

    def validate(self) -> None:
        super().validate()
        self.validate_lora()
        if self.examples_per_task < 1:
            raise ConfigError(f"--examples-per-task must be at least 1, got {self.examples_per_task}")
        if self.max_examples < 0 or self.val_conversations < 0:
            raise ConfigError("--max-examples and --val-conversations cannot be negative")
        by_confidence = self.order in ("easy-first", "hard-first")
        if by_confidence and not self.cartography_from:
            raise ConfigError(f"--order {self.order} follows a cartography map's confidence: give --cartography-from "
                              "RUN (a run trained with --cartography on this data)")
        if self.cartography_from and not by_confidence:
            raise ConfigError("--cartography-from is read only by --order easy-first or hard-first")
        if not 0 <= self.kl_to_base < float("inf"):   # NaN fails this too
            raise ConfigError(f"--kl-to-base must be a finite beta >= 0, got {self.kl_to_base}")


@dataclass
class PolicyConfig(LoraOptions, TrainConfig):
    """What the stages that start from a trained model share (reward model, RL, DPO, distillation): AdamW at a
    small LR on a model that already works, and the LoRA options."""
    FSDP: ClassVar[bool] = True
    optimizer: str = again(TrainConfig, "optimizer", "adamw")
    lr: float = opt(1e-4, "learning rate")
    schedule: str = again(TrainConfig, "schedule", "cosine")
    warmup_frac: float = again(TrainConfig, "warmup_frac", 0.05)

    def validate(self) -> None:
        super().validate()
        self.validate_lora()


_ROLLOUT_BATCH = "the RL step's batch is its rollout: --n-prompts x --samples rows, split into --minibatches"
_PAIR_ROWS = "pair rows are prompt + reply, cut at --max-len"
_ONE_BATCH = "one batch of --batch-size rows per step"


@dataclass
class RLConfig(PolicyConfig):
    DERIVED: ClassVar[dict[str, str]] = {**TrainConfig.DERIVED, "batch_size": _ROLLOUT_BATCH,
                                         "total_batch_tokens": _ROLLOUT_BATCH,
                                         "seq_len": "rows are prompt + up to --max-new-tokens reply tokens"}
    out: str = again(TrainConfig, "out", "runs/rl")
    algo: str = opt("grpo", "grpo: group-relative advantages, no value model; ppo: a value head and GAE",
                    ("grpo", "ppo"))
    reward: str = opt("task", "reward terms, comma-separated, each optionally TERM=WEIGHT: task (the task's "
                              "checker), rm:RUN (a reward model), semantic (MiniLM similarity to the reference), "
                              "teacher:RUN (a teacher's mean log-probability)")
    tasks: str = opt("extraction,spelling", "tasks whose prompts are rolled out (see 'gptstack tasks list')")
    train_examples: int = opt(2000, "the pool of training prompts, visited in a seeded order")
    eval_examples: int = opt(64, "held-out (test split) prompts per task for the greedy accuracy")
    n_prompts: int = opt(16, "prompts per rollout")
    samples: int = opt(8, "replies sampled per prompt (GRPO's group size)")
    max_new_tokens: int = opt(40, "the longest reply, in new tokens")
    temperature: float = opt(1.0, "sampling temperature of the rollouts")
    top_k: int = opt(0, "top-k of the rollouts (0: off)")
    update_epochs: int = opt(2, "passes over each rollout (sampling is the cost, so reuse it, clipped)")
    minibatches: int = opt(2, "optimizer steps per pass")
    clip: float = opt(0.2, "PPO ratio clip epsilon")
    kl_coef: float = opt(0.02, "GRPO: beta on the k3 KL term; PPO: the initial per-token KL penalty")
    kl_target: float = opt(0.0, "PPO: > 0 makes the KL coefficient adaptive towards this KL (nats/sequence)")
    kl_horizon: int = opt(2000, "PPO adaptive KL: the horizon of the controller")
    gamma: float = opt(1.0, "PPO discount")
    lam: float = opt(0.95, "PPO GAE lambda")
    vf_coef: float = opt(0.5, "PPO value-loss weight")
    value_clip: float = opt(0.2, "PPO value clip")
    scale_rewards: bool = opt(True, "GRPO: divide advantages by the group's std (off: Dr. GRPO centring only)")
    steps: int = again(TrainConfig, "steps", 40)
    schedule: str = again(TrainConfig, "schedule", "constant")
    warmup_frac: float = again(TrainConfig, "warmup_frac", 0.0)
    eval_every: int = again(TrainConfig, "eval_every", 20)
    log_every: int = again(TrainConfig, "log_every", 1)

    def validate(self) -> None:
        super().validate()
        if self.algo == "grpo" and self.samples < 2:
            raise ConfigError(f"GRPO compares samples within a group: --samples must be at least 2, got {self.samples}")
        if self.samples < 1 or self.n_prompts < 1 or self.max_new_tokens < 1:
            raise ConfigError("--samples, --n-prompts and --max-new-tokens must be at least 1")
        if self.update_epochs < 1 or self.minibatches < 1 or self.minibatches > self.n_prompts * self.samples:
            raise ConfigError("--update-epochs must be >= 1 and --minibatches between 1 and n_prompts x samples")
        if self.kl_coef < 0 or self.clip <= 0:
            raise ConfigError("--kl-coef cannot be negative and --clip must be positive")
        self.check_rollout_divides(self.n_prompts)


@dataclass
class PairConfig(PolicyConfig):
    """Stages that learn from preference pairs (reward model, DPO)."""
    DERIVED: ClassVar[dict[str, str]] = {**TrainConfig.DERIVED, "seq_len": _PAIR_ROWS, "total_batch_tokens": _ONE_BATCH}
    prefs: str = opt("", "preference pairs (JSONL: prompt, chosen, rejected)")
    max_len: int = opt(192, "tokens per prompt + reply; longer replies are cut")
    val_frac: float = opt(0.15, "held-out pairs for accuracy and margins")
    batch_size: int = opt(16, "pairs per step")

    def validate(self) -> None:
        super().validate()
        if not self.prefs:
            raise ConfigError("give the preference pairs: --prefs FILE.jsonl")
        if not 0 <= self.val_frac < 1:
            raise ConfigError("--val-frac must be in [0, 1)")
        if self.max_len < 8:
            raise ConfigError("--max-len must be at least 8")


@dataclass
class DPOConfig(PairConfig):
    out: str = again(TrainConfig, "out", "runs/dpo")
    loss: str = opt("sigmoid", "sigmoid (DPO) or ipo", ("sigmoid", "ipo"))
    beta: float = opt(0.1, "strength of the implicit KL to the reference")
    val_frac: float = again(PairConfig, "val_frac", 0.1)
    steps: int = again(TrainConfig, "steps", 60)
    batch_size: int = again(PairConfig, "batch_size", 8)
    lr: float = again(PolicyConfig, "lr", 1e-5)
    warmup_frac: float = again(TrainConfig, "warmup_frac", 0.1)
    eval_every: int = again(TrainConfig, "eval_every", 30)
    log_every: int = again(TrainConfig, "log_every", 5)

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"--beta must be positive, got {self.beta}")


@dataclass
class RewardConfig(PairConfig):
    out: str = again(TrainConfig, "out", "runs/reward")
    steps: int = again(TrainConfig, "steps", 120)
    eval_every: int = again(TrainConfig, "eval_every", 40)


@dataclass
class DistillConfig(PolicyConfig):
    DERIVED: ClassVar[dict[str, str]] = {**TrainConfig.DERIVED, "total_batch_tokens": _ONE_BATCH}
    out: str = again(TrainConfig, "out", "runs/distill")
    teacher: str = opt("", "the teacher run")
    mode: str = opt("onpolicy", "offline: SFT on the teacher's replies; onpolicy: reverse KL to the teacher on the "
                                "student's own samples; compare: both from the same student, side by side",
                    ("offline", "onpolicy", "compare"))
    tasks: str = again(RLConfig, "tasks", "extraction,spelling")
    train_examples: int = opt(512, "prompts the teacher answers (offline) / the student samples on (onpolicy)")
    eval_examples: int = again(RLConfig, "eval_examples", 64)
    max_new_tokens: int = again(RLConfig, "max_new_tokens", 40)
    temperature: float = opt(1.0, "sampling temperature")
    teacher_samples: int = opt(1, "offline: teacher replies per prompt")
    filter_correct: bool = opt(False, "offline: keep only teacher replies the task's checker accepts")
    n_prompts: int = opt(8, "onpolicy: prompts per rollout")
    samples: int = opt(4, "onpolicy: student replies sampled per prompt")
    steps: int = again(TrainConfig, "steps", 40)
    batch_size: int = opt(16, "offline: rows per step")
    seq_len: int = opt(256, "offline: tokens per row")
    schedule: str = again(TrainConfig, "schedule", "constant")
    warmup_frac: float = again(TrainConfig, "warmup_frac", 0.0)
    eval_every: int = again(TrainConfig, "eval_every", 0)
    log_every: int = again(TrainConfig, "log_every", 5)

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise ConfigError("give the teacher run: --teacher RUN_DIR")
        if self.mode != "offline":
            self.check_rollout_divides(self.n_prompts)


# ---- stages that sample or measure (no training loop) ------------------------------------------------------

@dataclass
class PreferencesConfig:
    """Sample replies from a model and rank them by the task checkers into preference pairs."""
    out: str = opt("prefs.jsonl", "the preference JSONL to write")
    tasks: str = opt("extraction,spelling", "tasks whose prompts are sampled")
    samples: int = opt(4, "replies sampled per prompt (best vs worst becomes a pair)")
    n_prompts: int = opt(256, "prompts sampled")
    temperature: float = opt(1.0, "sampling temperature")
    max_new_tokens: int = opt(40, "the longest reply, in new tokens")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")

    def validate(self) -> None:
        if self.samples < 2 or self.n_prompts < 1 or self.max_new_tokens < 1:
            raise ConfigError("--samples must be at least 2 (a pair needs two replies), --n-prompts and "
                              "--max-new-tokens at least 1")


@dataclass
class EvalConfig:
    """The pipeline's evaluation of every stage (task accuracy, RL, ensembles, retrieval, diversity, JSON)."""
    n_examples: int = opt(40, "test examples per task for the per-stage accuracy table (the RL task gets 10x)")

    def validate(self) -> None:
        if self.n_examples < 1:
            raise ConfigError("eval n_examples must be at least 1")


BUDGETS = ("minutes", "steps")


@dataclass
class PipelineConfig:
    """The main job: every stage in order, its evaluation and the report."""
    preset: str = opt("tiny", "the stage settings: a name under src/gptstack/presets/ (tiny, micro, d12, d20) or "
                              "a .toml file of your own")
    out: str = opt("runs/tiny", "RUN_ROOT: every stage writes under it; finished stages are reused")
    corpus: str = opt("shakespeare", "pretraining text (see gptstack pretrain --help)")
    budget: str = opt("minutes", "minutes: wall-clock per stage (a faster machine trains more); steps: the preset's "
                                 "fixed optimizer steps per stage (the same assistant on any machine)", BUDGETS)
    only: str = opt("", "comma-separated stages to run (the others must already exist where needed)")
    skip: str = opt("", "comma-separated stages to leave out")
    seed: int = opt(0, "random seed of every stage")
    parallel: str = opt("ddp", "under torchrun: how every training stage runs, ddp (every rank holds the whole "
                               "model) or fsdp (FSDP2: sharded across the ranks)", ("ddp", "fsdp"))
    base: str = opt("", "start from a Hugging Face model (a directory or hub id) instead of pretraining: the base "
                        "stage imports it (gptstack import) and every later stage trains on it")

    def validate(self) -> None:
        check_choices(self)
        if self.parallel == "fsdp" and env_world() < 2:
            raise ConfigError("--parallel fsdp shards the models across processes: run the pipeline under torchrun "
                              "--nproc_per_node N (N >= 2), or drop --parallel fsdp")


def default_of(cls, name: str):
    f = cls.__dataclass_fields__[name]
    return f.default if f.default is not MISSING else None
