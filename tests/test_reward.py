"""The reward model learns a trivially separable preference set, reloads to the same scores, and scores
best-of-n candidates; preference pairs are built from a model's own ranked samples."""

import json

import pytest

from test_rl import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("rm"), seed=1)


def separable_pairs(n):
    from gptstack.data.preference import PreferencePair

    return [PreferencePair([{"role": "user", "content": f"What is {i} + {i % 7}?"}],
                           f"Answer: {2 * i + 1} good", f"Answer: {2 * i + 1} bad bad") for i in range(n)]


def test_reward_model_learns_separable_preferences(run, tmp_path):
    from gptstack.data.preference import save_preferences
    from gptstack.model.heads import reward_scorer
    from gptstack.train.reward_model import RewardConfig, train_reward
    from gptstack.runs import load_reward_model

    save_preferences(separable_pairs(48), tmp_path / "prefs.jsonl")
    cfg = RewardConfig(out=str(tmp_path / "rm"), prefs=str(tmp_path / "prefs.jsonl"), steps=25, batch_size=8,
                       lr=2e-3, val_frac=0.25, eval_every=25, device="cpu", progress=False)
    result = train_reward(run, cfg)
    assert result.last["val_accuracy"] >= 0.9, result.last
    assert result.last["val_margin"] > 0
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["kind"] == "reward" and config["parent_run"] == str(run)

    rm, tok, _ = load_reward_model(tmp_path / "rm")
    score = reward_scorer(rm, tok)
    prompt = tok.render_prompt([{"role": "user", "content": "What is 100 + 2?"}])
    good, bad = tok.encode("Answer: 102 good"), tok.encode("Answer: 102 bad bad")
    assert score(prompt, good) > score(prompt, bad)
    assert score.batch([(prompt, good), (prompt, bad)]) == pytest.approx([score(prompt, good), score(prompt, bad)], abs=1e-4)


def test_reward_lora_head_trained_in_full(run, tmp_path):
    pytest.importorskip("peft")
    from gptstack.data.preference import save_preferences
    from gptstack.train.reward_model import RewardConfig, train_reward
    from gptstack.runs import load_reward_model

    save_preferences(separable_pairs(16), tmp_path / "prefs.jsonl")
    cfg = RewardConfig(out=str(tmp_path / "rm_lora"), prefs=str(tmp_path / "prefs.jsonl"), steps=2, batch_size=4,
                       lr=1e-3, val_frac=0.25, eval_every=2, device="cpu", progress=False, lora=True, lora_rank=4)
    train_reward(run, cfg)
    assert (tmp_path / "rm_lora" / "adapter").is_dir() and not (tmp_path / "rm_lora" / "model.safetensors").exists()
    rm, tok, _ = load_reward_model(tmp_path / "rm_lora")
    assert len(rm.score([[1, 2, 3], [4, 5]])) == 2


def test_missing_or_wrong_reward_run(run, tmp_path):
    from gptstack.errors import CheckpointError
    from gptstack.runs import load_reward_model

    with pytest.raises(CheckpointError, match="does not exist"):
        load_reward_model(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="not a reward-model run"):
        load_reward_model(run)


def test_preferences_from_ranked_samples(run, tmp_path):
    from gptstack.data.preference import load_preferences
    from gptstack.train.reward_model import build_preferences

    from gptstack.config import PreferencesConfig

    pairs, stats = build_preferences(run, PreferencesConfig(tasks="arithmetic_direct,spelling", samples=3, n_prompts=6,
                                                            out=str(tmp_path / "p.jsonl"), max_new_tokens=6, device="cpu"))
    assert stats["prompts"] == 6 and stats["pairs"] + stats["ties"] == 6
    if pairs:
        assert len(load_preferences(tmp_path / "p.jsonl")) == len(pairs)
    from gptstack.errors import ConfigError
    with pytest.raises(ConfigError):
        build_preferences(run, PreferencesConfig(tasks="spelling", samples=1, n_prompts=2, device="cpu"))
