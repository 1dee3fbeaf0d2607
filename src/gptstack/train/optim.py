"""Parameter groups, optimizers and learning-rate schedules.

optimizer="muon" (the default, as in modded-nanogpt and nanochat): Muon (train/muon.py: torch.optim.Muon's
update, orthogonalised in the precision this device is fast in) for the 2-D hidden matrices of the blocks, AdamW for everything else (embeddings, head, norm gains, LoRA factors,
scalar heads). optimizer="adamw": AdamW for all. Each group records its `initial_lr`; the schedule scales it.
Under FSDP (`--parallel fsdp`) the optimizers are built after sharding, on the ranks' shards (DTensors, dim 0):
AdamW is elementwise and runs on them as is; Muon gathers each matrix to orthogonalise it (muon.py).
"""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig
from ..devices import matmul_dtype
from .muon import Muon


def _is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    # Muon orthogonalises whole weight matrices; LoRA factors and heads are left to AdamW.
    return p.ndim == 2 and "layers." in name and "lora_" not in name and "embed" not in name


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig, n_embd: int) -> list[torch.optim.Optimizer]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    scale = (n_embd / 768) ** -0.5
    fused = {"fused": True} if torch.cuda.is_available() else {}
    betas = (0.8, 0.95)
    optimizers = []
    if cfg.optimizer == "muon":
        matrices = [p for n, p in named if _is_hidden_matrix(n, p)]
        rest = [(n, p) for n, p in named if not _is_hidden_matrix(n, p)]
        groups = {"embed": [], "head": [], "scalar": [], "other": []}
        for n, p in rest:
            if "embed_tokens" in n and "lora_" not in n:
                groups["embed"].append(p)
            elif n.endswith("lm_head.weight") and "lora_" not in n:
                groups["head"].append(p)
            elif p.ndim < 2:
                groups["scalar"].append(p)
            else:
                groups["other"].append(p)
        lrs = {"embed": cfg.embedding_lr * scale, "head": cfg.unembedding_lr * scale,
               "scalar": cfg.scalar_lr, "other": cfg.lr}
        adam_groups = [{"params": ps, "lr": lrs[k], "initial_lr": lrs[k]} for k, ps in groups.items() if ps]
        if adam_groups:
            optimizers.append(torch.optim.AdamW(adam_groups, betas=betas, eps=1e-10, weight_decay=0.0, **fused))
        if matrices:
            optimizers.append(Muon([{"params": matrices, "lr": cfg.matrix_lr, "initial_lr": cfg.matrix_lr}],
                                   weight_decay=cfg.weight_decay, momentum=0.95,
                                   ns_dtype=matmul_dtype(matrices[0].device)))
    else:
        decay = [p for n, p in named if p.ndim >= 2]
        no_decay = [p for n, p in named if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "initial_lr": cfg.lr},
                  {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr, "initial_lr": cfg.lr}]
        optimizers.append(torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), eps=1e-8,
                                            **fused))
    return optimizers


def lr_multiplier(progress: float, cfg: TrainConfig) -> float:
    """LR scale at `progress` in [0, 1] (fraction of steps, or of the time budget)."""
    progress = min(max(progress, 0.0), 1.0)
    if cfg.warmup_frac > 0 and progress < cfg.warmup_frac:
        return (progress + 1e-3) / cfg.warmup_frac
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        t = (progress - cfg.warmup_frac) / max(1e-8, 1 - cfg.warmup_frac)
        return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))
    # warmup-stable-decay: flat, then linear to min_lr_frac over the last decay_frac
    if progress < 1 - cfg.decay_frac:
        return 1.0
    t = (progress - (1 - cfg.decay_frac)) / max(1e-8, cfg.decay_frac)
    return 1.0 - (1 - cfg.min_lr_frac) * t


def set_lr(optimizers, multiplier: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * multiplier
