"""Next-token sampling: temperature, top-k, top-p, min-p, repetition/frequency/presence penalties, seeds.

Greedy (temperature 0) is an argmax and fully deterministic. Logprobs reported to callers are the model's
own (log-softmax of the raw logits), not of the filtered distribution, which is what RL and scoring need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0    # CTRL-style: divide positive logits of seen tokens, multiply negative
    frequency_penalty: float = 0.0     # OpenAI-style: subtract penalty x count
    presence_penalty: float = 0.0      # subtract once for any seen token
    max_tokens: int = 256
    n: int = 1                         # samples per prompt, sharing one prefill
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None   # None: <|assistant_end|> and <|bos|>
    seed: int | None = None
    logprobs: bool = False

    def validate(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n (samples per prompt) must be at least 1, got {self.n}")
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError("temperature cannot be negative")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise ConfigError("min_p must be in [0, 1)")
        if self.top_k < 0:
            raise ConfigError("top_k cannot be negative")
        if self.repetition_penalty <= 0:
            raise ConfigError("repetition_penalty must be positive")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("stop sequences must be non-empty strings")
        if self.stop_token_ids is not None and any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ConfigError("stop token ids must be non-negative integers")

    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor | None, p: SamplingParams) -> torch.Tensor:
    """`counts` (R, V): how often each token already appears in each row's generated text."""
    if counts is None or (p.repetition_penalty == 1.0 and not p.frequency_penalty and not p.presence_penalty):
        return logits
    seen = counts > 0
    if p.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.frequency_penalty:
        logits = logits - p.frequency_penalty * counts.to(logits.dtype)
    if p.presence_penalty:
        logits = logits - p.presence_penalty * seen.to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with top-k / top-p / min-p applied (filtered entries are -inf)."""
    logits = logits / max(p.temperature, 1e-6)
    if p.top_k and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        floor = probs.max(dim=-1, keepdim=True).values * p.min_p
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > p.top_p   # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None,
                counts: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from (R, V) logits (already masked by any constraint).

    With top-k set, min-p and top-p work on the k candidates only (topk returns them sorted), so a step costs
    one O(V) pass instead of a full-vocabulary sort and softmaxes; the distribution is the one
    `filter_logits` describes (up to ties at the k-th value, where exactly k are kept)."""
    logits = apply_penalties(logits.float(), counts, p)
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    if p.top_k and p.top_k < logits.size(-1):
        vals, idx = torch.topk(logits, p.top_k, dim=-1)
        vals = vals / max(p.temperature, 1e-6)
        if p.min_p > 0:
            probs = torch.softmax(vals, dim=-1)
            vals = vals.masked_fill(probs < probs[..., :1] * p.min_p, float("-inf"))
        if p.top_p < 1.0:
            probs = torch.softmax(vals, dim=-1)
            vals = vals.masked_fill(probs.cumsum(dim=-1) - probs > p.top_p, float("-inf"))
        choice = categorical(torch.softmax(vals, dim=-1), generator)
        return idx.gather(-1, choice[:, None]).squeeze(-1)
    return categorical(torch.softmax(filter_logits(logits, p), dim=-1), generator)


def categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of (R, V) probabilities, by inverting the CDF with one uniform number per row.

    Why not `torch.multinomial`: on CPU it draws an exponential variate for *every* vocabulary entry (the
    exponential race), ~10 ms per step for 64 rows x 8K vocabulary — measured as 45% of an RL rollout's
    sampling time. A float64 cumulative sum and a binary search cost ~0.3 ms. Zero-probability entries (masked,
    filtered) are never chosen: the search returns the first index whose CDF exceeds u, and a zero entry never
    raises the CDF."""
    wide = torch.float32 if probs.device.type == "mps" else torch.float64   # MPS has no float64
    cdf = probs.to(wide).cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=wide, device=probs.device)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    # u * total can round up to total itself (probability ~1e-16): fall back to the most likely entry
    return torch.where(idx < probs.shape[-1], idx, probs.argmax(dim=-1))
