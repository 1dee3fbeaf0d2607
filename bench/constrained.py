"""Constrained decoding cost: llguidance mask time per token, and wall time constrained / unconstrained.

    .venv/bin/python bench/constrained.py [--run runs/base] [--tokens 64] [--rows 1,8]

Both runs generate exactly the same number of tokens per row (the unconstrained run with max_tokens set to the
constrained run's lengths, no stop tokens), so the ratio is the grammar's overhead per token, not a
difference in output length. Mask µs/token = llguidance's mask compute time / tokens; "exposed" = the time the decode loop waited for
masks and applied them / tokens. With overlap on (the default) the next step's masks are computed on a worker
thread while the model's forward pass runs, so only what outlasts the forward pass is exposed.
Each row size runs twice: with forced-token fast-forward (the engine's default: tokens the grammar leaves no
choice about are taken without a mask and fed to the model in one chunk) and without it (a mask and a
forward pass for every token), and with overlap on and off, so both gains are measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptstack.infer.constrained import GrammarHook, compile_grammar, grammar_params  # noqa: E402
from gptstack.infer.engine import Engine  # noqa: E402
from gptstack.infer.sampling import SamplingParams  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "lines": {"type": "array", "items": {"type": "string", "maxLength": 60}, "maxItems": 4},
    "mood": {"enum": ["merry", "sad", "wroth"]}},
    "required": ["name", "age", "lines", "mood"], "additionalProperties": False}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/base")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from gptstack.runs import load_model

    model, tok, _ = load_model(args.run)
    engine = Engine(model, tok)
    grammar = compile_grammar(json_schema=SCHEMA, tokenizer=tok)
    prompt = tok.encode("ROMEO:", bos=True)
    print(f"model {args.run}  vocab {tok.vocab_size}  threads {torch.get_num_threads()}")
    configs = [(int(r), ff, ov) for r in args.rows.split(",") for ff, ov in ((True, True), (True, False), (False, True))]
    for rows, ff, overlap in configs:
        engine.fast_forward = ff
        t_c, t_u, mask_us, exposed_us, calls = [], [], [], [], []
        for rep in range(args.repeats + 1):
            params = grammar_params(SamplingParams(temperature=1.0, top_k=50, seed=rep, max_tokens=160, n=rows), tok)
            hook = GrammarHook(tok, grammar, overlap=overlap)
            t0 = time.perf_counter()
            out = engine.generate([prompt], params, hooks=[hook])[0]
            tc = time.perf_counter() - t0
            n_tok = sum(len(c.tokens) + (c.finish_reason == "stop") for c in out)
            longest = max(len(c.tokens) + 1 for c in out)
            # unconstrained: same rows, the longest row's length for all (an upper bound on its work)
            up = SamplingParams(temperature=1.0, top_k=50, seed=rep, max_tokens=longest, n=rows, stop_token_ids=[])
            t0 = time.perf_counter()
            engine.generate([prompt], up)
            tu = time.perf_counter() - t0
            if rep:
                t_c.append(tc); t_u.append(tu * n_tok / (rows * longest)); mask_us.append(hook.mask_seconds / n_tok * 1e6)
                exposed_us.append(hook.exposed_seconds / n_tok * 1e6)
                calls.append(hook.mask_calls / n_tok)
        c, u = sorted(t_c)[len(t_c) // 2], sorted(t_u)[len(t_u) // 2]
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        print(f"rows {rows} fast-forward {'on ' if ff else 'off'} overlap {'on ' if overlap else 'off'}: mask "
              f"{med(mask_us):6.1f} µs/token, exposed {med(exposed_us):6.1f} ({med(calls):.2f} masks/token)   constrained {c * 1e3:7.1f} ms   "
              f"unconstrained (same tokens) {u * 1e3:7.1f} ms   ratio {c / u:.2f}x   "
              f"(sample: {out[0].text[:70]!r})", flush=True)


if __name__ == "__main__":
    main()
