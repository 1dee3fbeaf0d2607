"""Test-time compute: spend more samples on a question, keep the answer the samples agree on, or the one a
reward model likes best.

    self_consistency(engine, task, examples, k, params)    sample k chain-of-thought replies per example,
                                                            extract each final answer, majority vote
    best_of_n(engine, prompts, k, scorer, params)           sample k replies per prompt, keep the top-scored
    vote(task, samples) / pick_best(prompt, samples, scorer)
                                                            the same choice over samples already drawn

Both samplers take `hooks=` (logits hooks: a grammar, base-model mixing), passed to every generation.

Votes break ties by the earliest sample that gave a tied answer, so a vote is a pure function of the samples.
Replies without an extractable answer do not vote (a question where none has one gets answer None).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from ..errors import ConfigError
from .engine import Completion, Engine, LogitsHook
from .sampling import SamplingParams

Scorer = Callable[[Sequence[int], Sequence[int]], float]


@dataclass
class Vote:
    answer: str | None            # the majority answer (None when no sample had one)
    votes: dict[str, int]         # answer -> how many samples gave it
    completion: Completion | None  # the first sample that gave the winning answer
    score: float | None = None    # task.check of that sample, when the caller scored it
    samples: list[Completion] | None = None
    answers: list[str | None] | None = None   # task.extract of each sample, in order


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, int]:
    """(winning answer, index of its first occurrence); ties go to the answer seen first; None never wins."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, -1
    best = max(counts.values())
    for i, a in enumerate(answers):
        if a is not None and counts[a] == best:
            return a, i
    raise AssertionError("unreachable")


def vote(task, samples: Sequence[Completion]) -> Vote:
    """Majority vote over one prompt's samples by `task.extract`'s answers (score left unset)."""
    answers = [task.extract(c.text) for c in samples]
    answer, first = majority_vote(answers)
    return Vote(answer, dict(Counter(a for a in answers if a is not None)), samples[first] if first >= 0 else None,
                samples=list(samples), answers=answers)


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"K (samples per prompt) must be at least 1, got {k}")


def self_consistency(engine: Engine, task, examples, k: int, params: SamplingParams | None = None,
                     score: bool = True, hooks: Sequence[LogitsHook] = ()) -> list[Vote]:
    """Majority vote over k sampled replies per task example (`task` is a module from data.tasks)."""
    _check_k(k)
    params = replace(params or SamplingParams(temperature=0.8, top_k=50, max_tokens=256), n=k)
    prompts = [engine.tokenizer.render_prompt(ex.prompt_messages()) for ex in examples]
    results = engine.generate(prompts, params, hooks=hooks) if prompts else []
    votes = []
    for ex, samples in zip(examples, results):
        v = vote(task, samples)
        if score:
            v.score = float(task.check(ex, v.completion.text)) if v.completion is not None else 0.0
        votes.append(v)
    return votes


def vote_accuracy(engine: Engine, task, examples, k: int, params: SamplingParams | None = None) -> dict:
    """Accuracy of the first sample alone vs the k-sample vote on the same samples."""
    votes = self_consistency(engine, task, examples, k, params)
    single = [float(task.check(ex, v.samples[0].text)) for ex, v in zip(examples, votes)]
    n = max(1, len(votes))
    return {"k": k, "n": len(votes), "single": sum(single) / n, "vote": sum(v.score for v in votes) / n}


@dataclass
class Best:
    completion: Completion
    score: float
    scores: list[float]
    samples: list[Completion]
    index: int = 0                # which sample won (ties: the earliest)


def pick_best(prompt: Sequence[int], samples: Sequence[Completion], scorer: Scorer) -> Best:
    """The sample `scorer(prompt_ids, completion_ids)` rates highest (ties: the earliest). A scorer with a
    `.batch(pairs)` method is called once for all the samples instead of once per sample."""
    batch = getattr(scorer, "batch", None)
    if batch is not None:
        scores = [float(s) for s in batch([(list(prompt), c.tokens) for c in samples])]
    else:
        scores = [float(scorer(list(prompt), c.tokens)) for c in samples]
    i = max(range(len(scores)), key=lambda j: (scores[j], -j))
    return Best(samples[i], scores[i], scores, list(samples), i)


def best_of_n(engine: Engine, prompts: Sequence[Sequence[int]], k: int, scorer: Scorer,
              params: SamplingParams | None = None, hooks: Sequence[LogitsHook] = ()) -> list[Best]:
    """Sample k replies per prompt and keep the one `scorer(prompt_ids, completion_ids)` rates highest (ties:
    the earliest). A scorer with a `.batch(pairs)` method is called once per prompt instead of per reply."""
    _check_k(k)
    if not callable(scorer):
        raise ConfigError("best-of-n needs a scorer: a callable (prompt_ids, completion_ids) -> float")
    params = replace(params or SamplingParams(temperature=0.8, top_k=50, max_tokens=256), n=k)
    return [pick_best(prompt, samples, scorer)
            for prompt, samples in zip(prompts, engine.generate(prompts, params, hooks=hooks))]


def reward_model_scorer(run_dir: str, device="cpu") -> Scorer:
    """A scorer from a reward-model run directory (trained by `gptstack reward`)."""
    from pathlib import Path

    from ..errors import CheckpointError

    if not Path(run_dir).is_dir():
        raise CheckpointError(f"reward model run '{run_dir}' does not exist; train one with `gptstack reward` "
                              "or pass an existing run directory")
    from ..model.heads import reward_scorer
    from ..runs import load_reward_model

    rm, tok, _ = load_reward_model(run_dir, device)
    return reward_scorer(rm.eval(), tok)
