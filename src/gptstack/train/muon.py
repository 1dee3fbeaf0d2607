"""Muon (momentum orthogonalised by Newton-Schulz) for the hidden matrices, in the precision the device is fast in.

The update is torch.optim.Muon's (torch 2.13, after Keller Jordan's Muon): an EMA momentum buffer, a Nesterov
look-ahead, five quintic Newton-Schulz iterations with coefficients (3.4445, -4.7750, 2.0315) that push every
singular value of the update towards 1, decoupled weight decay, and the lr scaled by sqrt(max(1, rows/cols)).
The parameter-group keys and the per-parameter state ("momentum_buffer") are torch's too, so optimizer.pt
files written with torch.optim.Muon resume here.

What differs, and why:
- The iteration runs in `ns_dtype`. torch's always casts to bf16; that is the right choice on GPUs and on
  CPUs with native bf16, and a cliff on CPUs without it: on a 2-core Zen 3 the tiny model's orthogonalisation
  took 8.5 s per step in bf16 and 0.23 s in fp32 (bench/optimizer_step.py, figures in bench/RESULTS.md). The
  optimizer builder passes devices.matmul_dtype(device).
- Matrices of the same shape are orthogonalised together as one batched product (a Transformer has a handful
  of shapes), which saves per-matrix dispatch on small models.

Sharded matrices (FSDP2, `--parallel fsdp`: each parameter, its gradient and its momentum buffer are DTensors
holding rows [r*ceil(n/world), ...) on rank r): gather per matrix. The momentum update is elementwise, so it
runs on the local rows; then each matrix's Nesterov update is all-gathered, every rank orthogonalises the
full matrix and keeps its own rows for the parameter update. Newton-Schulz is not separable by rows (each
iteration multiplies by X X^T of the whole matrix), so this is the update the unsharded optimizer makes,
to rounding, and the momentum state stays sharded (what FSDP saves memory on). The price is one all-gather
of each hidden matrix per step (the volume of the forward's weight gather) and every rank repeating all of
the Newton-Schulz work; at the model sizes here that work is small next to the forward and backward
(bench/optimizer_step.py). Spreading the matrices round-robin over ranks (each orthogonalises 1/world of
them and sends the result back) is also exact and divides the compute; it needs a gather and a scatter per
matrix and an owner table, so it waits until the redundant compute shows up in a profile.
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalise(updates: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for each matrix of `updates` (n, rows, cols), computed in `dtype`: the quintic
    iteration X <- aX + (bA + cA^2) X with A = X X^T, after scaling each X to spectral norm <= 1 (Frobenius)."""
    a, b, c = coefficients
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:   # iterate on the wide orientation: the Gram matrix is then the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: torch.dtype = torch.bfloat16,
                 eps: float = 1e-7, adjust_lr_fn: str | None = None):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("Muon needs lr, momentum and weight_decay >= 0")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=NS_COEFFICIENTS, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only; got a parameter of shape {tuple(p.shape)}")
        # not a group key: optimizer.pt files stay interchangeable with torch.optim.Muon's
        self.ns_dtype = ns_dtype

    @staticmethod
    def _lr_scale(shape: torch.Size, adjust_lr_fn: str | None) -> float:
        rows, cols = shape
        if adjust_lr_fn == "match_rms_adamw":
            return 0.2 * math.sqrt(max(rows, cols))
        return math.sqrt(max(1.0, rows / cols))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            by_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)   # a DTensor when p is one: sharded
                grad, buf = _local(p.grad), _local(state["momentum_buffer"])
                buf.lerp_(grad, 1 - mu)
                update = grad.lerp(buf, mu) if group["nesterov"] else buf
                if _is_sharded(p):
                    update = _gather(update, p)
                by_shape.setdefault((tuple(p.shape), update.device), []).append((p, update))
            for (shape, _), items in by_shape.items():
                ortho = orthogonalise(torch.stack([u for _, u in items]), group["ns_steps"], self.ns_dtype,
                                      tuple(group["ns_coefficients"]), group["eps"])
                scaled_lr = lr * self._lr_scale(torch.Size(shape), group["adjust_lr_fn"])
                for (p, _), o in zip(items, ortho):
                    if _is_sharded(p):
                        o = _my_rows(o, p)
                    w = _local(p)
                    w.mul_(1 - lr * group["weight_decay"])
                    w.add_(o.to(w.dtype), alpha=-scaled_lr)
        return loss


# ---- sharded (DTensor) parameters: FSDP2 -------------------------------------------------------------------

def _is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a DTensor (sharing its storage: in-place ops update it), else the tensor."""
    return t.to_local() if _is_sharded(t) else t


def _gather(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full matrix from every rank's rows of it (sharded like the parameter `like`): one all-gather."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride()).full_tensor()


def _my_rows(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a full matrix that every rank holds alike (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
