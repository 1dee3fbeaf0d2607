"""Training memory per rank, DDP vs FSDP2 (`--parallel fsdp`): parameter + gradient + optimizer-state bytes.

    .venv/bin/python bench/parallel_memory.py [--depths 12,20] [--ranks 1,2,4] [--real-depths 12]

For each depth (the depth dial's model, vocab 32768, seq 2048, as the d12 / d20 presets), and each world size,
gloo processes on the CPU set the model up as the training loop does: DDP (every rank the whole model) or FSDP2
(train/parallel.py: every block, then the root, sharded on dim 0) with the loop's optimizers (Muon on the block
matrices, AdamW elsewhere). What each rank holds is counted from its own tensors: the local shards of
parameters and gradients, and the optimizer state. Activations, DDP's gradient buckets (another gradient-sized
buffer) and FSDP's transient all-gathered block are left out: they depend on batch and bucket size, not on
the sharding of the state.

Two ways to count, both printed:
- real (`--real-depths`, default 12): every rank builds the model, takes one forward/backward/optimizer step on
  a (1, 16) batch, and counts its tensors.
- meta (the others; d20 in 4 processes would take ~32 GB as DDP, more than this 24 GiB machine has): the model
  is built on torch.device("meta") and sharded there by the same fully_shard calls, so the local shard shapes
  are FSDP's own; gradients are one per trainable local shard and optimizer state is what a step creates
  (AdamW: exp_avg, exp_avg_sq and a 4-byte step; Muon: one momentum buffer). The real depths are counted
  both ways and the two must agree to the byte (checked, printed).
Ratios are FSDP against DDP at the same depth and world size, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptstack.config import TrainConfig  # noqa: E402
from gptstack.model.gpt import GPT, model_config_from_depth  # noqa: E402
from gptstack.train import parallel  # noqa: E402
from gptstack.train.muon import Muon  # noqa: E402
from gptstack.train.optim import build_optimizers  # noqa: E402

VOCAB, SEQ = 32768, 2048
GIB = 2 ** 30


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def count(model, optimizers, meta: bool) -> dict:
    params = sum(_nbytes(p) for p in model.parameters())
    if meta:   # what one step would create, from the local shard shapes
        grads = sum(_nbytes(p) for p in model.parameters() if p.requires_grad)
        opt = 0
        for o in optimizers:
            per_param = 1 if isinstance(o, Muon) else 2
            opt += sum(per_param * _nbytes(p) + (0 if isinstance(o, Muon) else 4)
                       for g in o.param_groups for p in g["params"])
    else:
        grads = sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None)
        opt = sum(_nbytes(v) for o in optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v))
    return {"params": params, "grads": grads, "optimizer": opt, "total": params + grads + opt}


def _one(world: int, depth: int, mode: str, meta: bool) -> dict:
    cfg = model_config_from_depth(depth, VOCAB, SEQ)
    if meta:
        with torch.device("meta"):
            model = GPT(cfg)
    else:
        model = GPT(cfg)
        model.init_weights(0)
    train_model = model
    if mode == "fsdp":
        parallel.apply_fsdp(model, torch.device("cpu"), world, bf16=False)
    elif world > 1 and not meta:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    optimizers = build_optimizers(model, TrainConfig(), cfg.n_embd)
    if not meta:
        x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
        train_model(x, x).backward()
        for o in optimizers:
            o.step()
    return count(model, optimizers, meta)


def _rank_main(rank: int, world: int, port: int, depth: int, runs: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    results = {f"{how}-{mode}": _one(world, depth, mode, how == "meta") for how, mode in runs}
    Path(out, f"{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(depth: int, world: int, real: bool) -> dict:
    """{(how, mode): rank 0's figures} (FSDP gives rank 0 the largest shard when rows do not divide evenly)."""
    runs = ([("real", "fsdp"), ("real", "ddp")] if real else []) + [("meta", "fsdp"), ("meta", "ddp")]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(world, _free_port(), depth, runs, out), nprocs=world, join=True)
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]
    return {tuple(k.split("-")): v for k, v in ranks[0].items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="12,20")
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--real-depths", default="12", help="depths also measured by a real step (the rest: meta only)")
    args = ap.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    worlds = [int(w) for w in args.ranks.split(",")]
    real = {int(d) for d in args.real_depths.split(",") if d}
    rows = []
    for depth in depths:
        with torch.device("meta"):
            n = sum(p.numel() for p in GPT(model_config_from_depth(depth, VOCAB, SEQ)).parameters())
        print(f"d{depth}: {n / 1e6:.1f} M parameters (vocab {VOCAB}, seq {SEQ})", flush=True)
        for world in worlds:
            figures = measure(depth, world, depth in real)
            if depth in real:
                for mode in ("ddp", "fsdp"):
                    r, m = figures["real", mode], figures["meta", mode]
                    same = all(r[k] == m[k] for k in ("params", "grads", "optimizer"))
                    print(f"  {world} rank(s) {mode}: meta accounting {'matches' if same else 'DIFFERS FROM'} the real "
                          f"step" + ("" if same else f" ({r} vs {m})"), flush=True)
            how = "real" if depth in real else "meta"
            ddp, fsdp = figures[how, "ddp"], figures[how, "fsdp"]
            rows.append((depth, world, how, ddp, fsdp))
    print()
    print("| model | ranks | counted | DDP params / grads / optimizer GiB | DDP total GiB | FSDP params / grads / "
          "optimizer GiB | FSDP total GiB | FSDP / DDP |")
    print("|---|---:|---|---|---:|---|---:|---:|")
    for depth, world, how, ddp, fsdp in rows:
        parts = lambda f: " / ".join(f"{f[k] / GIB:.2f}" for k in ("params", "grads", "optimizer"))
        print(f"| d{depth} | {world} | {how} | {parts(ddp)} | {ddp['total'] / GIB:.2f} | {parts(fsdp)} | "
              f"{fsdp['total'] / GIB:.2f} | **{fsdp['total'] / ddp['total']:.3f}x** |")


if __name__ == "__main__":
    main()
