"""Reinforcement learning on the policy's own samples: PPO and GRPO, through the shared training loop.

Where the time goes is sampling, so the batch iterator (`RolloutBatches`) does it with the batched KV-cache
engine: each rollout takes `n_prompts` task prompts, samples `samples` replies per prompt in one `generate`
call (the prompt is prefilled once and shared), scores them with the composed reward (train/rewards.py),
computes advantages and yields minibatches. The loss function (`grpo_loss` / `ppo_loss`) turns a minibatch into
the clipped objective; the loop (train/loop.py) does the optimizer step, logging, checkpoints and resume.

    GRPO: A_i = (r_i - mean_group) / std_group per prompt; loss = clipped surrogate + β · k3 KL(π || π_ref)
    PPO:  per-token reward -β_kl (log π_old - log π_ref), the task reward added at the last token; GAE(γ, λ);
          clipped surrogate + c_v · clipped value loss; β_kl fixed or adaptive (Ziegler et al. 2019)

The reference is the starting model, frozen; with LoRA it is the same model with its adapters disabled, so
no second copy is held. The value head shares the policy's trunk (model/heads.py: PolicyWithValue).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import RLConfig
from ..devices import autocast, resolve_device, resolve_dtype
from ..errors import ConfigError
from ..model.heads import PolicyWithValue, load_head, response_logprobs, right_pad, save_head
from ..model.gpt import core_gpt
from ..runs import is_peft, load_policy_state, load_trainable_policy, run_config, save_policy
from . import parallel
from .losses import gae, group_advantages, k3_kl, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss
from .loop import Stage, TrainResult, train


# ---- the frozen reference ----------------------------------------------------------------------------

def frozen_reference(policy):
    """A frozen copy of the starting policy; None with LoRA (the reference is the adapters-disabled base)."""
    if is_peft(policy):
        return None
    ref = copy.deepcopy(core_gpt(policy)).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def reference_logprobs(ref, policy, ids, mask, temperature: float = 1.0) -> torch.Tensor:
    if ref is not None:
        return response_logprobs(ref, ids, mask, temperature)["logp"]
    with policy.disable_adapter():
        return response_logprobs(policy, ids, mask, temperature)["logp"]


# ---- adaptive KL ---------------------------------------------------------------------------------------

class KLController:
    """Fixed β, or Ziegler et al.'s proportional controller: β ← β (1 + clip(KL/target - 1, ±0.2) · n/horizon)."""

    def __init__(self, init: float, target: float = 0.0, horizon: int = 2000):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target > 0:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n / self.horizon

    def state_dict(self) -> dict:
        return {"kl_coef": self.value}

    def load_state_dict(self, s: dict) -> None:
        self.value = float(s["kl_coef"])


# ---- rollouts ----------------------------------------------------------------------------------------

def sample_rollout(policy, tok, examples, n: int, max_new_tokens: int, temperature: float, top_k: int, seed: int):
    """Prompt ids and, per prompt, n completions from the engine (one batched call)."""
    from ..infer.engine import Engine
    from ..infer.sampling import SamplingParams

    prompts = [tok.render_prompt(ex.prompt_messages()) for ex in examples]
    params = SamplingParams(n=n, temperature=temperature, top_k=top_k, max_tokens=max_new_tokens, seed=seed,
                            stop_token_ids=[tok.assistant_end_id])
    return prompts, Engine(core_gpt(policy) if not is_peft(policy) else policy, tok).generate(prompts, params)


def build_sequences(prompts, completions, end_id: int, device):
    """Right-padded prompt + reply (+ <|assistant_end|> when it stopped: emitting it is an action too) and the
    mask of reply tokens."""
    seqs, starts = [], []
    for p, c in zip(prompts, completions):
        reply = list(c.tokens) + ([end_id] if c.finish_reason == "stop" else [])
        if not reply:
            reply = [end_id]
        seqs.append(list(p) + reply)
        starts.append(len(p))
    ids, lengths = right_pad(seqs, device=device)
    pos = torch.arange(ids.shape[1], device=device)[None]
    mask = (pos >= torch.tensor(starts, device=device)[:, None]) & (pos < lengths[:, None])
    return ids, mask.float()


class RolloutBatches:
    """Endless minibatches of scored rollouts (the RL stage's batch iterator; resumable).

    The state holds the prompt cursor, the rollout count (sampling seeds derive from it) and the minibatches
    of the current rollout not yet trained on, so a resumed run continues exactly where it stopped."""

    def __init__(self, cfg: RLConfig, model, ref, tok, examples, reward_fn, kl: KLController, device):
        self.cfg, self.model, self.ref, self.tok = cfg, model, ref, tok
        self.examples, self.reward_fn, self.kl, self.device = examples, reward_fn, kl, device
        self.rollouts, self.epoch, self.cursor = 0, 0, 0
        # the loss runs under the loop's autocast; the log-probs it is compared with (behaviour policy, reference,
        # values) must come from the same precision, or the first pass's ratio is not 1 but bf16 rounding noise
        self.amp = (torch.device(device), resolve_dtype(cfg.dtype, torch.device(device), training=True))
        self.pending: list[dict] = []
        self._order = self._perm(0)
        self.last_stats: dict = {}
        self.rank, self.world = parallel.fsdp_data_split(cfg)   # (0, 1) unless FSDP: see _rollout

    @property
    def policy(self):
        return self.model.policy if isinstance(self.model, PolicyWithValue) else self.model

    def _perm(self, epoch):
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.examples)).tolist()

    def _next_examples(self):
        out = []
        while len(out) < self.cfg.n_prompts:
            out.append(self.examples[self._order[self.cursor]])
            self.cursor += 1
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.pending:
            self.pending = self._rollout()
        return {k: (torch.as_tensor(v, device=self.device) if isinstance(v, (list, np.ndarray)) else v)
                for k, v in self.pending.pop(0).items()}

    @torch.no_grad()
    def _rollout(self) -> list[dict]:
        """Under FSDP every rank samples the whole rollout (unsharded weights, the same seed: the samples one
        process draws) and scores it, so the logged statistics are the whole rollout's; then it keeps its
        share of the prompts' groups (parallel.rank_rows) for the forwards that follow (sharded, one call each
        on every rank) and the update."""
        cfg, K = self.cfg, self.cfg.samples
        t0 = time.time()
        examples = self._next_examples()
        seed = cfg.seed * 1_000_003 + self.rollouts
        self.rollouts += 1
        with parallel.unsharded(self.model):   # decode lengths differ between ranks: no collective inside
            prompts, results = sample_rollout(self.policy, self.tok, examples, K, cfg.max_new_tokens,
                                              cfg.temperature, cfg.top_k, seed)
        t_sample = time.time() - t0
        flat_ex = [ex for ex in examples for _ in range(K)]
        flat_prompts = [p for p in prompts for _ in range(K)]
        flat = [c for group in results for c in group]
        scores = torch.tensor(self.reward_fn(flat_ex, flat_prompts, flat), dtype=torch.float32)
        from ..data.tasks import check_example
        checks = [check_example(ex, c.text) for ex, c in zip(flat_ex, flat)]
        task_acc = float(np.mean(checks))
        per_task: dict[str, list[float]] = {}   # on a task mixture, which task the rollout's successes come from
        for ex, v in zip(flat_ex, checks):
            per_task.setdefault(ex.task, []).append(v)
        ids, mask = build_sequences(flat_prompts, flat, self.tok.assistant_end_id, self.device)
        response_tokens = float(mask.sum(1).mean())
        if self.world > 1:   # this rank's groups; right padding beyond its longest row is dropped
            rows = parallel.rank_rows(len(examples), K, self.rank, self.world)
            ids, mask, scores = ids[rows], mask[rows], scores[rows]
            width = int(mask.nonzero()[:, 1].max()) + 1
            ids, mask = ids[:, :width], mask[:, :width]
        T = cfg.temperature
        need_ref = cfg.kl_coef > 0 or cfg.algo == "ppo"
        with autocast(*self.amp):
            ref_logp = reference_logprobs(self.ref, self.policy, ids, mask, T) if need_ref else torch.zeros_like(mask)
        batch = {"input_ids": ids, "resp_mask": mask, "ref_logp": ref_logp}
        stats = {"reward": float(scores.mean()), "task_accuracy": task_acc,
                 **({f"task_accuracy_{t}": float(np.mean(v)) for t, v in per_task.items()}
                    if "," in cfg.tasks or cfg.tasks == "all" else {}),
                 "response_tokens": response_tokens, "sample_seconds": t_sample,
                 **getattr(self.reward_fn, "last", {})}
        multi = cfg.update_epochs * cfg.minibatches > 1
        if cfg.algo == "grpo":
            adv, zero = group_advantages(scores.view(-1, K), scale=cfg.scale_rewards)
            batch["adv"] = adv.reshape(-1, 1).to(self.device) * mask
            stats["zero_var_groups"] = float(zero)
            if multi:  # the behaviour policy's log-probs, for the ratio on later passes
                with autocast(*self.amp):
                    batch["old_logp"] = response_logprobs(self.policy, ids, mask, T)["logp"]
        else:
            with autocast(*self.amp):
                out = self.model(ids, mask, T)
            old_logp, values = out["logp"], out["values"]
            kl_tok = (old_logp - ref_logp) * mask
            rewards = -self.kl.value * kl_tok
            last = (mask.sum(1).long() + mask.argmax(1) - 1)          # index of each row's last reply token
            rewards[torch.arange(ids.shape[0]), last] += scores.to(self.device)
            adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
            batch.update(adv=self._whiten(adv, mask) * mask, returns=returns, old_values=values, old_logp=old_logp)
            seq_kl, n_rows = float(kl_tok.sum(1).mean()), ids.shape[0]
            if self.world > 1:   # over the whole rollout: every rank's controller moves alike
                kl_sum, n_rows = parallel.all_sum([float(kl_tok.sum()), n_rows], self.device)
                seq_kl = kl_sum / n_rows
            stats.update(rollout_kl=seq_kl, kl_coef=self.kl.value)
            self.kl.update(seq_kl, int(n_rows))
        self.last_stats = stats
        return self._minibatches(batch, stats, seed)

    def _whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """masked_whiten over the whole rollout: under FSDP its mean and variance are summed over the ranks."""
        if self.world == 1:
            return masked_whiten(x, mask)
        m = mask.to(x.dtype)
        s, n = parallel.all_sum([float((x * m).sum()), float(m.sum())], self.device)
        mean = s / max(n, 1.0)
        (ss,) = parallel.all_sum([float((((x - mean) ** 2) * m).sum())], self.device)
        return (x - mean) * torch.rsqrt(torch.tensor(ss / max(n, 1.0) + 1e-8, dtype=x.dtype, device=x.device))

    def _minibatches(self, batch: dict, stats: dict, seed: int) -> list[dict]:
        """update_epochs x minibatches of this rank's rows. Under FSDP each rank shuffles its own rows, and
        `token_share` scales each rank's per-token mean loss to its share of the minibatch's tokens on all ranks."""
        N = batch["input_ids"].shape[0]
        rng = np.random.default_rng(seed if self.world == 1 else [seed, self.rank])
        out = []
        for _ in range(self.cfg.update_epochs):
            order = rng.permutation(N) if self.cfg.minibatches > 1 else np.arange(N)
            for chunk in np.array_split(order, self.cfg.minibatches):
                idx = torch.as_tensor(chunk, device=self.device)
                width = int(batch["resp_mask"][idx].nonzero()[:, 1].max()) + 1   # trim common right padding
                mb = {k: v[idx, :width].cpu().numpy() for k, v in batch.items()}
                mb.update({k: v for k, v in stats.items()})
                out.append(mb)
        if self.world > 1:
            shares = parallel.token_share([float(mb["resp_mask"].sum()) for mb in out], self.device)
            for mb, share in zip(out, shares):
                mb["token_share"] = share
        return out

    # resume: the pending minibatches are stored as lists (small: tens of rows of < 200 tokens)
    def state_dict(self) -> dict:
        pending = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in mb.items()} for mb in self.pending]
        return {"rollouts": self.rollouts, "epoch": self.epoch, "cursor": self.cursor, "pending": pending,
                "n_examples": len(self.examples)}

    def load_state_dict(self, s: dict) -> None:
        if s.get("n_examples") != len(self.examples):
            raise ConfigError("cannot resume RL: the prompt pool changed (keep --tasks, --train-examples, --seed)")
        self.rollouts, self.epoch, self.cursor = int(s["rollouts"]), int(s["epoch"]), int(s["cursor"])
        self._order = self._perm(self.epoch)
        dtypes = {"input_ids": np.int64}
        self.pending = [{k: (np.asarray(v, dtype=dtypes.get(k, np.float32)) if isinstance(v, list) else v)
                         for k, v in mb.items()} for mb in s.get("pending", [])]


# ---- losses --------------------------------------------------------------------------------------------

STAT_KEYS = ("reward", "task_accuracy", "response_tokens", "zero_var_groups", "rollout_kl", "kl_coef",
             "sample_seconds")


def _stats(batch: dict) -> dict:
    return {k: float(v) for k, v in batch.items()
            if (k in STAT_KEYS or k.startswith(("reward_", "task_accuracy_"))) and not torch.is_tensor(v)}


def grpo_loss(model, batch: dict, cfg: RLConfig):
    mask = batch["resp_mask"]
    out = response_logprobs(model, batch["input_ids"], mask, cfg.temperature, with_entropy=True)
    logp = out["logp"]
    old = batch["old_logp"] if "old_logp" in batch else logp.detach()
    pg, clipfrac, _ = ppo_policy_loss(logp, old, batch["adv"], mask, cfg.clip)
    kl = k3_kl(logp, batch["ref_logp"])
    loss = masked_mean(pg + cfg.kl_coef * kl, mask) if cfg.kl_coef else masked_mean(pg, mask)
    loss = loss * batch.get("token_share", 1.0)   # under FSDP: this rank's share of the rollout's tokens
    return loss, {"kl": float(masked_mean(kl.detach(), mask)), "entropy": float(masked_mean(out["entropy"].detach(), mask)),
                  "clip_frac": float(clipfrac), **_stats(batch)}


def ppo_loss(model: PolicyWithValue, batch: dict, cfg: RLConfig):
    mask = batch["resp_mask"]
    out = model(batch["input_ids"], mask, cfg.temperature)
    pg, clipfrac, approx_kl = ppo_policy_loss(out["logp"], batch["old_logp"], batch["adv"], mask, cfg.clip)
    vloss, vclip = ppo_value_loss(out["values"], batch["old_values"], batch["returns"], mask, cfg.value_clip)
    loss = (masked_mean(pg, mask) + cfg.vf_coef * vloss) * batch.get("token_share", 1.0)
    kl = float(masked_mean((out["logp"] - batch["ref_logp"]).detach(), mask))
    return loss, {"kl": kl, "entropy": float(masked_mean(out["entropy"].detach(), mask)), "clip_frac": float(clipfrac),
                  "value_loss": float(vloss.detach()), "value_clip_frac": float(vclip), "approx_kl": float(approx_kl),
                  **_stats(batch)}


# ---- evaluation ----------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_policy(model, tok, examples, ref=None, max_new_tokens: int = 64, seed: int = 0,
                    kl_samples: bool = True) -> dict:
    """Greedy task accuracy on `examples`; with kl_samples, one T=1 sample per prompt gives the policy's mean
    per-token entropy and the sequence KL to `ref` (a plain model, or None: adapters disabled for a LoRA
    policy, nothing otherwise)."""
    from ..data.tasks import check_example
    from ..infer.engine import Engine
    from ..infer.sampling import SamplingParams

    policy = model.policy if isinstance(model, PolicyWithValue) else model
    engine = Engine(core_gpt(policy) if not is_peft(policy) else policy, tok)
    device = engine.device
    prompts = [tok.render_prompt(ex.prompt_messages()) for ex in examples]
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens,
                                                     stop_token_ids=[tok.assistant_end_id]))
    scores = [check_example(ex, r[0].text) for ex, r in zip(examples, greedy)]
    by_task: dict[str, list] = {}
    for ex, s in zip(examples, scores):
        by_task.setdefault(ex.task, []).append(s)
    out = {"accuracy": float(np.mean(scores)), **{f"acc_{t}": float(np.mean(v)) for t, v in by_task.items()}}
    if kl_samples:
        sampled = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=max_new_tokens, seed=seed,
                                                          stop_token_ids=[tok.assistant_end_id]))
        ent, kls = [], []
        out["sample_accuracy"] = float(np.mean([check_example(ex, r[0].text) for ex, r in zip(examples, sampled)]))
        for i in range(0, len(prompts), 32):
            comps = [r[0] for r in sampled[i:i + 32]]
            ids, mask = build_sequences(prompts[i:i + 32], comps, tok.assistant_end_id, device)
            o = response_logprobs(policy, ids, mask, with_entropy=True)
            ent.append(float(masked_mean(o["entropy"], mask)))
            if ref is not None or is_peft(policy):
                r = reference_logprobs(ref, policy, ids, mask)
                kls.extend(((o["logp"] - r) * mask).sum(1).tolist())
        out["entropy"] = float(np.mean(ent))
        if kls:
            out["kl_to_ref"] = float(np.mean(kls))
    return out


def task_examples(tasks: str, split: str, n: int, seed: int, per_task: bool = False):
    """Task prompts: about n in all, in the proportions of the spec's mixture weights ('facts:2,spelling'),
    or with per_task n of every named task (held-out sets, where weights do not matter)."""
    from ..data.tasks import generate_mixture, parse_task_weights

    weights = parse_task_weights(tasks)
    if per_task:
        return generate_mixture(list(weights), split, n, seed)
    return generate_mixture(tasks, split, max(1, math.ceil(n / sum(weights.values()))), seed)


# ---- the stage -----------------------------------------------------------------------------------------

@dataclass
class RLSetup:
    stage: Stage
    cfg: RLConfig
    policy: torch.nn.Module
    ref: torch.nn.Module | None
    batches: RolloutBatches
    kl: KLController


def prepare_rl(run, cfg: RLConfig, reward_fn=None) -> RLSetup:
    """Everything `train_rl` hands to the loop. `reward_fn(examples, prompt_ids, completions) -> [float]`
    replaces the --reward spec when given (a library user's own reward)."""
    from .rewards import build_reward, parse_reward_spec

    cfg.validate()
    if reward_fn is None:
        parse_reward_spec(cfg.reward)      # a bad spec fails before any model is loaded
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)   # LoRA's initial factors: the same on every rank (FSDP shards what each holds)
    policy, tok, _ = load_trainable_policy(run, device, lora=cfg)
    ref = frozen_reference(policy)
    if reward_fn is None:
        reward_fn = build_reward(cfg.reward, tok, device)
    train_ex = task_examples(cfg.tasks, "train", cfg.train_examples, cfg.seed)
    eval_ex = task_examples(cfg.tasks, "test", cfg.eval_examples, cfg.seed, per_task=True)
    torch.manual_seed(cfg.seed)
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    model = PolicyWithValue(policy).to(device) if cfg.algo == "ppo" else policy
    batches = RolloutBatches(cfg, model, ref, tok, train_ex, reward_fn, kl, device)
    # what the loop's plan line shows: rows x new tokens per optimizer step
    cfg = replace(cfg, total_batch_tokens=0, batch_size=max(1, cfg.n_prompts * cfg.samples // cfg.minibatches),
                  seq_len=max(2, cfg.max_new_tokens))
    loss = (lambda m, b: ppo_loss(m, b, cfg)) if cfg.algo == "ppo" else (lambda m, b: grpo_loss(m, b, cfg))

    def save(m, run_dir, cid):
        save_policy(m.policy if isinstance(m, PolicyWithValue) else m, run_dir, cid)
        if isinstance(m, PolicyWithValue):
            save_head(m.value_head, Path(run_dir) / "value_head.safetensors", cid)

    def load(m, run_dir):
        load_policy_state(m.policy if isinstance(m, PolicyWithValue) else m, run_dir)
        if isinstance(m, PolicyWithValue):
            load_head(m.value_head, Path(run_dir) / "value_head.safetensors")

    def evaluate(m):
        return {f"eval_{k}": v for k, v in evaluate_policy(m, tok, eval_ex, None, cfg.max_new_tokens,
                                                           kl_samples=False).items()}

    config = run_config(f"rl-{cfg.algo}", policy, tok, cfg, run, reward=cfg.reward)
    stage = Stage(name=cfg.algo, model=model, batches=batches, loss_fn=loss, run_config=config, tokenizer=tok,
                  save=save, load=load, evaluate=evaluate if cfg.eval_every else None, evaluate_at_start=True,
                  tokens_in=lambda b: int(b["resp_mask"].sum()),
                  extra_state=kl.state_dict, load_extra_state=kl.load_state_dict,
                  n_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  frozen=[ref] if ref is not None else [])
    return RLSetup(stage, cfg, policy, ref, batches, kl)


def train_rl(run, cfg: RLConfig, reward_fn=None) -> TrainResult:
    """PPO or GRPO from the LM in `run` (usually an SFT run)."""
    setup = prepare_rl(run, cfg, reward_fn)
    return train(setup.stage, setup.cfg)
