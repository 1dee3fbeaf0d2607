"""Low precision vs fp32 on one model: weight memory, decode tokens/s (batch 1, greedy) and bits per byte.

    .venv/bin/python bench/quant.py [--run runs/base] [--chars 40000] [--new 64]

bpb is measured on the tail of the last Shakespeare text (held out from nothing in particular: the same text
for every mode, so the *change* is what counts).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptstack.eval.bpb import bpb_of_texts  # noqa: E402
from gptstack.infer.engine import Engine  # noqa: E402
from gptstack.infer.sampling import SamplingParams  # noqa: E402
from gptstack.model.quant import model_bytes, quantize  # noqa: E402
from gptstack.runs import load_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/base")
    ap.add_argument("--chars", type=int, default=40000)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--modes", default="fp32,int8,bnb8,nf4")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from gptstack.data.corpus import load_corpus

    docs = load_corpus("shakespeare")
    text = docs[-1].text[-args.chars:]
    print("| mode | weight MB | decode tok/s (batch 1) | bpb | Δbpb vs fp32 |\n|---|---|---|---|---|")
    ref = None
    for mode in args.modes.split(","):
        model, tok, _ = load_model(args.run)
        if mode != "fp32":
            quantize(model, mode)
        engine = Engine(model, tok)
        prompt = tok.encode("ROMEO:", bos=True)
        params = SamplingParams(temperature=0, max_tokens=args.new, stop_token_ids=[])
        engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4, stop_token_ids=[]))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            engine.generate([prompt], params)
            times.append(time.perf_counter() - t0)
        bpb = bpb_of_texts(model, tok, [text])["val_bpb"]
        ref = bpb if ref is None else ref
        print(f"| {mode} | {model_bytes(model) / 2**20:.1f} | {args.new / min(times):.0f} | {bpb:.4f} | "
              f"{bpb - ref:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
