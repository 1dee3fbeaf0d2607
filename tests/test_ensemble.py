"""Self-consistency voting and best-of-n."""

import pytest

from _infer_util import BanHook, tiny_model
from gptstack.data.tasks import get_task
from gptstack.errors import ConfigError
from gptstack.infer.engine import Engine
from gptstack.infer.ensemble import best_of_n, majority_vote, self_consistency
from gptstack.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    return Engine(tiny_model(tiny_tokenizer), tiny_tokenizer)


def test_majority_vote_ties_go_to_earliest():
    assert majority_vote(["3", "4", "4", "3"]) == ("3", 0)
    assert majority_vote([None, "7", "8", "8"]) == ("8", 2)
    assert majority_vote([None, None]) == (None, -1)
    assert majority_vote(["a"]) == ("a", 0)


def test_self_consistency_votes_over_k_samples(engine):
    task = get_task("arithmetic_direct")
    examples = task.generate("test", 3, seed=0)
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=6)
    votes = self_consistency(engine, task, examples, 5, params)
    assert len(votes) == 3
    for ex, v in zip(examples, votes):
        assert len(v.samples) == 5
        answers = [task.extract(c.text) for c in v.samples]
        want, first = majority_vote(answers)
        assert v.answer == want and (v.completion is v.samples[first] if first >= 0 else v.completion is None)
        assert sum(v.votes.values()) == sum(a is not None for a in answers)
        assert v.score in (0.0, 1.0) or 0 <= v.score <= 1


def test_best_of_n_picks_top_score(engine, tiny_tokenizer):
    prompts = [tiny_tokenizer.encode("The king", bos=True), tiny_tokenizer.encode("Night", bos=True)]
    scorer = lambda p, c: float(len(set(c)))  # noqa: E731 - "most distinct tokens" as a stand-in reward
    out = best_of_n(engine, prompts, 4, scorer, SamplingParams(temperature=1.0, seed=1, max_tokens=8,
                                                                stop_token_ids=[]))
    for b in out:
        assert b.scores == [float(len(set(c.tokens))) for c in b.samples]
        assert b.score == max(b.scores) and b.completion is b.samples[b.scores.index(max(b.scores))]
    calls = []

    def batch_scorer(p, c):
        raise AssertionError("the batch method should be used")

    batch_scorer.batch = lambda pairs: calls.append(len(pairs)) or [0.0] * len(pairs)
    best_of_n(engine, prompts[:1], 3, batch_scorer, SamplingParams(seed=0, max_tokens=3))
    assert calls == [3]


@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one_is_config_error(engine, k):
    with pytest.raises(ConfigError):
        best_of_n(engine, [[1, 2]], k, lambda p, c: 0.0)
    with pytest.raises(ConfigError):
        self_consistency(engine, get_task("arithmetic_direct"), [], k)


def _most_common_token(samples):
    from collections import Counter

    return Counter(t for c in samples for t in c.tokens).most_common(1)[0][0]


def test_hooks_reach_best_of_n_generation(engine, tiny_tokenizer):
    prompts = [tiny_tokenizer.encode("The king", bos=True), tiny_tokenizer.encode("Night", bos=True)]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=12, stop_token_ids=[])
    scorer = lambda p, c: float(len(set(c)))  # noqa: E731
    free = best_of_n(engine, prompts, 4, scorer, params)
    banned = _most_common_token([c for b in free for c in b.samples])
    hook = BanHook(banned)
    out = best_of_n(engine, prompts, 4, scorer, params, hooks=[hook])
    assert hook.rows == 8                       # 2 prompts x 4 samples, one generation
    assert all(banned not in c.tokens for b in out for c in b.samples)
    for b in out:
        assert b.completion is b.samples[b.index] and b.score == b.scores[b.index] == max(b.scores)


def test_hooks_reach_self_consistency_generation(engine):
    task = get_task("arithmetic_direct")
    examples = task.generate("test", 2, seed=0)
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=8)
    free = self_consistency(engine, task, examples, 4, params)
    banned = _most_common_token([c for v in free for c in v.samples])
    hook = BanHook(banned)
    votes = self_consistency(engine, task, examples, 4, params, hooks=[hook])
    assert hook.rows == 8
    assert all(banned not in c.tokens for v in votes for c in v.samples)


def test_vote_and_pick_best_over_given_samples():
    from gptstack.infer.engine import Completion
    from gptstack.infer.ensemble import pick_best, vote

    task = get_task("arithmetic_direct")
    texts = ["Answer: 4", "no answer", "Answer: 5", "Answer: 5", "Answer: 4"]
    samples = [Completion(0, j, tokens=[j] * (j + 1), text=t) for j, t in enumerate(texts)]
    v = vote(task, samples)
    assert v.answer == "4" and v.completion is samples[0] and v.votes == {"4": 2, "5": 2}
    assert v.answers == ["4", None, "5", "5", "4"] and v.score is None and v.samples == samples
    none = vote(task, samples[1:2])
    assert none.answer is None and none.completion is None and none.votes == {}

    b = pick_best([1, 2], samples, lambda p, c: float(len(c) % 3))   # scores 1 2 0 1 2: first 2 wins
    assert (b.index, b.score, b.scores) == (1, 2.0, [1.0, 2.0, 0.0, 1.0, 2.0]) and b.completion is samples[1]
