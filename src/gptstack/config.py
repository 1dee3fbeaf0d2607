"""Configuration: the depth dial, the shared training config, presets, and the one place devices are chosen.

The depth dial (after nanochat): everything follows from the number of layers.
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

import math
from dataclasses import asdict, dataclass, fields, replace

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # torch-free: `gptstack --help` builds every parser from these classes without torch
    from .model.gpt import GPTConfig


def model_config_from_depth(depth: int, vocab_size: int, seq_len: int, n_embd: int | None = None,
                            n_kv_head: int | None = None, **overrides) -> "GPTConfig":
    """The dial's model; `n_embd` overrides the width (heads and MLP follow the width), `n_kv_head` turns on
    grouped-query attention, other GPTConfig fields override directly."""
    from .model.gpt import GPTConfig

    if depth < 1:
        raise ConfigError(f"--depth must be at least 1, got {depth}")
    n_embd = n_embd or 64 * depth
    if n_embd < 64 or n_embd % 64:
        raise ConfigError(f"--n-embd must be a positive multiple of 64, got {n_embd}")
    head_dim = 64 if n_embd < 1024 else 128
    n_head = max(1, n_embd // head_dim)
    cfg = GPTConfig(vocab_size=vocab_size, n_layer=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head or n_head,
                    mlp_hidden=64 * math.ceil(8 * n_embd / 3 / 64), seq_len=seq_len)
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.n_embd % cfg.n_head or cfg.n_head % cfg.n_kv_head:
        raise ConfigError(f"n_embd {cfg.n_embd} must divide into n_head {cfg.n_head} heads, "
                          f"and n_head into n_kv_head {cfg.n_kv_head} groups")
    return cfg


@dataclass
class TrainConfig:
    """What every training stage shares: budget, batch, optimizer, schedule, logging, checkpoints."""
    out: str = "runs/base"
    steps: int = 0                 # 0: follow from minutes, or from the token budget
    minutes: float = 0.0           # wall-clock budget; the LR schedule then runs on elapsed time
    batch_size: int = 16           # rows per micro-batch (per rank)
    seq_len: int = 256
    total_batch_tokens: int = 0    # tokens per optimizer step; > micro-batch x world means gradient accumulation
    optimizer: str = "muon"        # muon: Muon on hidden matrices + AdamW elsewhere; adamw: AdamW everywhere
    lr: float = 3e-3               # AdamW-only learning rate (optimizer=adamw), also LoRA / heads
    matrix_lr: float = 0.02        # Muon
    embedding_lr: float = 0.2      # AdamW, embeddings (scaled by (n_embd/768)^-0.5)
    unembedding_lr: float = 0.004  # AdamW, lm_head (scaled likewise)
    scalar_lr: float = 0.02        # AdamW, norm gains and other vectors
    weight_decay: float = 0.0
    schedule: str = "wsd"          # wsd (warmup-stable-decay) | cosine | constant
    warmup_frac: float = 0.02
    decay_frac: float = 0.4        # wsd: the final fraction spent decaying to min_lr_frac
    min_lr_frac: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 131072
    log_every: int = 10
    sample_every: int = 0
    save_every: int = 0            # 0: save at the end (and when interrupted)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"            # auto: bf16 autocast on GPUs and on CPUs with native bf16, else fp32
    compile: bool = False
    resume: bool = False
    progress: bool = True
    wandb: str = ""                # project name: log there too when wandb is installed
    tensorboard: bool = False

    def validate(self) -> None:
        if self.optimizer not in ("muon", "adamw"):
            raise ConfigError(f"--optimizer must be muon or adamw, got {self.optimizer!r}")
        if self.schedule not in ("wsd", "cosine", "constant"):
            raise ConfigError(f"--schedule must be wsd, cosine or constant, got {self.schedule!r}")
        if self.batch_size < 1 or self.seq_len < 2:
            raise ConfigError("--batch-size must be >= 1 and --seq-len >= 2")
        if self.steps < 0 or self.minutes < 0:
            raise ConfigError("--steps and --minutes cannot be negative")


@dataclass
class PretrainConfig(TrainConfig):
    corpus: str = "shakespeare"
    text_field: str = "text"
    tokenizer: str = ""            # a tokenizer dir or run dir to reuse; empty: train one on the corpus
    vocab_size: int = 8192
    val_frac: float = 0.05
    depth: int = 4
    n_kv_head: int = 0             # 0: no GQA
    n_embd: int = 0                # 0: from depth
    qk_norm: bool = True
    tie_embeddings: bool = False
    tokens_per_param: float = 20.0


PRESETS: dict[str, dict] = {
    # 2-core CPU, minutes: d4, 8 Ki vocab, T=256
    "tiny": dict(depth=4, vocab_size=8192, seq_len=256, batch_size=32, total_batch_tokens=8192, minutes=6.0,
                 eval_every=100, eval_tokens=65536, sample_every=0),
    # one GPU node, hours: the nanochat-style speedrun scales
    "d12": dict(depth=12, vocab_size=32768, seq_len=2048, batch_size=32, total_batch_tokens=524288, minutes=0.0,
                eval_every=250, eval_tokens=10 * 524288, compile=True),
    "d20": dict(depth=20, vocab_size=32768, seq_len=2048, batch_size=32, total_batch_tokens=524288, minutes=0.0,
                eval_every=250, eval_tokens=10 * 524288, compile=True),
}


def apply_preset(cfg, preset: str, explicit: set[str] = frozenset()):
    """Fill `cfg` from a preset, leaving fields the user set explicitly (`explicit`) untouched."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    names = {f.name for f in fields(cfg)}
    return replace(cfg, **{k: v for k, v in PRESETS[preset].items() if k in names and k not in explicit})


def config_to_dict(cfg) -> dict:
    return asdict(cfg)


def config_from_dict(cls, d: dict):
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


# ---- stage configs (torch-free, so `gptstack --help` builds every parser without importing torch) ------

DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class SFTConfig(TrainConfig):
    out: str = "runs/sft"
    data: str = "tasks"            # "tasks" (the embedded suite), a conversations .jsonl/.json, or hf:NAME[:SPLIT]
    tasks: str = "all"             # data=tasks: "all" or a list of task names, each optionally name:weight
    examples_per_task: int = 3000  # data=tasks: train-split examples of each task
    max_examples: int = 0          # file data: read at most this many conversations (0: all)
    val_conversations: int = 280   # held out for the periodic masked val loss (tasks: from the test split)
    pack: bool = True              # several conversations per row (measured 2.0x the trained tokens/s of padding)
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: str = DEFAULT_LORA_TARGETS   # lm_head / embed_tokens only when listed
    lora_train_specials: bool = True   # also train the embedding and head rows of the chat special tokens
    qlora: bool = False            # LoRA on a 4-bit (nf4) base through bitsandbytes; implies lora
    # SFT defaults: the formats are new but the model is not, so the steps are smaller than pretraining's
    steps: int = 200               # whichever ends first: 200 steps (~2.8 min on an idle 2-core CPU) or 2.5 min
    minutes: float = 2.5
    batch_size: int = 8
    seq_len: int = 0               # 0: the parent model's context
    lr: float = 1e-2               # AdamW: LoRA factors (with Muon, nothing else); lower it for --optimizer adamw
    matrix_lr: float = 0.01
    embedding_lr: float = 0.1
    unembedding_lr: float = 0.004
    warmup_frac: float = 0.05
    decay_frac: float = 0.5
    eval_every: int = 25
    log_every: int = 5

    def validate(self) -> None:
        super().validate()
        if self.examples_per_task < 1:
            raise ConfigError(f"--examples-per-task must be at least 1, got {self.examples_per_task}")
        if self.max_examples < 0 or self.val_conversations < 0:
            raise ConfigError("--max-examples and --val-conversations cannot be negative")


# The tiny preset is the default above (2-core CPU, ~2.5 minutes); GPU presets train on more data for longer.


SFT_PRESETS: dict[str, dict] = {
    "tiny": {},
    "d12": dict(minutes=0.0, steps=1000, batch_size=32, examples_per_task=20000, eval_every=100, log_every=10,
                compile=True),
    "d20": dict(minutes=0.0, steps=1500, batch_size=32, examples_per_task=30000, eval_every=100, log_every=10,
                compile=True),
}


def apply_sft_preset(cfg: SFTConfig, preset: str, explicit: set[str] = frozenset()) -> SFTConfig:
    if preset not in SFT_PRESETS:
        raise ConfigError(f"unknown SFT preset {preset!r}; choose one of {', '.join(SFT_PRESETS)}")
    names = {f.name for f in fields(cfg)}
    return replace(cfg, **{k: v for k, v in SFT_PRESETS[preset].items() if k in names and k not in explicit})


@dataclass
class RLConfig(TrainConfig):
    out: str = "runs/rl"
    algo: str = "grpo"               # grpo | ppo
    reward: str = "task"             # task, rm:RUN, semantic, teacher:RUN, each optionally =WEIGHT
    tasks: str = "extraction,spelling"   # tasks the tiny SFT model gets partly right: where RL has signal
    train_examples: int = 2000       # the pool of training prompts, visited in a seeded order
    eval_examples: int = 64          # held-out (test split) prompts per task for the greedy accuracy
    n_prompts: int = 16              # prompts per rollout
    samples: int = 8                 # replies per prompt (GRPO's group size K)
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_k: int = 0
    update_epochs: int = 2           # passes over each rollout: sampling is the cost, so reuse it (clipped)
    minibatches: int = 2             # optimizer steps per pass
    clip: float = 0.2
    kl_coef: float = 0.02            # GRPO β on the k3 term; PPO's initial per-token KL penalty
    kl_target: float = 0.0           # PPO: > 0 makes the KL coefficient adaptive towards this KL (nats/seq)
    kl_horizon: int = 2000
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.5
    value_clip: float = 0.2
    scale_rewards: bool = True       # GRPO: divide by the group's std (False: Dr. GRPO centring only)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    steps: int = 40
    optimizer: str = "adamw"
    lr: float = 1e-4
    schedule: str = "constant"
    warmup_frac: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 20
    log_every: int = 1

    def validate(self) -> None:
        super().validate()
        if self.algo not in ("grpo", "ppo"):
            raise ConfigError(f"--algo must be ppo or grpo, got {self.algo!r}")
        if self.algo == "grpo" and self.samples < 2:
            raise ConfigError(f"GRPO compares samples within a group: --samples must be at least 2, got {self.samples}")
        if self.samples < 1 or self.n_prompts < 1 or self.max_new_tokens < 1:
            raise ConfigError("--samples, --n-prompts and --max-new-tokens must be at least 1")
        if self.update_epochs < 1 or self.minibatches < 1 or self.minibatches > self.n_prompts * self.samples:
            raise ConfigError("--update-epochs must be >= 1 and --minibatches between 1 and n_prompts x samples")
        if self.kl_coef < 0 or self.clip <= 0:
            raise ConfigError("--kl-coef cannot be negative and --clip must be positive")


@dataclass
class DPOConfig(TrainConfig):
    out: str = "runs/dpo"
    prefs: str = ""
    loss: str = "sigmoid"          # sigmoid (DPO) | ipo
    beta: float = 0.1
    max_len: int = 192
    val_frac: float = 0.1
    steps: int = 60
    batch_size: int = 8            # pairs per step
    optimizer: str = "adamw"
    lr: float = 1e-5
    schedule: str = "cosine"
    warmup_frac: float = 0.1
    eval_every: int = 30
    log_every: int = 5
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def validate(self) -> None:
        super().validate()
        if not self.prefs:
            raise ConfigError("give the preference pairs: --prefs FILE.jsonl")
        if self.loss not in ("sigmoid", "ipo"):
            raise ConfigError(f"--loss must be sigmoid or ipo, got {self.loss!r}")
        if self.beta <= 0:
            raise ConfigError(f"--beta must be positive, got {self.beta}")


@dataclass
class RewardConfig(TrainConfig):
    out: str = "runs/reward"
    prefs: str = ""                # preference JSONL (DESIGN.md format)
    max_len: int = 192             # tokens per prompt + reply; longer replies are cut
    val_frac: float = 0.15         # held-out pairs for accuracy and margin
    steps: int = 120
    batch_size: int = 16           # pairs per step (2x rows)
    optimizer: str = "adamw"
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_frac: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 40
    log_every: int = 10
    lora_rank: int = 0             # 0: fine-tune the whole trunk
    lora_alpha: float = 16.0

    def validate(self) -> None:
        super().validate()
        if not self.prefs:
            raise ConfigError("give the preference pairs: --prefs FILE.jsonl")
        if not 0 <= self.val_frac < 1:
            raise ConfigError("--val-frac must be in [0, 1)")
        if self.max_len < 8:
            raise ConfigError("--max-len must be at least 8")


@dataclass
class DistillConfig(TrainConfig):
    out: str = "runs/distill"
    teacher: str = ""
    mode: str = "onpolicy"           # offline | onpolicy | compare (both, from the same student, scored side by side)
    tasks: str = "extraction,spelling"
    train_examples: int = 512        # prompts the teacher answers (offline) / the student samples on (onpolicy)
    eval_examples: int = 64
    max_new_tokens: int = 40
    temperature: float = 1.0
    teacher_samples: int = 1         # offline: teacher replies per prompt
    filter_correct: bool = False     # offline: keep only teacher replies the task checker accepts
    n_prompts: int = 8               # onpolicy: prompts per rollout
    samples: int = 4                 # onpolicy: student samples per prompt
    steps: int = 40
    batch_size: int = 16
    seq_len: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-4
    schedule: str = "constant"
    warmup_frac: float = 0.0
    eval_every: int = 0
    log_every: int = 5
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise ConfigError("give the teacher run: --teacher RUN_DIR")
        if self.mode not in ("offline", "onpolicy", "compare"):
            raise ConfigError(f"--mode must be offline, onpolicy or compare, got {self.mode!r}")
