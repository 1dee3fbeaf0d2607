"""Reward modelling: an SFT model with a scalar head, trained on preference pairs with the Bradley-Terry loss.

    loss = -log σ(r(prompt, chosen) - r(prompt, rejected))

Chosen and rejected replies run through the trunk as one batch of 2B rows; the reward is read at each row's
last real token (its <|assistant_end|>). Held-out pairs give the preference accuracy and mean margin.
With --lora the trunk gets LoRA adapters and the head is trained in full.

The run directory is an ordinary one plus `head.safetensors` and `kind: "reward"` in config.json;
`runs.load_reward_model(run)` brings it back, `reward_scorer` (model/heads.py) turns it into a best-of-n scorer.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch

from ..config import PreferencesConfig, RewardConfig
from ..devices import resolve_device
from ..errors import ConfigError, DataError
from ..model.heads import RewardModel, ScalarHead, right_pad
from ..model.gpt import core_gpt
from ..runs import load_reward_state, run_config, save_reward
from .losses import bradley_terry_loss
from .loop import Stage, TrainResult, train


class PairBatches:
    """Endless, resumable batches of preference pairs: 2B right-padded rows (B chosen, then the B rejected),
    `resp_mask` on each final reply (+ its end token), `lengths` for reading rewards at the last token.

    Under FSDP each step draws B x world pairs from one seeded order and rank r takes the r-th B of them:
    ranks see disjoint pairs, and 2 ranks x B pairs are the pairs of one process x 2B. The position is the
    same on every rank (so a run resumes at any world size)."""

    def __init__(self, encoded, batch_size: int, seed: int, device="cpu", rank: int = 0, world: int = 1):
        if not encoded:
            raise DataError("no preference pairs left to train on (all skipped: prompts longer than --max-len?)")
        self.encoded, self.batch_size, self.seed, self.device = encoded, batch_size, seed, device
        self.rank, self.world = rank, world
        self.epoch, self.cursor = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.encoded)).tolist()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        idx = []
        while len(idx) < self.batch_size * self.world:
            idx.append(self._order[self.cursor])
            self.cursor += 1
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
        mine = idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return collate_pairs([self.encoded[i] for i in mine], self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": len(self.encoded), "seed": self.seed}

    def load_state_dict(self, s: dict) -> None:
        if s.get("n") != len(self.encoded) or s.get("seed") != self.seed:
            raise ConfigError("cannot resume: the preference data or seed changed since the checkpoint")
        self.epoch, self.cursor = int(s["epoch"]), int(s["cursor"])
        self._order = self._perm(self.epoch)


def collate_pairs(items, device="cpu") -> dict:
    seqs = [c for c, _, _, _ in items] + [r for _, _, r, _ in items]
    masks = [cm for _, cm, _, _ in items] + [rm for _, _, _, rm in items]
    ids, lengths = right_pad(seqs)
    resp, _ = right_pad(masks)
    return {"input_ids": ids.to(device), "resp_mask": resp.to(device), "lengths": lengths.to(device)}


def split_pairs(pairs, val_frac: float, seed: int):
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(pairs) * val_frac)) if val_frac > 0 and len(pairs) >= 4 else 0
    val = [pairs[i] for i in order[:n_val]]
    return [pairs[i] for i in order[n_val:]], val


def bt_loss(model: RewardModel, batch: dict):
    r = model(batch["input_ids"], batch["lengths"])
    B = r.shape[0] // 2
    rc, rr = r[:B], r[B:]
    loss = bradley_terry_loss(rc, rr)
    r, rc, rr = r.detach(), rc.detach(), rr.detach()
    return loss, {"accuracy": float((rc > rr).float().mean()), "margin": float((rc - rr).mean()),
                  "reward_mean": float(r.mean())}


@torch.no_grad()
def evaluate_pairs(model: RewardModel, encoded, batch_size: int = 16) -> dict:
    """Preference accuracy (ties count half), mean margin r_c - r_r and loss on encoded pairs."""
    if not encoded:
        return {}
    device = next(model.parameters()).device
    margins = []
    for i in range(0, len(encoded), batch_size):
        b = collate_pairs(encoded[i:i + batch_size], device)
        r = model(b["input_ids"], b["lengths"]).float()
        n = r.shape[0] // 2
        margins.append(r[:n] - r[n:])
    m = torch.cat(margins)
    acc = (m > 0).float() + 0.5 * (m == 0).float()
    return {"val_accuracy": float(acc.mean()), "val_margin": float(m.mean()),
            "val_loss": float(-torch.nn.functional.logsigmoid(m).mean()), "val_pairs": float(len(encoded))}


# ---- persistence -------------------------------------------------------------------------------------------

# ---- the stage ---------------------------------------------------------------------------------------------

def train_reward(sft_run, cfg: RewardConfig) -> TrainResult:
    """Train a reward model on `cfg.prefs`, starting from the LM in `sft_run`."""
    from ..data.preference import encode_pairs, load_preferences
    from ..runs import load_trainable_policy

    from .parallel import env_rank, fsdp_data_split

    cfg.validate()
    pairs = load_preferences(cfg.prefs)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)   # LoRA's initial factors: the same on every rank (FSDP shards what each holds)
    body, tok, parent_cfg = load_trainable_policy(sft_run, device, lora=cfg)
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_frac, cfg.seed)
    enc_train, st_train = encode_pairs(tok, train_pairs, cfg.max_len)
    enc_val, st_val = encode_pairs(tok, val_pairs, cfg.max_len)
    rank, world = fsdp_data_split(cfg)
    if env_rank()[0] == 0:
        print(f"preferences: {len(pairs)} pairs -> {st_train['kept']} train, {st_val['kept']} held out "
          f"({st_train['truncated'] + st_val['truncated']} truncated, {st_train['skipped'] + st_val['skipped']} "
              f"skipped: prompt longer than --max-len {cfg.max_len})")
    torch.manual_seed(cfg.seed)
    rm = RewardModel(body, ScalarHead(core_gpt(body).config.n_embd, seed=cfg.seed)).to(device)
    batches = PairBatches(enc_train, cfg.batch_size, cfg.seed, device, rank, world)
    cfg = replace(cfg, seq_len=cfg.max_len, total_batch_tokens=0)
    config = run_config("reward", body, tok, cfg, sft_run, kind="reward",
                        data={"pairs": len(pairs), "train_pairs": st_train["kept"], "val_pairs": st_val["kept"]})
    stage = Stage(name="reward", model=rm, batches=batches, loss_fn=bt_loss, run_config=config, tokenizer=tok,
                  save=save_reward, load=load_reward_state,
                  evaluate=(lambda m: evaluate_pairs(m, enc_val)) if enc_val else None,
                  tokens_in=lambda b: int(b["lengths"].sum()),
                  n_params=sum(p.numel() for p in rm.parameters() if p.requires_grad))
    return train(stage, cfg)


# ---- preference data from the SFT model's own samples --------------------------------------------------------

def build_preferences(run, cfg: PreferencesConfig, batch_prompts: int = 32):
    """Sample `cfg.samples` replies per task prompt from `run` (one batched engine call per `batch_prompts` prompts), rank
    them by the task checker, and pair the best with the worst. Prompts whose K replies all score the same
    carry no preference and are skipped (counted). Returns (pairs, stats); writes JSONL to `cfg.out` if set."""
    from ..data.preference import PreferencePair, save_preferences
    from ..data.tasks import check_example
    from ..runs import load_model
    from .rl import sample_rollout, task_examples

    cfg.validate()
    model, tok, _ = load_model(run, resolve_device(cfg.device))
    examples = task_examples(cfg.tasks, "train", cfg.n_prompts, cfg.seed)[:cfg.n_prompts]
    pairs, stats = [], {"prompts": 0, "pairs": 0, "ties": 0, "mean_score": 0.0}
    total = 0.0
    from tqdm import tqdm
    for i in tqdm(range(0, len(examples), batch_prompts), desc="preferences", unit="batch", leave=False):
        chunk = examples[i:i + batch_prompts]
        _, results = sample_rollout(model, tok, chunk, cfg.samples, cfg.max_new_tokens, cfg.temperature, 0, cfg.seed + i)
        for ex, group in zip(chunk, results):
            stats["prompts"] += 1
            scored = [(check_example(ex, c.text), j, c.text.strip()) for j, c in enumerate(group)]
            total += sum(s for s, _, _ in scored)
            best = max(scored, key=lambda s: (s[0], -s[1]))
            worst = min(scored, key=lambda s: (s[0], s[1]))
            if best[0] == worst[0] or best[2] == worst[2]:
                stats["ties"] += 1
                continue
            pairs.append(PreferencePair(ex.prompt_messages(), best[2], worst[2]))
    stats["pairs"] = len(pairs)
    stats["mean_score"] = total / max(1, stats["prompts"] * cfg.samples)
    if cfg.out:
        save_preferences(pairs, cfg.out)
    return pairs, stats
