"""Direct preference optimisation: learn from (prompt, chosen, rejected) pairs against a frozen reference.

    h = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))
    sigmoid (DPO, Rafailov et al.):  -log σ(β h)         ipo (Azar et al.):  (h - 1/(2β))², per-token means

Chosen and rejected rows go through the policy in one forward (2B rows), the reference likewise under
no_grad (with LoRA: the same model with adapters disabled). Logits are computed only on reply positions.
Logged: implicit rewards β(log π - log π_ref) of chosen and rejected, their margin, and pair accuracy.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import DPOConfig
from ..devices import resolve_device
from ..model.heads import response_logprobs
from .losses import dpo_loss
from .parallel import env_rank, fsdp_data_split
from .loop import Stage, TrainResult, train
from .reward_model import PairBatches, collate_pairs, split_pairs
from .rl import frozen_reference, reference_logprobs
from ..runs import load_policy_state, load_trainable_policy, run_config, save_policy


def pair_logps(model, batch: dict, ref, policy, mean: bool, with_ref: bool = True):
    """Per-row log-probability of the reply (sum, or per-token mean for IPO), policy and reference."""
    ids, mask = batch["input_ids"], batch["resp_mask"].float()
    n_tok = mask.sum(1).clamp(min=1)
    lp = (response_logprobs(model, ids, mask)["logp"] * mask).sum(1)
    if "ref_logp" in batch:
        ref_lp = batch["ref_logp"]
    else:
        ref_lp = (reference_logprobs(ref, policy, ids, mask) * mask).sum(1)
    if mean:
        lp, ref_lp = lp / n_tok, ref_lp / n_tok
    return lp, ref_lp


def dpo_step_loss(model, batch: dict, cfg: DPOConfig, ref, policy):
    lp, ref_lp = pair_logps(model, batch, ref, policy, mean=cfg.loss == "ipo")
    B = lp.shape[0] // 2
    loss, rc, rr = dpo_loss(lp[:B], lp[B:], ref_lp[:B], ref_lp[B:], cfg.beta, cfg.loss)
    return loss, {"reward_chosen": float(rc.mean()), "reward_rejected": float(rr.mean()),
                  "reward_margin": float((rc - rr).mean()), "accuracy": float((rc > rr).float().mean()),
                  "logp_chosen": float(lp[:B].detach().mean()), "logp_rejected": float(lp[B:].detach().mean())}


@torch.no_grad()
def evaluate_dpo(model, encoded, cfg: DPOConfig, ref, policy) -> dict:
    if not encoded:
        return {}
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, len(encoded), 16):
        b = collate_pairs(encoded[i:i + 16], device)
        loss, m = dpo_step_loss(model, b, cfg, ref, policy)
        k = b["input_ids"].shape[0] // 2
        for key, v in {"loss": float(loss), **m}.items():
            sums[key] = sums.get(key, 0.0) + v * k
        n += k
    return {f"val_{k}": v / n for k, v in sums.items()}


def prepare_dpo(run, cfg: DPOConfig):
    """(stage, cfg, policy, reference) for the loop; reference None with LoRA (adapters disabled)."""
    from ..data.preference import encode_pairs, load_preferences

    cfg.validate()
    pairs = load_preferences(cfg.prefs)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)   # LoRA's initial factors: the same on every rank (FSDP shards what each holds)
    policy, tok, _ = load_trainable_policy(run, device, lora=cfg)
    ref = frozen_reference(policy)
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_frac, cfg.seed)
    enc_train, st = encode_pairs(tok, train_pairs, cfg.max_len)
    enc_val, st_val = encode_pairs(tok, val_pairs, cfg.max_len)
    rank, world = fsdp_data_split(cfg)
    if env_rank()[0] == 0:
        print(f"preferences: {len(pairs)} pairs -> {st['kept']} train, {st_val['kept']} held out "
              f"({st['truncated'] + st_val['truncated']} truncated, {st['skipped'] + st_val['skipped']} skipped)")
    batches = PairBatches(enc_train, cfg.batch_size, cfg.seed, device, rank, world)
    cfg = replace(cfg, seq_len=cfg.max_len, total_batch_tokens=0)
    config = run_config("dpo", policy, tok, cfg, run,
                        data={"pairs": len(pairs), "train_pairs": st["kept"], "val_pairs": st_val["kept"]})
    stage = Stage(name=f"dpo-{cfg.loss}", model=policy, batches=batches,
                  loss_fn=lambda m, b: dpo_step_loss(m, b, cfg, ref, policy), run_config=config, tokenizer=tok,
                  save=save_policy, load=load_policy_state,
                  evaluate=(lambda m: evaluate_dpo(m, enc_val, cfg, ref, policy)) if enc_val else None,
                  tokens_in=lambda b: int(b["input_ids"].numel()),
                  n_params=sum(p.numel() for p in policy.parameters() if p.requires_grad),
                  frozen=[ref] if ref is not None else [])
    return stage, cfg, policy, ref


def train_dpo(run, cfg: DPOConfig) -> TrainResult:
    stage, cfg, _, _ = prepare_dpo(run, cfg)
    return train(stage, cfg)
