"""Scalar heads on the Transformer's final hidden states: reward models, PPO value heads, and the readers
RL and DPO share (per-token log-probabilities of chosen positions, without computing logits elsewhere).

    RewardModel(gpt)          r(prompt + reply) = head(h at the last real token)        -> (B,)
    PolicyWithValue(policy)   log π(token), entropy and V(state) per response token, one trunk forward
    reward_scorer(rm, tok)    (prompt_ids, completion_ids) -> float, for best-of-n in infer/ensemble.py

Every body may be a plain GPT or a PEFT-wrapped one: PEFT injects LoRA layers into the GPT's own modules,
so calling the core GPT's `hidden_states` runs the adapters (and `disable_adapter()` turns them off).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .gpt import GPTConfig, core_gpt


class ScalarHead(nn.Module):
    """h (…, C) -> scalar (…). The weight starts at the scale of the trunk's other input projections, so the
    trunk receives gradient from the first step (a zero head would leave it untouched at first)."""

    def __init__(self, n_embd: int, zero_init: bool = False, seed: int = 0):
        super().__init__()
        self.proj = nn.Linear(n_embd, 1, bias=True)
        with torch.no_grad():
            if zero_init:
                self.proj.weight.zero_()
            else:
                g = torch.Generator().manual_seed(seed)
                self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g) / math.sqrt(n_embd))
            self.proj.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h.float()).squeeze(-1)


class ValueHead(ScalarHead):
    """Per-token state values for PPO; starts at zero so the first advantages are plain rewards-to-go."""

    def __init__(self, n_embd: int):
        super().__init__(n_embd, zero_init=True)


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) right-padded ids and the lengths. Causal attention means padding after a row's last real token
    never changes that row's real positions, so no attention mask is needed."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return (ids.to(device), lengths.to(device)) if device is not None else (ids, lengths)


class RewardModel(nn.Module):
    """A language-model trunk with a scalar head read at each sequence's last real token (the
    <|assistant_end|> of the reply being judged)."""

    def __init__(self, body: nn.Module, head: ScalarHead | None = None):
        super().__init__()
        self.body = body
        self.head = head if head is not None else ScalarHead(core_gpt(body).config.n_embd)

    @property
    def config(self) -> GPTConfig:
        return core_gpt(self.body).config

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = core_gpt(self.body).hidden_states(ids)
        last = h[torch.arange(ids.shape[0], device=ids.device), lengths - 1]
        return self.head(last)

    @torch.no_grad()
    def score(self, sequences: Sequence[Sequence[int]], batch_size: int = 32) -> list[float]:
        """Rewards of whole token sequences (prompt + reply + <|assistant_end|>), batched."""
        device = next(self.parameters()).device
        max_len = 4 * self.config.seq_len
        out: list[float] = []
        for i in range(0, len(sequences), batch_size):
            chunk = [list(s)[-max_len:] for s in sequences[i:i + batch_size]]  # keep the reply's end
            ids, lengths = right_pad(chunk, device=device)
            out.extend(self(ids, lengths).float().tolist())
        return out


def reward_scorer(rm: RewardModel, tokenizer) -> Callable[[Sequence[int], Sequence[int]], float]:
    """The best-of-n scorer: (prompt_ids, completion_ids) -> reward. Completions from the engine stop before
    <|assistant_end|>; the head was trained reading that token, so it is appended."""
    end = tokenizer.assistant_end_id

    def score(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> float:
        comp = list(completion_ids)
        if not comp or comp[-1] != end:
            comp.append(end)
        return rm.score([list(prompt_ids) + comp])[0]

    score.batch = lambda pairs: rm.score([list(p) + _with_end(c, end) for p, c in pairs])  # type: ignore[attr-defined]
    return score


def _with_end(comp: Sequence[int], end: int) -> list[int]:
    comp = list(comp)
    return comp if comp and comp[-1] == end else comp + [end]


def response_logprobs(model: nn.Module, ids: torch.Tensor, resp_mask: torch.Tensor, temperature: float = 1.0,
                      with_entropy: bool = False, with_hidden: bool = False):
    """log π(ids[t] | ids[<t]) at the positions `resp_mask` (B, T) marks, computing logits only there
    (prompt positions need none: with an 8 Ki vocabulary the head is a large share of a small model).

    Returns a dict of (B, T) tensors, zero off the mask: `logp`, and `entropy` (detached: it is logged, never
    optimised) / hidden states `h` (the states *before* each scored token, where a value head reads) on
    request."""
    gpt = core_gpt(model)
    h = gpt.hidden_states(ids)
    B, T = ids.shape
    sel = resp_mask[:, 1:].bool()                 # token t is predicted from position t-1
    hs = h[:, :-1][sel]
    logits = gpt.lm_head(hs).float()
    if temperature != 1.0:
        logits = logits / temperature
    tgt = ids[:, 1:][sel]
    lp = token_logprobs(logits, tgt)
    out = {"logp": _scatter(lp, sel, B, T)}
    if with_entropy:
        with torch.no_grad():
            lse = logits.gather(1, tgt[:, None]).squeeze(1) - lp
            out["entropy"] = _scatter(_entropy(logits.detach(), lse), sel, B, T)
    if with_hidden:
        out["h"] = h
    out["logits_sel"] = logits
    return out


_ROWS = 256   # rows per chunk: 256 x 8 Ki fp32 = 8 MB of temporaries, not N x V of them


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits)[target] per row without materialising the (N, V) log-softmax.

    Forward keeps only the logsumexp (N); backward writes the gradient -g·softmax + g·onehot straight into
    one (N, V) buffer, chunk by chunk. Measured on 4,096 reply tokens x 8 Ki vocabulary (2 CPU threads),
    forward + backward + entropy: 0.21 s against 0.34-0.64 s for log_softmax + gather, whose backward
    builds a zero-filled (N, V) gather gradient and a second (N, V) tensor for the log-softmax gradient."""

    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
        for s in range(0, logits.shape[0], _ROWS):
            lse[s:s + _ROWS] = torch.logsumexp(logits[s:s + _ROWS], dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return logits.gather(1, targets[:, None]).squeeze(1) - lse

    @staticmethod
    def backward(ctx, g):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], _ROWS):
            chunk = grad[s:s + _ROWS]
            torch.sub(logits[s:s + _ROWS], lse[s:s + _ROWS, None], out=chunk)
            chunk.exp_().mul_(-g[s:s + _ROWS, None])
        grad.scatter_add_(1, targets[:, None], g[:, None].to(grad.dtype))
        return grad, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, V) logits, (N,) targets -> (N,) log-probabilities of the targets, differentiable in the logits."""
    return _TokenLogprobs.apply(logits, targets)


@torch.no_grad()
def _entropy(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per row, H = lse - sum(p * logits), in chunks."""
    out = torch.empty_like(lse)
    for s in range(0, logits.shape[0], _ROWS):
        l = logits[s:s + _ROWS]  # noqa: E741
        out[s:s + _ROWS] = lse[s:s + _ROWS] - (torch.exp(l - lse[s:s + _ROWS, None]) * l).sum(-1)
    return out


def _scatter(values: torch.Tensor, sel: torch.Tensor, B: int, T: int) -> torch.Tensor:
    full = torch.zeros(B, T, dtype=values.dtype, device=values.device)
    full[:, 1:][sel] = values
    return full


class PolicyWithValue(nn.Module):
    """The PPO actor-critic: the policy LM and a value head sharing its trunk (one forward gives both).
    `value_grad_to_trunk=False` detaches the trunk under the value head, so value regression never moves
    the policy; a tiny model's policy is easily knocked about by an early, noisy critic."""

    def __init__(self, policy: nn.Module, value_grad_to_trunk: bool = False):
        super().__init__()
        self.policy = policy
        self.value_head = ValueHead(core_gpt(policy).config.n_embd)
        self.value_grad_to_trunk = value_grad_to_trunk

    @property
    def config(self) -> GPTConfig:
        return core_gpt(self.policy).config

    def forward(self, ids: torch.Tensor, resp_mask: torch.Tensor, temperature: float = 1.0):
        out = response_logprobs(self.policy, ids, resp_mask, temperature, with_entropy=True, with_hidden=True)
        h = out.pop("h")
        if not self.value_grad_to_trunk:
            h = h.detach()
        # V at position t-1 is the value of the state in which token t is chosen: align with logp
        v = self.value_head(h[:, :-1]).float()   # fp32 even under bf16 autocast (GAE, the value loss)
        out["values"] = torch.cat([torch.zeros_like(v[:, :1]), v], dim=1) * resp_mask.to(v.dtype)
        return out


# ---- persistence -----------------------------------------------------------------------------------------

def save_head(head: nn.Module, path: Path, checkpoint_id: str) -> None:
    from ..io import save_weights

    save_weights(Path(path), head.state_dict(), {"checkpoint_id": checkpoint_id})


def load_head(head: nn.Module, path: Path) -> None:
    from ..errors import CheckpointError
    from ..io import load_weights

    state, _ = load_weights(Path(path))
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"'{path}' does not fit this head ({str(e).splitlines()[0]})") from None
