"""A pretraining step with Muon vs with AdamW, at the same batch, on this machine's precision.

Goal (issue: remove the bf16 cliff): on a CPU without native bf16, a Muon step within 1.3x of an AdamW step.
Muon's extra work is the Newton-Schulz orthogonalisation of every hidden matrix; torch.optim.Muon always does
it in bf16, which CPUs without avx512_bf16/AMX emulate ~50x slower than fp32. Timed here, interleaved in one
process on the tiny preset's model (d4, 8 Ki vocab) and micro-batch (32 x 256, fp32 forward/backward):

    adamw          AdamW on every parameter (the reference)
    muon           ours (train/muon.py) as the optimizer builder picks it: NS dtype from devices.matmul_dtype
    muon-bf16      ours with the NS forced to bf16 (what torch does)
    torch-muon     torch.optim.Muon (bf16 NS) on the hidden matrices, AdamW elsewhere   [--torch-muon]

    python bench/optimizer_step.py [--steps 3] [--threads 2] [--torch-muon]

GPTSTACK_CPU_BF16=0 forces the slow-bf16 rule on a CPU that has native bf16 (then `muon` uses fp32).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--torch-muon", action="store_true", help="also time torch.optim.Muon (slow where bf16 is)")
    args = ap.parse_args()

    from gptstack.config import TrainConfig
    from gptstack.model.gpt import model_config_from_depth
    from gptstack.devices import machine_info, matmul_dtype, resolve_device, set_threads
    from gptstack.model.gpt import GPT
    from gptstack.train.muon import Muon
    from gptstack.train.optim import _is_hidden_matrix, build_optimizers

    set_threads(args.threads)
    device = resolve_device("auto")
    cfg = model_config_from_depth(args.depth, 8192, args.seq_len)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)

    def fresh_model():
        m = GPT(cfg)
        m.init_weights(0)
        return m.to(device)

    def variant(name: str):
        model = fresh_model()
        if name == "adamw":
            return model, build_optimizers(model, TrainConfig(optimizer="adamw"), cfg.n_embd)
        opts = build_optimizers(model, TrainConfig(optimizer="muon"), cfg.n_embd)
        if name == "muon":
            return model, opts
        adam = opts[0]
        matrices = [p for n, p in model.named_parameters() if _is_hidden_matrix(n, p)]
        if name == "muon-bf16":
            return model, [adam, Muon(matrices, lr=0.02, ns_dtype=torch.bfloat16)]
        return model, [adam, torch.optim.Muon(matrices, lr=0.02, weight_decay=0.0, momentum=0.95)]

    names = ["adamw", "muon", "muon-bf16"] + (["torch-muon"] if args.torch_muon else [])
    runs = {n: variant(n) for n in names}
    times = {n: [] for n in names}
    opt_times = {n: [] for n in names}

    def step(name: str) -> None:
        model, opts = runs[name]
        t0 = time.perf_counter()
        model(x, y).backward()
        t1 = time.perf_counter()
        for o in opts:
            o.step()
        for o in opts:
            o.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        times[name].append(t2 - t0)
        opt_times[name].append(t2 - t1)

    for n in names:   # warm-up
        step(n)
        times[n].clear(), opt_times[n].clear()
    for _ in range(args.steps):   # interleaved: machine load hits every variant alike
        for n in names:
            step(n)

    info = machine_info(device, None, matmul_dtype(device))
    print(f"cpu: {info['cpu']['model']}  flags: {' '.join(info['cpu']['flags'])}  threads: {info['threads']}  "
          f"torch {info['torch']}")
    if "bf16_probe" in info:
        p = info["bf16_probe"]
        print(f"bf16 probe: bf16 matmul {p['bf16_over_fp32']}x the fp32 time -> Muon NS in {info['optimizer_matmul']}")
    print(f"model d{args.depth} ({sum(p.numel() for p in runs['adamw'][0].parameters()):,} params), "
          f"batch {args.batch}x{args.seq_len}, fp32 forward/backward, median of {args.steps} steps")
    med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
    med_opt = {n: sorted(v)[len(v) // 2] for n, v in opt_times.items()}
    print(f"{'variant':12s} {'step s':>8s} {'optimizer s':>12s} {'step / adamw':>13s}")
    for n in names:
        print(f"{n:12s} {med[n]:8.3f} {med_opt[n]:12.3f} {med[n] / med['adamw']:12.2f}x")
    ok = med["muon"] / med["adamw"] <= 1.3
    print(f"goal: muon step <= 1.3x adamw step -> {'met' if ok else 'NOT met'} ({med['muon'] / med['adamw']:.2f}x)")


if __name__ == "__main__":
    main()
