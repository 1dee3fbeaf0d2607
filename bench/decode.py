"""Decode speed: our Engine vs Hugging Face `LlamaForCausalLM.generate` on identical weights, same process.

    .venv/bin/python bench/decode.py [--run runs/base] [--new 128] [--prompt-len 32] [--batches 1,8]
    .venv/bin/python bench/decode.py --real runs/tiny/sft [--n-prompts 24]

Random mode: both run greedy for exactly --new tokens (no stop tokens) from the same random prompts. The GPT
gets the dims of --run (or of the tiny preset) with qk_norm off, since Llama has none; its weights are
random (N(0, 0.02)) and copied 1:1 into a LlamaConfig model, and the first step's logits are checked to
agree before timing.

Real mode (--real RUN): the trained chat model of RUN, one task prompt at a time (batch 1, the chat case)
from every task's test split, greedy until <|assistant_end|> or 64 tokens, against HF `generate` on the same
weights (a Qwen3 layout when the model has QK-norm: same RMSNorm on each head before RoPE). Greedy outputs
are compared token for token.

Random mode also times the matmul floor: only the weight matmuls of each decode step, back to back, on the
same weights. Its ratio to HF is the most a one-token-per-pass engine at this precision could gain over HF.

Our engine's greedy batch-1 path can verify prompt-lookup drafts (off by default in the engine; this bench
times each row with --speculate K, default 4, and with 0). Prints tokens/s and the ratio ours / HF.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptstack.infer.engine import Engine  # noqa: E402
from gptstack.infer.sampling import SamplingParams  # noqa: E402
from gptstack.model.gpt import GPTConfig  # noqa: E402

from _hf import check_same_logits, make_models  # noqa: E402  (bench/_hf.py: the HF model with our weights)


class _Tok:
    """Enough of a tokenizer for the engine (ids only; decode to bytes-as-latin1 keeps it cheap and exact)."""

    def __init__(self, vocab):
        self.vocab_size = vocab
        self.bos_id, self.assistant_end_id = vocab - 11, vocab - 7

    def decode(self, ids):
        return "".join(chr(33 + i % 90) for i in ids)

    def decode_bytes(self, ids):
        return self.decode(ids).encode()


def bench(cfg, batch: int, new: int, prompt_len: int, repeats: int, speculate: int) -> list[dict]:
    """Random weights, random prompts, exactly `new` greedy tokens per row."""
    ours, hf = make_models(cfg)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size - 20, (batch, prompt_len), generator=g)
    check_same_logits(ours, hf, prompts)
    engine = Engine(ours, _Tok(cfg.vocab_size))
    params = SamplingParams(temperature=0, max_tokens=new, stop_token_ids=[])
    plist = prompts.tolist()

    def run_ours():
        return [c[0].tokens for c in engine.generate(plist, params)]

    def run_hf():
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, prompt_len:].tolist()

    rows = []
    for spec in sorted({speculate, 0}, reverse=True):
        engine.speculate = spec
        rows.append({"what": f"random batch {batch}", "speculate": spec, "tokens": batch * new,
                     **_time_pair(run_ours, run_hf, repeats, engine)})
    floor = matmul_floor(ours, batch, new, repeats)
    for r in rows:
        r["floor_s"] = floor
    return rows


def matmul_floor(model, batch: int, steps: int, repeats: int) -> float:
    """Seconds for `steps` rounds of just the weight matmuls one decode step does (every Linear of the model,
    in order, on a (batch, in) input): what any engine at this precision pays per token, whatever its
    overhead. At batch 1 these are matrix-vector products that read all the weights once per token."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(batch, m.in_features) for m in linears]
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            for _ in range(steps):
                for m, x in zip(linears, xs):
                    torch.nn.functional.linear(x, m.weight)
            if i:
                best = min(best, time.perf_counter() - t0)
    return best


def bench_real(run: str, n_prompts: int, repeats: int, speculate: int, max_new: int = 64) -> list[dict]:
    """The trained chat model of `run` on task prompts, one at a time."""
    from gptstack.data.tasks import generate_mixture
    from gptstack.runs import load_model

    model, tok, _ = load_model(run)
    ours, hf = make_models(model.config, ours=model)
    examples = generate_mixture("all", "test", max(1, n_prompts // 7), seed=3)
    prompts = [tok.render_prompt(e.prompt_messages()) for e in examples]
    check_same_logits(ours, hf, torch.tensor([prompts[0]]))
    engine = Engine(ours, tok)
    params = SamplingParams(temperature=0, max_tokens=max_new, stop_token_ids=[tok.assistant_end_id])
    end = tok.assistant_end_id

    def run_ours():
        return [engine.generate([p], params)[0][0].tokens for p in prompts]

    def run_hf():
        outs = []
        with torch.no_grad():
            for p in prompts:
                x = torch.tensor([p])
                o = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                                eos_token_id=end, pad_token_id=0)[0, len(p):].tolist()
                outs.append(o[:-1] if o and o[-1] == end else o)
        return outs

    rows = []
    tokens = None
    for spec in sorted({speculate, 0}, reverse=True):
        engine.speculate = spec
        if tokens is None:
            tokens = sum(len(t) for t in run_ours())
        rows.append({"what": f"{Path(run).name} task prompts", "speculate": spec, "tokens": tokens,
                     **_time_pair(run_ours, run_hf, repeats, engine)})
    return rows


def _time_pair(run_ours, run_hf, repeats: int, engine) -> dict:
    """Best-of-`repeats` seconds of each after a warm-up round, whether the outputs agree, draft acceptance."""
    t_ours, t_hf, same = [], [], None
    for i in range(repeats + 1):
        engine.spec_stats = {"forwards": 0, "drafted": 0, "accepted": 0}
        t0 = time.perf_counter(); o = run_ours(); t1 = time.perf_counter()
        h = run_hf(); t2 = time.perf_counter()
        if i:
            t_ours.append(t1 - t0); t_hf.append(t2 - t1)
        same = (sum(x == y for x, y in zip(o, h)), len(o)) if same is None else same
    st = engine.spec_stats
    return {"ours_s": min(t_ours), "hf_s": min(t_hf), "identical": f"{same[0]}/{same[1]}",
            "accepted": st["accepted"] / st["drafted"] if st["drafted"] else None,
            "tokens_per_pass": (st["forwards"] + st["accepted"]) / st["forwards"] if st["forwards"] else None}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/base", help="take model dims from this run (else the tiny preset)")
    ap.add_argument("--real", default="", help="time this trained chat run on task prompts instead")
    ap.add_argument("--n-prompts", type=int, default=21)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--speculate", type=int, default=4, help="prompt-lookup draft tokens (0: off)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads: {torch.get_num_threads()}  torch {torch.__version__}")
    if args.real:
        rows = bench_real(args.real, args.n_prompts, args.repeats, args.speculate)
    else:
        cfg_path = Path(args.run) / "config.json"
        if cfg_path.exists():
            cfg = GPTConfig.from_dict(json.loads(cfg_path.read_text())["model"])
        else:
            from gptstack.model.gpt import model_config_from_depth
            cfg = model_config_from_depth(4, 8192, 256)
        cfg.qk_norm = False
        print(f"model: {cfg}")
        rows = [r for b in (int(x) for x in args.batches.split(",")) for r in
                bench(cfg, b, args.new, args.prompt_len, args.repeats, args.speculate)]
    for r in rows:
        extra = (f"   drafts accepted {r['accepted']:.0%}, {r['tokens_per_pass']:.2f} tokens/pass"
                 if r["accepted"] is not None else "")
        print(f"{r['what']:<28} speculate {r['speculate']}: ours {r['tokens'] / r['ours_s']:8.1f} tok/s   "
              f"HF generate {r['tokens'] / r['hf_s']:8.1f} tok/s   ratio {r['hf_s'] / r['ours_s']:.2f}x   "
              f"(greedy outputs identical: {r['identical']}){extra}", flush=True)
        if r.get("floor_s") and not r["speculate"]:
            # one token per pass: no engine at this precision beats the matmuls alone
            print(f"{'':<28} matmul floor {r['tokens'] / r['floor_s']:8.1f} tok/s: ours at "
                  f"{r['floor_s'] / r['ours_s']:.0%} of it, HF at {r['floor_s'] / r['hf_s']:.0%}; the most any "
                  f"one-token-per-pass engine could be over HF here: {r['hf_s'] / r['floor_s']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
