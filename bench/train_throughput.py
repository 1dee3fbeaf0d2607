"""Training throughput: our GPT vs Hugging Face LlamaForCausalLM with identical dimensions and weights.

Same batch, same dtype, same optimizer (AdamW), measured in the same process with the two models' steps
interleaved, so machine load affects both alike. Prints tokens/s for each and the ratio (goal on CPU: >= 1.5x;
on an H100/H200 at depth 12, T=2048: >= 50% MFU, printed when CUDA is present).

    python bench/train_throughput.py [--depth 4] [--batch 16] [--seq-len 256] [--steps 6] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch


def build_pair(depth: int, vocab: int, seq_len: int, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptstack.model.gpt import model_config_from_depth
    from gptstack.model.gpt import GPT

    cfg = model_config_from_depth(depth, vocab, seq_len, qk_norm=False)  # Llama has no QK-norm
    ours = GPT(cfg)
    ours.init_weights(0)
    with torch.no_grad():  # make every branch non-trivial so both do the same real work
        for n, p in ours.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0, 0.02)
    hf_cfg = LlamaConfig(vocab_size=vocab, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                         num_key_value_heads=cfg.n_kv_head, max_position_embeddings=4 * seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
    hf = LlamaForCausalLM(hf_cfg)
    state = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ours.to(device), hf.to(device)
    x = torch.randint(0, vocab, (2, 32), device=device)
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < 1e-3, f"models differ: {diff}"
    return ours, hf, cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dtype", default="auto", help="auto: bf16 autocast on CUDA, fp32 on CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model")
    args = ap.parse_args()

    from gptstack.devices import autocast, resolve_device, resolve_dtype

    device = resolve_device("auto")
    amp = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    ours, hf, cfg = build_pair(args.depth, args.vocab, args.seq_len, device)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    ours_fn = torch.compile(ours) if args.compile else ours

    def step_ours(opt):
        with autocast(device, amp):
            loss = ours_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_hf(opt):
        with autocast(device, amp):
            logits = hf(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    opts = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-4), "hf": torch.optim.AdamW(hf.parameters(), lr=1e-4)}
    fns = {"ours": step_ours, "hf": step_hf}
    for name in fns:  # warm-up (and compilation)
        for _ in range(2):
            fns[name](opts[name])
    times = {"ours": 0.0, "hf": 0.0}
    for _ in range(args.steps):
        for name in ("ours", "hf"):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fns[name](opts[name])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name] += time.perf_counter() - t
    tokens = args.batch * args.seq_len * args.steps
    tps = {k: tokens / v for k, v in times.items()}
    print(f"device={device} dtype={amp or torch.float32} depth={args.depth} width={cfg.n_embd} vocab={args.vocab} "
          f"batch={args.batch}x{args.seq_len} params={ours.num_params():,} threads={torch.get_num_threads()}")
    print(f"ours : {tps['ours']:10,.0f} tok/s")
    print(f"HF   : {tps['hf']:10,.0f} tok/s")
    print(f"ratio ours/HF: {tps['ours'] / tps['hf']:.2f}x")
    if device.type == "cuda":
        from gptstack.train.loop import _mfu

        mfu = _mfu(device, ours.flops_per_token(args.seq_len), tps["ours"], 1)
        print(f"MFU (ours): {mfu:.1%}" if mfu is not None else "MFU: unknown GPU")


if __name__ == "__main__":
    main()
