"""Training memory of full finetuning vs LoRA vs QLoRA: weights, gradients and optimizer state after a real step.

    .venv/bin/python bench/finetune_memory.py [--depths 4,12] [--rank 16]

For each depth, the depth dial's model (vocab 8192 at depth 4 — the tiny preset —, 32768 from depth 12 as in
d12) is set up the way `gptstack sft` does it: full finetuning (every parameter; Muon for the block matrices,
AdamW for the rest), LoRA (PEFT factors on the attention and MLP projections, plus the rows of 8 chat special
tokens in the embedding and head) and QLoRA (the same on an nf4 base through bitsandbytes). Each takes one
forward/backward/optimizer step on a random (1, 128) batch so that gradients and optimizer state exist, then
`adapters.model_memory` counts the bytes of weights (4-bit ones as stored, with their statistics), gradients and
optimizer state. Activations are left out: they depend on batch and sequence length, not on the method.
Prints each mode's bytes and its total as a fraction of full finetuning's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptstack.config import model_config_from_depth  # noqa: E402
from gptstack.errors import DependencyError  # noqa: E402
from gptstack.model import adapters  # noqa: E402
from gptstack.model.gpt import GPT  # noqa: E402
from gptstack.train.optim import build_optimizers  # noqa: E402
from gptstack.config import SFTConfig  # noqa: E402


def one_step(model, cfg, n_embd: int, vocab: int) -> list:
    optimizers = build_optimizers(model, cfg, n_embd)
    x = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(0))
    model(x, x).backward()
    for o in optimizers:
        o.step()
    return optimizers


def measure(depth: int, mode: str, rank: int) -> dict | None:
    vocab = 8192 if depth < 12 else 32768
    mcfg = model_config_from_depth(depth, vocab, 2048)
    torch.manual_seed(0)
    model = GPT(mcfg)
    model.init_weights(0)
    cfg = SFTConfig()
    if mode == "qlora":
        try:
            adapters.quantize_4bit(model)
        except DependencyError as e:
            print(f"  qlora: {e}")
            return None
    if mode in ("lora", "qlora"):
        specials = list(range(vocab - 8, vocab))
        model = adapters.apply_lora(model, rank, 2.0 * rank, 0.0, adapters.DEFAULT_TARGETS,
                                    trainable_tokens={"embed_tokens": specials, "lm_head": specials})
    optimizers = one_step(model, cfg, mcfg.n_embd, vocab)
    return adapters.model_memory(model, optimizers)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="4,12")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    mib = 2 ** 20
    for depth in (int(d) for d in args.depths.split(",")):
        print(f"depth {depth}  (LoRA rank {args.rank}, targets {','.join(adapters.DEFAULT_TARGETS)})")
        full_total = None
        for mode in ("full", "lora", "qlora"):
            m = measure(depth, mode, args.rank)
            if m is None:
                continue
            full_total = full_total or m["total"]
            print(f"  {mode:<5}  trainable {m['trainable_params']:>12,}   weights {m['weights'] / mib:8.1f} MiB   "
                  f"grads {m['grads'] / mib:8.1f} MiB   optimizer {m['optimizer'] / mib:8.1f} MiB   "
                  f"total {m['total'] / mib:8.1f} MiB   {m['total'] / full_total:6.1%} of full", flush=True)


if __name__ == "__main__":
    main()
