"""Base-entropy mixing: sample from a blend of the chat model's next-token distribution and its base model's.

Alignment narrows a model's distribution (the chat model writes the same few phrasings); the base model it
came from still spreads its probability the way the pretraining text did. Mixing brings some of that back:

    fixed      p = (1 - w) · p_chat + w · p_base
    entropy    p = (1 - w_t) · p_chat + w_t · p_base,   w_t = w · max(0, H_base - H_chat) / H_base

The entropy-gated weight is zero where the chat model is as unsure as the base (nothing was narrowed), and
rises towards w where the chat model became confident but the base is not: it mixes exactly where diversity
was lost, and leaves alone the steps where both agree (e.g. the closing of a sentence, or an answer both know).

The base model runs alongside with its own KV cache, fed the same tokens: `begin` prefills it from the
prompts, each step's sampled tokens are fed lazily at the next `process` for just the rows still active (rows
the engine dropped are dropped from the base cache too, so the two stay in sync and no work is wasted).
Tokens the chat logits have at -inf (a grammar hook ran first) stay impossible.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError
from ..model.gpt import KVCache, core_gpt

MODES = ("fixed", "entropy")


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


class MixingHook:
    def __init__(self, base_model: torch.nn.Module, weight: float, mode: str = "fixed", chat_vocab: int | None = None):
        if not 0.0 <= weight <= 1.0:
            raise ConfigError(f"--mix-weight must be in [0, 1], got {weight}")
        if mode not in MODES:
            raise ConfigError(f"mixing mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.base = base_model.eval()
        self.config = core_gpt(base_model).config
        if chat_vocab is not None and chat_vocab != self.config.vocab_size:
            raise ConfigError(f"the base model has {self.config.vocab_size} tokens and the chat model {chat_vocab}: "
                              "mixing needs the same tokenizer (use the chat model's own base run)")
        self.weight, self.mode = weight, mode
        self.device = next(base_model.parameters()).device
        self.weights_used: list[float] = []   # mean effective weight per step (for studies)

    # ---- LogitsHook -------------------------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, prompts: Sequence[Sequence[int]], n: int) -> None:
        longest = max(len(p) for p in prompts)
        dtype = next(self.base.parameters()).dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.float32
        self.cache = KVCache(self.config, len(prompts), 4 * self.config.seq_len, self.device, dtype)
        if longest >= self.cache.max_len:
            raise ConfigError(f"the prompt ({longest} tokens) does not fit the base model's context")
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        valid = torch.zeros(len(prompts), longest, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.as_tensor(list(p))
            valid[i, longest - len(p):] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        pad = (~valid).sum(1)
        pos = (torch.arange(longest, device=self.device)[None] - pad[:, None]).clamp(min=0)
        logits = self.base(ids, kv_cache=self.cache, position_ids=pos, new_valid=valid, last_only=True)[:, -1]
        self.cache.expand(n)
        self.logits = logits.float().repeat_interleave(n, 0)
        self.next_pos = (longest - pad).repeat_interleave(n)
        self.rows: list[int] = list(range(len(prompts) * n))
        self.pending: torch.Tensor | None = None

    def start(self, n_rows: int) -> None:
        if not hasattr(self, "cache") or len(self.rows) != n_rows:
            raise RuntimeError("MixingHook needs an engine that calls begin(prompts, n) before start")

    @torch.no_grad()
    def process(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        row_list = rows.tolist()
        if row_list != self.rows:   # the engine dropped finished rows: drop them here too
            where = {r: i for i, r in enumerate(self.rows)}
            sel = torch.tensor([where[r] for r in row_list], device=self.device)
            self.cache.select(sel)
            self.logits, self.next_pos = self.logits[sel], self.next_pos[sel]
            if self.pending is not None:
                self.pending = self.pending[sel.to(self.pending.device)]
            self.rows = row_list
        if self.pending is not None:  # feed last step's tokens to the base model, only for live rows
            self.logits = self.base(self.pending.to(self.device)[:, None], kv_cache=self.cache,
                                    position_ids=self.next_pos[:, None], last_only=True)[:, -1].float()
            self.next_pos = self.next_pos + 1
            self.pending = None
        return self.mix(logits)

    def accept(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        self.pending = tokens.detach().clone()

    def finished(self, row: int) -> bool:
        return False

    # ---- the mixture ------------------------------------------------------------------------------------
    def mix(self, chat_logits: torch.Tensor) -> torch.Tensor:
        chat = torch.log_softmax(chat_logits.float(), -1)
        base = torch.log_softmax(self.logits.to(chat.device), -1)
        allowed = torch.isfinite(chat_logits)
        if self.mode == "fixed":
            w = torch.full((chat.size(0), 1), self.weight, device=chat.device)
        else:
            h_chat, h_base = _entropy(chat), _entropy(base)
            w = (self.weight * (h_base - h_chat).clamp(min=0) / h_base.clamp(min=1e-6)).clamp(0, 1)[:, None]
        self.weights_used.append(float(w.mean()))
        mixed = torch.logaddexp(torch.log1p(-w.clamp(max=1 - 1e-7)) + chat, torch.log(w.clamp(min=1e-30)) + base)
        mixed = torch.where(w > 0, mixed, chat)
        return mixed.masked_fill(~allowed, float("-inf"))


def mixed_generate(engine, base_model, prompts: Sequence[Sequence[int]], params, weight: float,
                   mode: str = "fixed", hooks: Sequence = ()):
    """engine.generate with the base model mixed in (mixing runs before any other hook, e.g. a grammar).
    Returns (completions, mean effective mixing weight) — what the diversity study sweeps over w."""
    hook = MixingHook(base_model, weight, mode, chat_vocab=engine.config.vocab_size)
    out = engine.generate(prompts, params, hooks=[hook, *hooks])
    used = sum(hook.weights_used) / max(1, len(hook.weights_used))
    return out, used


def load_mixing_hook(base_run: str, weight: float, mode: str, engine) -> MixingHook:
    """A MixingHook for `--mix-base RUN --mix-weight w`, on the engine's device, checked against its tokenizer."""
    from ..errors import CheckpointError
    from ..runs import load_model

    base, tok, _ = load_model(base_run, engine.device)
    if tok.fingerprint() != engine.tokenizer.fingerprint():
        raise CheckpointError(f"'{base_run}' uses a different tokenizer than the chat model: mixing needs the "
                              "chat model's own base run")
    return MixingHook(base, weight, mode, chat_vocab=engine.config.vocab_size)
