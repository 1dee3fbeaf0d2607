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


def save_run(run_dir, model: GPT, tokenizer) -> str:
    """A minimal run directory (weights, config, tokenizer) that `load_model` accepts."""
    from pathlib import Path

    from gptstack.io import atomic_write_json, save_weights

    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("rope_")}
    save_weights(d / "model.safetensors", state, {"checkpoint_id": "test"})
    atomic_write_json(d / "config.json", {"model": model.config.to_dict(), "stage": "test"})
    tokenizer.save(d / "tokenizer")
    return str(d)


class BanHook:
    """A logits hook that makes one token impossible; counts its calls and the most rows it saw at once."""

    def __init__(self, token):
        self.token, self.calls, self.rows = token, 0, 0

    def start(self, n_rows):
        self.rows = max(self.rows, n_rows)

    def process(self, logits, rows):
        self.calls += 1
        logits = logits.clone()
        logits[:, self.token] = float("-inf")
        return logits

    def accept(self, rows, tokens):
        pass

    def finished(self, row):
        return False
