"""PPO, GRPO and DPO smoke steps on a tiny random model: every trainable parameter moves, the reference never
does, the adaptive KL state and half-used rollouts survive a resume, and bad input fails in one clear line."""

import json
from pathlib import Path

import pytest
import torch

from gptstack.errors import CheckpointError, ConfigError, DataError


def make_run(tmp: Path, name="sft", seed=0) -> Path:
    from gptstack.data.tasks import generate_mixture
    from gptstack.model.gpt import GPT, GPTConfig
    from gptstack.tokenizer import Tokenizer
    from gptstack.io import atomic_write_json, save_weights

    texts = [m["content"] for ex in generate_mixture("arithmetic_direct,spelling", "train", 40, 0) for m in ex.messages]
    tok = Tokenizer.train(texts, vocab_size=300)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=2, n_kv_head=2, mlp_hidden=128, seq_len=128)
    model = GPT(cfg)
    model.init_weights(seed)
    with torch.no_grad():  # a non-zero residual stream so every weight gets gradient from the first step
        for n, p in model.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0, 0.02)
            if n == "lm_head.weight":
                p.normal_(0, 0.05)
    run = tmp / name
    run.mkdir(parents=True)
    save_weights(run / "model.safetensors", model.state_dict(), {"checkpoint_id": "x"})
    tok.save(run / "tokenizer")
    atomic_write_json(run / "config.json", {"kind": "lm", "stage": "sft", "model": cfg.to_dict(), "parent_run": None})
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("rl"))


def text_reward(examples, prompt_ids, completions):
    """Varies between samples of one prompt, so GRPO groups have signal even for a random model."""
    return [sum(ch in "aeiou" for ch in c.text) / (1 + len(c.text)) + 0.01 * len(c.tokens) for c in completions]


def rl_cfg(out, **kw):
    from gptstack.train.rl import RLConfig

    base = dict(out=str(out), steps=1, n_prompts=2, samples=3, max_new_tokens=8, train_examples=8, eval_examples=2,
                eval_every=0, progress=False, lr=1e-3, device="cpu", tasks="arithmetic_direct,spelling")
    base.update(kw)
    return RLConfig(**base)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_one_step_changes_every_trainable_parameter(run, tmp_path, algo):
    from gptstack.train.loop import train
    from gptstack.train.rl import prepare_rl

    setup = prepare_rl(run, rl_cfg(tmp_path / algo, algo=algo, kl_coef=0.05, eval_every=1), reward_fn=text_reward)
    model = setup.stage.model
    before, ref_before = snapshot(model), snapshot(setup.ref)
    result = train(setup.stage, setup.cfg)
    assert result.steps == 1
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p.detach(), before[n])]
    assert not unchanged, f"{algo}: parameters that did not move: {unchanged}"
    assert all(torch.equal(p, ref_before[n]) for n, p in setup.ref.named_parameters())
    m = [json.loads(l) for l in (tmp_path / algo / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in m if "reward" in r]
    for key in ("reward", "kl", "entropy", "clip_frac", "task_accuracy"):
        assert key in train_records[-1]
    # the starting model's held-out accuracy is logged before the first step: the baseline of the curve
    evals = [r for r in m if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 1]
    if algo == "grpo":
        assert "zero_var_groups" in train_records[-1]
    # on a task mixture the rollout's accuracy is also logged per task
    logged = {k for r in train_records for k in r if k.startswith("task_accuracy_")}
    assert logged and logged <= {"task_accuracy_arithmetic_direct", "task_accuracy_spelling"}
    # the run directory is an ordinary LM run
    from gptstack.runs import load_model
    loaded, _, cfg = load_model(tmp_path / algo)
    assert cfg["stage"] == f"rl-{algo}"
    if algo == "ppo":
        assert (tmp_path / algo / "value_head.safetensors").exists()


def test_dpo_step_and_frozen_reference(run, tmp_path):
    from gptstack.data.preference import PreferencePair, save_preferences
    from gptstack.train.dpo import DPOConfig, prepare_dpo
    from gptstack.train.loop import train

    pairs = [PreferencePair([{"role": "user", "content": f"What is {i} + 1?"}], f"Answer: {i + 1}", f"Answer: {i}")
             for i in range(12)]
    save_preferences(pairs, tmp_path / "p.jsonl")
    for loss in ("sigmoid", "ipo"):
        cfg = DPOConfig(out=str(tmp_path / loss), prefs=str(tmp_path / "p.jsonl"), loss=loss, steps=1, batch_size=4,
                        lr=1e-3, device="cpu", progress=False, eval_every=1)
        stage, cfg, policy, ref = prepare_dpo(run, cfg)
        before, ref_before = snapshot(policy), snapshot(ref)
        result = train(stage, cfg)
        assert all(not torch.equal(p, before[n]) for n, p in policy.named_parameters())
        assert all(torch.equal(p, ref_before[n]) for n, p in ref.named_parameters())
        for k in ("reward_chosen", "reward_rejected", "accuracy", "val_accuracy"):
            assert k in result.last


def test_lora_reference_is_the_base_with_adapters_disabled(run, tmp_path):
    pytest.importorskip("peft")
    from gptstack.model.heads import response_logprobs
    from gptstack.runs import load_model
    from gptstack.train.loop import train
    from gptstack.train.rl import prepare_rl, reference_logprobs

    setup = prepare_rl(run, rl_cfg(tmp_path / "lora", algo="grpo", lora=True, lora_rank=4, lr=1e-2), reward_fn=text_reward)
    assert setup.ref is None
    base_before = {n: p.detach().clone() for n, p in setup.policy.named_parameters() if not p.requires_grad}
    train(setup.stage, setup.cfg)
    assert all(torch.equal(p, base_before[n]) for n, p in setup.policy.named_parameters() if not p.requires_grad)
    original, tok, _ = load_model(run)
    ids = torch.tensor([tok.render_prompt([{"role": "user", "content": "What is 1 + 2?"}]) + [5, 6, 7]])
    mask = torch.zeros_like(ids, dtype=torch.float)
    mask[:, -3:] = 1
    with torch.no_grad():
        want = response_logprobs(original, ids, mask)["logp"]
        got = reference_logprobs(None, setup.policy, ids, mask)
        moved = response_logprobs(setup.policy, ids, mask)["logp"]
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(moved, want, atol=1e-5)
    loaded, _, cfg = load_model(tmp_path / "lora")          # adapter/ on the parent's weights
    assert cfg["adapter"]["rank"] == 4


def test_ppo_resume_reproduces_the_uninterrupted_run(run, tmp_path, monkeypatch):
    from gptstack.train import loop
    from gptstack.train.rl import prepare_rl, train_rl

    kw = dict(algo="ppo", steps=3, update_epochs=1, minibatches=2, kl_coef=0.1, kl_target=0.01, kl_horizon=10, log_every=1)
    train_rl(run, rl_cfg(tmp_path / "full", **kw), reward_fn=text_reward)

    real_write = loop.MetricsLog.write

    def interrupt_after_first(self, record):
        real_write(self, record)
        if record["step"] == 1 and "loss" in record:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.MetricsLog, "write", interrupt_after_first)
    with pytest.raises(KeyboardInterrupt):
        train_rl(run, rl_cfg(tmp_path / "resumed", **kw), reward_fn=text_reward)
    monkeypatch.setattr(loop.MetricsLog, "write", real_write)
    state = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())
    assert state["step"] == 1 and len(state["data"]["pending"]) == 1       # half a rollout still to train on
    assert state["stage_state"]["kl_coef"] != 0.1                          # the adaptive coefficient moved
    setup = prepare_rl(run, rl_cfg(tmp_path / "resumed", resume=True, **kw), reward_fn=text_reward)
    loop.train(setup.stage, setup.cfg)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    sa = json.loads((tmp_path / "full" / "trainer_state.json").read_text())["stage_state"]
    sb = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["stage_state"]
    assert sa["kl_coef"] == pytest.approx(sb["kl_coef"])


def test_bad_input_is_one_clear_error(run, tmp_path):
    from gptstack.train.rewards import parse_reward_spec
    from gptstack.train.rl import RLConfig, train_rl

    with pytest.raises(ConfigError, match="at least 2"):
        RLConfig(algo="grpo", samples=1).validate()
    with pytest.raises(ConfigError, match="unknown reward 'bogus'"):
        parse_reward_spec("task,bogus=2")
    with pytest.raises(ConfigError, match="not a number"):
        parse_reward_spec("task=abc")
    assert [(t.kind, t.arg, t.weight) for t in parse_reward_spec("task, rm:runs/x=0.5,semantic")] == \
        [("task", "", 1.0), ("rm", "runs/x", 0.5), ("semantic", "", 1.0)]
    with pytest.raises(CheckpointError, match="does not exist"):
        train_rl(run, rl_cfg(tmp_path / "x", reward=f"task,rm:{tmp_path / 'no_such_rm'}"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": 3}\n')
    from gptstack.train.dpo import DPOConfig, train_dpo
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        train_dpo(run, DPOConfig(out=str(tmp_path / "d"), prefs=str(bad), steps=1, device="cpu"))


def test_cli_errors_exit_2(run, tmp_path, capsys):
    from gptstack.cli import main

    assert main(["rl", str(run), "--algo", "grpo", "--samples", "1", "--out", str(tmp_path / "a")]) == 2
    assert main(["rl", str(run), "--reward", "magic", "--out", str(tmp_path / "b")]) == 2
    assert main(["reward", str(run), "--prefs", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "c")]) == 2
    assert main(["rl", str(run), "--reward", f"rm:{tmp_path}/nope", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("gptstack ") and "error:" in line for line in err)


@pytest.mark.slow
def test_semantic_and_task_rewards_end_to_end(run, tmp_path):
    """The packaged MiniLM loads offline and scores replies against the reference (~20 s: model import)."""
    pytest.importorskip("sentence_transformers")
    from gptstack.train.rl import train_rl

    result = train_rl(run, rl_cfg(tmp_path / "sem", reward="task=0.5,semantic", kl_coef=0.0))
    assert result.steps == 1 and "reward_semantic" in result.last and -1 <= result.last["reward_semantic"] <= 1


def test_task_examples_follow_weights_and_per_task_counts():
    """Training prompt pools follow the spec's mixture weights; held-out sets take n of every task, also
    for 'all' (where the spec names no task)."""
    from collections import Counter

    from gptstack.data.tasks import list_tasks
    from gptstack.train.rl import task_examples

    pool = Counter(e.task for e in task_examples("spelling:3,greetings", "train", 80, seed=0))
    assert pool == {"spelling": 60, "greetings": 20}
    held = Counter(e.task for e in task_examples("all", "test", 5, seed=0, per_task=True))
    assert held == {t: 5 for t in list_tasks()}
