"""The alignment losses as pure functions of tensors, so each can be pinned against hand-computed values.

    bradley_terry_loss   reward modelling: -log σ(r_chosen - r_rejected)
    dpo_loss             DPO (sigmoid) and IPO on policy / reference log-probabilities of the pair
    gae                  generalised advantage estimation over right-padded response tokens
    ppo_policy_loss      the clipped surrogate objective (+ clip fraction)
    ppo_value_loss       the clipped value loss
    k3_kl                the k3 estimator of KL(π || π_ref) per token (always >= 0, unbiased)
    group_advantages     GRPO: rewards normalised within each prompt's group of samples
    masked_mean          mean over the positions a mask marks
    anchored_ce          SFT's cross-entropy, optionally + β KL(π || base) on the trained tokens

Masks are float or bool (B, T) tensors: 1 on response tokens, 0 on prompt and padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (PPO normalises advantages per batch)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of -log σ(r_c - r_r): the negative log-likelihood that the chosen reply is preferred."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid"):
    """Per-pair log-probabilities of each reply (summed over its tokens; IPO callers pass per-token means,
    as in the IPO paper) -> (loss, chosen_rewards, rejected_rewards).

    h = (π_c - ref_c) - (π_r - ref_r)
    sigmoid (DPO): -log σ(β h)           ipo: (h - 1/(2β))²
    Implicit rewards β(π - ref) are returned detached, for logging."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}: use sigmoid or ipo")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns for (B, T) per-token rewards and values; `mask` marks the response tokens,
    which start at column 0 and are right-padded. The value after the last real token is 0 (episode end).

        δ_t = r_t + γ V_{t+1} - V_t ;   A_t = δ_t + γ λ A_{t+1} ;   returns = A + V"""
    mask = mask.to(values.dtype)
    values = values * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate: max(-A ρ, -A clip(ρ, 1-ε, 1+ε)), ρ = exp(logp - old_logp).
    Returns (per-token loss (B, T), clip fraction over the mask, approx KL old->new over the mask)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped)
    clipfrac = masked_mean((clipped > unclipped).float(), mask).detach()
    approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, mask).detach()
    return loss, clipfrac, approx_kl


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 · max((V - R)², (clip(V, V_old ± ε) - R)²), masked mean; and the fraction clipped."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    a, b = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(a, b), mask)
    return loss, masked_mean((b > a).float(), mask).detach()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π || π_ref) on samples from π: e^{ref - logp} - (ref - logp) - 1 (Schulman)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True
                     ) -> tuple[torch.Tensor, int]:
    """(G, K) rewards of K samples for each of G prompts -> (advantages (G, K), number of zero-variance groups).

    A = (r - mean_group) / (std_group + eps) (std unbiased, as in the GRPO paper); `scale=False` keeps only the
    centring (Dr. GRPO). Groups whose samples all score the same carry no signal: their advantages are 0."""
    mean = rewards.mean(dim=1, keepdim=True)
    centred = rewards - mean
    if rewards.shape[1] < 2:
        raise ValueError("group advantages need at least 2 samples per prompt")
    std = rewards.std(dim=1, keepdim=True)
    flat = std < 1e-8
    adv = centred / (std + eps) if scale else centred
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv, int(flat.sum())


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution (nats): (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def reverse_kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) over the whole vocabulary at each position: Σ_v p_s (log p_s - log p_t).
    On the student's own samples this is on-policy distillation's mode-seeking objective."""
    ls = torch.log_softmax(student_logits.float(), dim=-1)
    lt = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (ls.exp() * (ls - lt)).sum(-1)


def anchored_ce(logits: torch.Tensor, targets: torch.Tensor, base_logits: torch.Tensor | None = None,
                beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """KL-anchored SFT on (N, V) logits at the N trained positions:

        loss = mean_t [-log π(y_t)] + β · mean_t KL(π_t || base_t)      (the KL exact, over the whole vocabulary)

    Returns (loss, per-token log π(y_t) (N,), the mean KL or None without a base). β = 0 or no base is plain
    SFT's cross-entropy; the per-token log-probabilities are what dataset cartography records."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(1, targets[:, None]).squeeze(1)
    loss = -token_logp.mean()
    if base_logits is None:
        return loss, token_logp, None
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - base_logp)).sum(-1).mean()
    return loss + beta * kl, token_logp, kl
