"""Distillation: offline (teacher samples become SFT data) and on-policy (reverse KL on the student's samples)
each train the student through the shared loop; the teacher never changes; the teacher reward runs."""

import pytest
import torch

from test_rl import make_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    return make_run(tmp, "student", seed=2), make_run(tmp, "teacher", seed=3)


def test_offline_and_onpolicy(runs, tmp_path):
    from gptstack.runs import load_model
    from gptstack.train.distill import DistillConfig, distill

    student, teacher = runs
    t_before = {k: v.clone() for k, v in load_model(teacher)[0].state_dict().items()}
    s_before = load_model(student)[0].state_dict()
    for mode in ("offline", "onpolicy"):
        cfg = DistillConfig(out=str(tmp_path / mode), teacher=str(teacher), mode=mode, steps=2, train_examples=8,
                            n_prompts=2, samples=2, max_new_tokens=8, batch_size=4, seq_len=64, lr=1e-3,
                            device="cpu", progress=False, log_every=1)
        result = distill(student, cfg)
        assert result.steps == 2
        after, _, config = load_model(tmp_path / mode)
        assert config["stage"] == f"distill-{mode}" and config["teacher_run"] == str(teacher)
        assert any(not torch.equal(v, s_before[k]) for k, v in after.state_dict().items())
        if mode == "onpolicy":
            assert result.last["reverse_kl"] >= 0
    t_after = load_model(teacher)[0].state_dict()
    assert all(torch.equal(t_after[k], v) for k, v in t_before.items())


def test_onpolicy_kl_to_itself_is_zero(runs):
    from gptstack.runs import load_model
    from gptstack.train.distill import onpolicy_loss

    student, _ = runs
    model, tok, _ = load_model(student)
    ids = torch.tensor([tok.render_prompt([{"role": "user", "content": "hi"}]) + [10, 11, 12]])
    mask = torch.zeros_like(ids, dtype=torch.float)
    mask[:, -3:] = 1
    loss, m = onpolicy_loss(model, {"input_ids": ids, "resp_mask": mask, "task_accuracy": 0.0, "sample_seconds": 0.0},
                            model)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_reward_is_mean_logprob(runs):
    from gptstack.data.tasks import generate_mixture
    from gptstack.infer.engine import Completion
    from gptstack.model.heads import response_logprobs
    from gptstack.runs import load_model
    from gptstack.train.rewards import build_reward

    student, teacher = runs
    t_model, tok, _ = load_model(teacher)
    reward = build_reward(f"teacher:{teacher}=2", tok, "cpu")
    ex = generate_mixture("spelling", "train", 1, 0)[0]
    prompt = tok.render_prompt(ex.prompt_messages())
    c = Completion(0, 0, tokens=tok.encode("Answer: 3"), text="Answer: 3", finish_reason="stop")
    got = reward([ex], [prompt], [c])[0]
    ids = torch.tensor([prompt + c.tokens + [tok.assistant_end_id]])
    mask = torch.zeros_like(ids, dtype=torch.float)
    mask[:, len(prompt):] = 1
    with torch.no_grad():
        want = 2 * float(response_logprobs(t_model, ids, mask)["logp"].sum() / mask.sum())
    assert got == pytest.approx(want, rel=1e-4)
    assert "reward_teacher:teacher" in reward.last


def test_compare_command_runs_both_modes(runs, tmp_path):
    """`gptstack distill --mode compare` trains offline and on-policy from the same student and writes a table
    with the student, the teacher and both results scored on the same held-out prompts."""
    import json
    import subprocess
    import sys

    student, teacher = runs
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "gptstack.cli", "distill", student, "--teacher", teacher,
                        "--mode", "compare", "--out", str(out), "--steps", "1", "--minutes", "0",
                        "--train-examples", "4", "--eval-examples", "2", "--n-prompts", "2", "--samples", "2",
                        "--max-new-tokens", "6", "--batch-size", "4", "--seq-len", "64", "--device", "cpu",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "compare.json").read_text())
    assert set(report) == {"student", "teacher", "offline", "onpolicy"}
    assert (out / "offline" / "model.safetensors").exists() and (out / "onpolicy" / "model.safetensors").exists()
    assert "kl_to_ref" in report["onpolicy"] and "offline" in r.stdout and "onpolicy" in r.stdout
