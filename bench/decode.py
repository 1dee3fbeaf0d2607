"""Decode speed: our Engine vs Hugging Face `LlamaForCausalLM.generate` on identical weights, same process.

    .venv/bin/python bench/decode.py [--run runs/base] [--new 128] [--prompt-len 32] [--batches 1,8]

Both run greedy for exactly --new tokens (no stop tokens) from the same prompts. The GPT gets the dims of
--run (or of the tiny preset) with qk_norm off, since Llama has none; its weights are random (N(0, 0.02))
and copied 1:1 into a LlamaConfig model, and the first step's logits are checked to agree before timing.
Prints tokens/s of each and the ratio ours / HF.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptstack.infer.engine import Engine  # noqa: E402
from gptstack.infer.sampling import SamplingParams  # noqa: E402
from gptstack.model.gpt import GPT, GPTConfig  # noqa: E402


def make_models(cfg: GPTConfig, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ours = GPT(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    ours.eval()
    hcfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.n_kv_head, max_position_embeddings=4 * cfg.seq_len,
                       rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                       tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False)
    hf = LlamaForCausalLM(hcfg).eval()
    state = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v
             for k, v in ours.state_dict().items() if not k.startswith("rope_")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return ours, hf


class _Tok:
    """Enough of a tokenizer for the engine (ids only; decode to bytes-as-latin1 keeps it cheap and exact)."""

    def __init__(self, vocab):
        self.vocab_size = vocab
        self.bos_id, self.assistant_end_id = vocab - 11, vocab - 7

    def decode(self, ids):
        return "".join(chr(33 + i % 90) for i in ids)

    def decode_bytes(self, ids):
        return self.decode(ids).encode()


def bench(cfg, batch: int, new: int, prompt_len: int, repeats: int, tokenizer=None) -> dict:
    ours, hf = make_models(cfg)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size - 20, (batch, prompt_len), generator=g)
    with torch.no_grad():
        a = ours(prompts)[:, -1]
        b = hf(prompts).logits[:, -1]
    assert torch.allclose(a, b, atol=1e-4), f"weights did not copy: max diff {(a - b).abs().max()}"

    engine = Engine(ours, tokenizer or _Tok(cfg.vocab_size))
    params = SamplingParams(temperature=0, max_tokens=new, stop_token_ids=[])
    plist = prompts.tolist()

    def run_ours():
        out = engine.generate(plist, params)
        return [c[0].tokens for c in out]

    def run_hf():
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, prompt_len:].tolist()

    t_ours, t_hf = [], []
    same = None
    for i in range(repeats + 1):  # the first round warms up both
        t0 = time.perf_counter(); o = run_ours(); t1 = time.perf_counter()
        h = run_hf(); t2 = time.perf_counter()
        if i:
            t_ours.append(t1 - t0); t_hf.append(t2 - t1)
        same = sum(x == y for x, y in zip(o, h)) if same is None else same
    best_ours, best_hf = min(t_ours), min(t_hf)
    return {"batch": batch, "new_tokens": new, "prompt_len": prompt_len,
            "ours_tok_s": batch * new / best_ours, "hf_tok_s": batch * new / best_hf,
            "ratio": best_hf / best_ours, "rows_identical": f"{same}/{batch}"}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/base", help="take model dims from this run (else the tiny preset)")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg_path = Path(args.run) / "config.json"
    if cfg_path.exists():
        cfg = GPTConfig.from_dict(json.loads(cfg_path.read_text())["model"])
    else:
        from gptstack.config import model_config_from_depth
        cfg = model_config_from_depth(4, 8192, 256)
    cfg.qk_norm = False
    print(f"model: {cfg}  threads: {torch.get_num_threads()}  torch {torch.__version__}")
    for b in (int(x) for x in args.batches.split(",")):
        r = bench(cfg, b, args.new, args.prompt_len, args.repeats)
        print(f"batch {b:2d}: ours {r['ours_tok_s']:8.1f} tok/s   HF generate {r['hf_tok_s']:8.1f} tok/s   "
              f"ratio {r['ratio']:.2f}x   (greedy rows identical: {r['rows_identical']})", flush=True)


if __name__ == "__main__":
    main()
