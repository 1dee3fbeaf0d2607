"""Distillation from a teacher LM into a student, two ways, both through the shared loop.

    offline   the teacher answers training prompts (batched engine); its replies become SFT conversations
              for the student, trained with the SFT loss on packed batches (data/chat.py)
    onpolicy  the student samples replies; on those, the loss is the reverse KL(student || teacher) over the
              whole vocabulary at every reply position (mode-seeking: the student is corrected exactly where
              it goes, which offline data never shows it). Needs the teacher's tokenizer.

`compare_distillation` (`gptstack distill --mode compare`) runs both from the same student and reports each
on the held-out task suite.
The teacher can also be a reward term of RL (`--reward teacher:RUN`, train/rewards.py).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..config import DistillConfig
from ..devices import resolve_device
from ..errors import ConfigError
from ..model.heads import response_logprobs
from . import parallel
from .losses import masked_mean, reverse_kl_per_token
from .loop import Stage, TrainResult, train
from .rl import build_sequences, evaluate_policy, sample_rollout, task_examples
from ..runs import load_frozen, load_model, load_policy_state, load_trainable_policy, run_config, save_policy


# ---- offline: teacher samples -> SFT data ------------------------------------------------------------------

def teacher_conversations(teacher, t_tok, examples, cfg: DistillConfig) -> tuple[list, dict]:
    from ..data.tasks import check_example

    convs, kept, total_score, n = [], 0, 0.0, 0
    for i in range(0, len(examples), 64):
        chunk = examples[i:i + 64]
        _, results = sample_rollout(teacher, t_tok, chunk, cfg.teacher_samples, cfg.max_new_tokens,
                                    cfg.temperature, 0, cfg.seed + i)
        for ex, group in zip(chunk, results):
            for c in group:
                score = check_example(ex, c.text)
                total_score += score
                n += 1
                if (cfg.filter_correct and score < 1.0) or not c.text.strip():
                    continue
                convs.append([*ex.prompt_messages(), {"role": "assistant", "content": c.text.strip()}])
                kept += 1
    return convs, {"teacher_samples": n, "kept": kept, "teacher_score": total_score / max(1, n)}


def sft_loss(model, batch):
    """Next-token loss on assistant tokens of packed conversations (the SFT stage's loss)."""
    try:
        from .sft import sft_loss as shared
        return shared(model, batch)
    except ImportError:
        from ..data.chat import block_causal_mask
        from ..model.gpt import core_gpt

        mask = block_causal_mask(batch["doc_ids"])
        return core_gpt(model)(batch["input_ids"], batch["targets"], position_ids=batch["position_ids"],
                               attn_mask=mask), {}


# ---- onpolicy: student samples, teacher per-token reverse KL -----------------------------------------------

class StudentRollouts:
    """Endless batches of the student's own replies (resumable: prompt cursor + rollout count).

    Under FSDP every rank samples the whole rollout (unsharded weights, the same seed) and keeps its share of
    the prompts' rows, with `token_share` to make its per-token mean its share of the global one (as RL does)."""

    def __init__(self, cfg: DistillConfig, student, tok, examples, device):
        self.cfg, self.student, self.tok, self.examples, self.device = cfg, student, tok, examples, device
        self.rollouts, self.cursor = 0, 0
        self.rank, self.world = parallel.fsdp_data_split(cfg)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        from ..data.tasks import check_example

        cfg = self.cfg
        exs = [self.examples[(self.cursor + j) % len(self.examples)] for j in range(cfg.n_prompts)]
        self.cursor = (self.cursor + cfg.n_prompts) % len(self.examples)
        seed = cfg.seed * 1_000_003 + self.rollouts
        self.rollouts += 1
        t0 = time.time()
        with parallel.unsharded(self.student):   # decode lengths differ between ranks: no collective inside
            prompts, results = sample_rollout(self.student, self.tok, exs, cfg.samples, cfg.max_new_tokens,
                                              cfg.temperature, 0, seed)
        flat = [c for g in results for c in g]
        flat_p = [p for p in prompts for _ in range(cfg.samples)]
        acc = float(np.mean([check_example(ex, c.text) for ex, g in zip(exs, results) for c in g]))
        ids, mask = build_sequences(flat_p, flat, self.tok.assistant_end_id, self.device)
        batch = {"input_ids": ids, "resp_mask": mask, "task_accuracy": acc, "sample_seconds": time.time() - t0}
        if self.world > 1:
            rows = parallel.rank_rows(len(exs), cfg.samples, self.rank, self.world)
            ids, mask = ids[rows], mask[rows]
            width = int(mask.nonzero()[:, 1].max()) + 1
            (share,) = parallel.token_share([float(mask.sum())], self.device)
            batch.update(input_ids=ids[:, :width], resp_mask=mask[:, :width], token_share=share)
        return batch

    def state_dict(self) -> dict:
        return {"rollouts": self.rollouts, "cursor": self.cursor, "n": len(self.examples)}

    def load_state_dict(self, s: dict) -> None:
        if s.get("n") != len(self.examples):
            raise ConfigError("cannot resume distillation: the prompt pool changed")
        self.rollouts, self.cursor = int(s["rollouts"]), int(s["cursor"])


def onpolicy_loss(model, batch: dict, teacher, temperature: float = 1.0):
    mask = batch["resp_mask"]
    s = response_logprobs(model, batch["input_ids"], mask, temperature, with_entropy=True)
    with torch.no_grad():
        t = response_logprobs(teacher, batch["input_ids"], mask, temperature)
    kl = reverse_kl_per_token(s["logits_sel"], t["logits_sel"])
    loss = kl.mean() * batch.get("token_share", 1.0)   # under FSDP: this rank's share of the rollout's tokens
    # the teacher's log-prob of the student's tokens: what the `teacher:` RL reward measures
    teacher_lp = masked_mean(t["logp"], mask)
    return loss, {"reverse_kl": float(loss.detach()), "entropy": float(masked_mean(s["entropy"].detach(), mask)),
                  "teacher_logp": float(teacher_lp), "task_accuracy": float(batch["task_accuracy"]),
                  "sample_seconds": float(batch["sample_seconds"])}


# ---- the stage -------------------------------------------------------------------------------------------

def distill(student_run, cfg: DistillConfig) -> TrainResult:
    from ..data.chat import ChatBatches, encode_conversations

    cfg.validate()
    device = resolve_device(cfg.device)
    teacher, t_tok, _ = load_frozen(cfg.teacher, device, role="teacher")
    torch.manual_seed(cfg.seed)   # LoRA's initial factors: the same on every rank (FSDP shards what each holds)
    student, tok, _ = load_trainable_policy(student_run, device, lora=cfg)
    train_ex = task_examples(cfg.tasks, "train", cfg.train_examples, cfg.seed)
    eval_ex = task_examples(cfg.tasks, "test", cfg.eval_examples, cfg.seed, per_task=True)
    extra = {"teacher_run": str(cfg.teacher), "mode": cfg.mode}
    rank, world = parallel.env_rank()
    frozen = []
    if cfg.mode == "offline":
        # every rank samples the same replies (the whole teacher, before training; it is released after)
        t0 = time.time()
        convs, stats = teacher_conversations(teacher, t_tok, train_ex, cfg)
        if not convs:
            raise ConfigError("the teacher produced no usable replies (try without --filter-correct)")
        if rank == 0:
            print(f"teacher: {stats['teacher_samples']} replies in {time.time() - t0:.0f}s, mean task score "
                  f"{stats['teacher_score']:.3f}; {stats['kept']} kept as SFT data")
        del teacher
        encoded, est = encode_conversations(tok, convs, cfg.seq_len + 1)
        batches = ChatBatches(encoded, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world, device=device,
                              pad_id=tok.bos_id)
        loss_fn, tokens_in = sft_loss, (lambda b: int((b["targets"] >= 0).sum()))
        extra["data"] = {**stats, **est}
    else:
        if t_tok.fingerprint() != tok.fingerprint():
            raise ConfigError("on-policy distillation compares next-token distributions: the teacher and the "
                              "student need the same tokenizer (use --mode offline, or the teacher: RL reward)")
        batches = StudentRollouts(cfg, student, tok, train_ex, device)
        loss_fn = lambda m, b: onpolicy_loss(m, b, teacher, cfg.temperature)  # noqa: E731
        frozen = [teacher]   # sharded by the loop under FSDP, like the student
        tokens_in = lambda b: int(b["resp_mask"].sum())  # noqa: E731
    cfg_run = replace(cfg, total_batch_tokens=0)

    def evaluate(m):
        return {f"eval_{k}": v for k, v in evaluate_policy(m, tok, eval_ex, None, cfg.max_new_tokens,
                                                           kl_samples=False).items()}

    stage = Stage(name=f"distill-{cfg.mode}", model=student, batches=batches, loss_fn=loss_fn,
                  run_config=run_config(f"distill-{cfg.mode}", student, tok, cfg, student_run, **extra),
                  tokenizer=tok, save=save_policy, load=load_policy_state,
                  evaluate=evaluate if cfg.eval_every else None, tokens_in=tokens_in,
                  n_params=sum(p.numel() for p in student.parameters() if p.requires_grad), frozen=frozen)
    return train(stage, cfg_run)


def compare_distillation(student_run, cfg: DistillConfig) -> dict:
    """Offline and on-policy distillation of the same student from the same teacher, each with `cfg`'s
    settings, into cfg.out/offline and cfg.out/onpolicy; each result (and the student and teacher themselves)
    scored greedily on the held-out task suite, with KL to the student. Written to cfg.out/compare.json."""
    import json

    cfg.validate()
    device = resolve_device(cfg.device)
    eval_ex = task_examples(cfg.tasks, "test", cfg.eval_examples, cfg.seed, per_task=True)
    student, tok, _ = load_model(student_run, device)
    report = {"student": evaluate_policy(student, tok, eval_ex, None, cfg.max_new_tokens, cfg.seed)}
    report["teacher"] = evaluate_policy(load_model(cfg.teacher, device)[0], tok, eval_ex, student,
                                        cfg.max_new_tokens, cfg.seed)
    for mode in ("offline", "onpolicy"):
        run_cfg = replace(cfg, out=str(Path(cfg.out) / mode), mode=mode)
        result = distill(student_run, run_cfg)
        model = load_model(run_cfg.out, device)[0]
        report[mode] = {**evaluate_policy(model, tok, eval_ex, student, cfg.max_new_tokens, cfg.seed),
                        "train_seconds": result.seconds}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "compare.json").write_text(json.dumps(report, indent=2))
    return report
