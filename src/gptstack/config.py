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
import os
from dataclasses import asdict, dataclass, fields, replace

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # torch is imported lazily so `gptstack --help` starts fast
    import torch
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
