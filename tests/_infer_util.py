"""Tiny random-weight models for the inference tests (seconds to build, no training)."""

import torch

from gptstack.model.gpt import GPT, GPTConfig


def tiny_model(tokenizer, seed: int = 0, seq_len: int = 128, qk_norm: bool = True, n_kv_head: int = 2,
               n_head: int = 2) -> GPT:
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=64, n_head=n_head, n_kv_head=n_kv_head,
                    mlp_hidden=128, seq_len=seq_len, qk_norm=qk_norm)
    torch.manual_seed(seed)
    m = GPT(cfg)
    with torch.no_grad():  # a spread-out random init so greedy outputs vary with the prompt
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return m.eval()
