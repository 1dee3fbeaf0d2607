"""FSDP2 (`--parallel fsdp`) under torchrun: 2 gloo ranks on CPU train like one process, their sharded (DCP)
checkpoints resume at another world size, a save killed mid-commit is never loaded, and bad settings are
one-line errors.

Tolerance: losses within 1e-4 and weights within 1e-4 of the one-process run. The ranks compute the same
rows; what differs is the order of float32 sums (each rank's backward over 4 rows, then a reduce-scatter,
against one backward over 8), and Muon's Newton-Schulz iteration turns such rounding into ~1e-5 in the
weights after a few steps (measured: losses agree to 1e-6, weights to 1.3e-5). A real fault (a shard
updated twice or not at all, a gradient not averaged, a wrong clip norm) moves the loss by 1e-2 or more.
"""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from gptstack.cli import main
from gptstack.io import STAGING_PREFIX
from gptstack.runs import load_model

TINY = ["--vocab-size", "320", "--depth", "2", "--n-embd", "64", "--seq-len", "32", "--total-batch-tokens", "0",
        "--minutes", "0", "--steps", "6", "--save-every", "3", "--eval-every", "3", "--eval-tokens", "288",
        "--log-every", "1", "--no-progress", "--dtype", "fp32", "--threads", "1"]
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
TOL = 1e-4


def _env(fault: str | None = None) -> dict:
    env = dict(os.environ)   # GPTSTACK_HOME etc. from conftest: the same caches as this process
    env.pop("GPTSTACK_FAULT_KILL", None)
    if fault:
        env["GPTSTACK_FAULT_KILL"] = fault
    return env


def _torchrun(argv: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "gptstack.cli"] + argv,
                          env=_env(fault), capture_output=True, text=True, timeout=300)


def _pretrain(corpus_dir, out, *extra) -> list[str]:
    return ["pretrain", "--corpus", str(corpus_dir), "--out", str(out)] + TINY + list(extra)


def _records(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l]


def _losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in _records(run) if key in r}


def _state(run: Path) -> dict:
    return json.loads((run / "trainer_state.json").read_text())


def _assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), (what, a, b)
    bad = {k: (a[k], b[k]) for k in a if abs(a[k] - b[k]) > TOL}
    assert not bad, (what, bad)


def _assert_same_weights(run: Path, ref: Path) -> None:
    a, b = load_model(run)[0], load_model(ref)[0]
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=TOL), (n, float((p - q).abs().max()))


@pytest.fixture(autouse=True, scope="module")
def _keep_threads():
    """--threads 1 (every run here computes alike) sets torch's threads for this process: restore them."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_dir):
    """One process, 8 rows per step, uninterrupted: what every sharded run here must reproduce."""
    out = tmp_path_factory.mktemp("parallel") / "one"
    assert main(_pretrain(corpus_dir, out, "--batch-size", "8")) == 0
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, corpus_dir):
    """2 FSDP ranks x 4 rows, killed in its final save after every rank wrote its shards into the staging
    directory (before the journal): the checkpoint of step 3 is the committed one. Samples (rank 0 alone) and
    uneven evaluation batches (9 windows over 2 ranks) run on the sharded model on the way."""
    out = tmp_path_factory.mktemp("parallel") / "fsdp"
    r = _torchrun(_pretrain(corpus_dir, out, "--batch-size", "4", "--parallel", "fsdp", "--sample-every", "3"),
                  fault="staged@2")
    assert r.returncode != 0 and "SIGKILL" in r.stderr, r.stderr[-3000:]
    assert "--- sample at step 3 ---" in r.stdout, r.stdout[-2000:]
    return out


def test_fsdp_two_ranks_match_one_process(fsdp_run, reference):
    """Losses, the global (all-shard) gradient norm that clipping uses, and the evaluation, step by step."""
    for key in ("loss", "grad_norm", "val_bpb"):
        _assert_close(_losses(fsdp_run, key), _losses(reference, key), key)
    assert len(_losses(fsdp_run)) == 6 and len(_losses(fsdp_run, "val_bpb")) == 2
    assert min(_losses(reference, "grad_norm").values()) > 0


def test_a_save_killed_mid_commit_is_never_loaded_and_two_ranks_resume_in_one_process(fsdp_run, reference,
                                                                                     corpus_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(fsdp_run, out)
    staging = [n for n in os.listdir(out) if n.startswith(STAGING_PREFIX)]
    assert len(staging) == 1
    shards = sorted(p.name for p in (out / staging[0] / "dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards   # both ranks wrote theirs
    state = _state(out)
    assert state["step"] == 3 and state["checkpoint_format"] == "dcp" and state["world"] == 2
    assert not (out / "optimizer.pt").exists()
    load_model(out)   # what any other command reads: the committed checkpoint, whole, in the usual files
    # one process: the half-written save is cleared, and DCP reshards the step-3 state of 2 ranks onto 1
    assert main(_pretrain(corpus_dir, out, "--batch-size", "8", "--resume")) == 0
    assert not [n for n in os.listdir(out) if n.startswith(STAGING_PREFIX)]
    state = _state(out)
    assert state["finished"] and state["step"] == 6 and state["checkpoint_format"] == "torch"
    assert not (out / "dcp").exists()   # the sharded state of the earlier save is not left to mislead a resume
    _assert_close(_losses(out), _losses(reference), "loss")
    _assert_same_weights(out, reference)


def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(reference, corpus_dir, tmp_path):
    """1 -> 2: an unsharded checkpoint (model.safetensors + optimizer.pt) is sharded on load; the resumed run
    also takes 2 rows x 2 accumulation micro-steps per rank (one reduce-scatter per step) and recomputes its
    blocks (activation checkpointing): neither changes what is computed."""
    out = tmp_path / "run"
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "gptstack.cli"] + _pretrain(corpus_dir, out, "--batch-size", "8"),
                              env=_env("done@1"), stdout=log, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-2000:]
    assert _state(out)["step"] == 3 and (out / "optimizer.pt").exists()
    r = _torchrun(_pretrain(corpus_dir, out, "--batch-size", "2", "--total-batch-tokens", "256", "--parallel", "fsdp",
                            "--activation-checkpointing", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    state = _state(out)
    assert state["finished"] and state["step"] == 6 and state["checkpoint_format"] == "dcp"
    assert not (out / "optimizer.pt").exists()
    _assert_close(_losses(out), _losses(reference), "loss")
    _assert_close(_losses(out, "grad_norm"), _losses(reference, "grad_norm"), "grad_norm")
    _assert_same_weights(out, reference)


def _equal_length_conversations(tokenizer, path: Path) -> int:
    """Conversations that all encode to the same length with the same number of trained tokens: then a rank's
    mean loss over its rows, averaged over ranks, is the mean over all rows, and 2 x 4 rows can equal 1 x 8."""
    from gptstack.data.chat import encode_conversations

    from conftest import WORDS

    convs = [[{"role": "user", "content": f"{a} {b}"}, {"role": "assistant", "content": f"{b} {a}"}]
             for a, b in itertools.permutations(WORDS, 2)]
    encoded, _ = encode_conversations(tokenizer, convs, 33)
    shape = Counter((len(ids), sum(mask)) for ids, mask in encoded).most_common(1)[0][0]
    keep = [c for c, (ids, mask) in zip(convs, encoded) if (len(ids), sum(mask)) == shape]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in keep))
    return len(keep)


def test_lora_sft_fsdp_two_ranks_match_one_process(reference, tmp_path):
    """LoRA on a frozen, sharded base: the factors (inside the blocks) and the chat-token rows (at the root)
    are sharded too; the adapter written from rank 0 equals the one-process adapter."""
    from gptstack.model.adapters import read_adapter
    from gptstack.runs import load_tokenizer

    data = tmp_path / "chats.jsonl"
    assert _equal_length_conversations(load_tokenizer(reference), data) >= 100
    flags = ["--data", str(data), "--lora", "--no-pack", "--steps", "4", "--minutes", "0", "--seq-len", "32",
             "--val-conversations", "16", "--eval-every", "2", "--log-every", "1", "--no-progress", "--dtype", "fp32",
             "--threads", "1"]
    r = _torchrun(["sft", str(reference), "--out", str(tmp_path / "fsdp"), "--batch-size", "4", "--parallel", "fsdp"]
                  + flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["sft", str(reference), "--out", str(tmp_path / "one"), "--batch-size", "8"] + flags) == 0
    for key in ("loss", "grad_norm", "val_loss"):
        _assert_close(_losses(tmp_path / "fsdp", key), _losses(tmp_path / "one", key), key)
    assert len(_losses(tmp_path / "fsdp")) == 4
    a, _ = read_adapter(tmp_path / "fsdp" / "adapter")
    b, _ = read_adapter(tmp_path / "one" / "adapter")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=TOL), k
    assert not (tmp_path / "fsdp" / "model.safetensors").exists()   # an adapter run, as without FSDP


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_bad_parallel_settings_are_one_line_errors(reference, fsdp_run, corpus_dir, tmp_path, capsys):
    capsys.readouterr()
    # FSDP in one process
    out = tmp_path / "single"
    assert main(_pretrain(corpus_dir, out, "--batch-size", "8", "--parallel", "fsdp")) == 2
    assert "run it under torchrun --nproc_per_node N" in _one_line_error(capsys)
    assert not out.exists()
    # a DCP checkpoint resumed with another model: refused before anything loads, nothing overwritten
    run = tmp_path / "run"
    shutil.copytree(fsdp_run, run)
    assert main(_pretrain(corpus_dir, run, "--batch-size", "8", "--resume", "--depth", "3")) == 2
    err = _one_line_error(capsys)
    assert "different model" in err and "n_layer 2 -> 3" in err, err
    assert _state(run)["step"] == 3 and (run / "dcp" / ".metadata").exists()
    # every stage's config takes fsdp now; under it, RL needs whole prompts per rank (checked before anything loads)
    os.environ["WORLD_SIZE"] = "2"
    try:
        assert main(["rl", str(reference), "--out", str(tmp_path / "rl"), "--parallel", "fsdp", "--steps", "1",
                     "--n-prompts", "3", "--no-progress", "--threads", "1"]) == 2
    finally:
        del os.environ["WORLD_SIZE"]
    assert "--n-prompts 3 is not a multiple of the 2 ranks" in _one_line_error(capsys)
    assert not (tmp_path / "rl").exists()


def test_a_world_size_that_does_not_divide_the_batch_is_a_one_line_error_on_each_rank(corpus_dir, tmp_path):
    """Checked in TrainConfig.validate, before any process group exists: each rank prints the line and exits 2
    at once (one may be stopped by torchrun before it prints, when the other exits first). What follows is
    torchrun's own: its ChildFailedError traceback, the failure summary with exit code 2, and its exit status 1."""
    import re

    r = _torchrun(_pretrain(corpus_dir, tmp_path / "run", "--batch-size", "4", "--parallel", "fsdp",
                            "--total-batch-tokens", "384"))
    assert r.returncode != 0
    errors = [l for l in r.stderr.splitlines() if "gptstack pretrain: error:" in l]
    assert 1 <= len(errors) <= 2 and all("2 ranks do not divide the batch" in l for l in errors), r.stderr[-3000:]
    ours = [l for l in r.stderr.splitlines() if l.strip() and not re.match(r"[WEI]\d{4} ", l)]
    assert ours[0] == errors[0], r.stderr[-3000:]   # the first line that is not torchrun's log: the error
    assert "exitcode  : 2" in r.stderr   # torchrun's summary: the ranks exited 2, as the CLI does alone
    ours = [l for l in r.stderr.splitlines() if l.strip().startswith("File ") and "gptstack" in l]
    assert not ours, ours   # no traceback from gptstack (torchrun prints its own)
    assert not (tmp_path / "run").exists()


def test_activation_checkpointing_recomputes_blocks_and_changes_nothing(tiny_config):
    """One process: the same loss and gradients, and each block's forward runs again in the backward."""
    from gptstack.model.gpt import GPT
    from gptstack.train.parallel import checkpoint_blocks

    torch.manual_seed(0)
    x = torch.randint(0, tiny_config.vocab_size, (2, 16))
    grads, calls = [], []
    for ac in (False, True):
        model = GPT(tiny_config)
        model.init_weights(0)
        if ac:
            checkpoint_blocks(model)
        model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(ac))
        loss = model(x, x)
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters()]))
    assert calls.count(False) == 1 and calls.count(True) == 2   # recomputed once in the backward
    assert grads[0][0] == grads[1][0]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))
    with torch.no_grad():   # inference runs the plain forward
        model(x)
    assert calls.count(True) == 3


# ---- the stages after SFT: reward model, DPO, GRPO, PPO, on-policy distillation ------------------------------

POLICY_STAGES = ("reward", "dpo_lora", "grpo", "ppo", "distill")


def _even_tokens(examples, prompt_ids, completions) -> list[float]:
    """A toy reward with variance among a group's samples (the task checkers give a young model 0 everywhere,
    which would make GRPO's advantages, and its loss, zero)."""
    return [sum(t % 2 == 0 for t in c.tokens) / max(1, len(c.tokens)) for c in completions]


def _write_prefs(path: Path) -> None:
    from conftest import WORDS

    rows = [{"prompt": f"say {a}", "chosen": f"{a} {b} {a}", "rejected": f"{b}"}
            for a, b in itertools.islice(itertools.permutations(WORDS[:12], 2), 64)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def policy_stage_runs(base: str, teacher: str, prefs: str, root: str, rows: int) -> None:
    """Every stage after SFT from `base`, `rows` pairs per step per rank for the pair stages (RL and
    distillation split each rollout's prompts among the ranks themselves); under torchrun with fsdp. The
    same function runs in one process (the reference) and in 2 gloo ranks (`python tests/test_parallel.py`)."""
    from gptstack.config import DistillConfig, DPOConfig, RewardConfig, RLConfig
    from gptstack.train.distill import distill
    from gptstack.train.dpo import train_dpo
    from gptstack.train.reward_model import train_reward
    from gptstack.train.rl import train_rl

    torch.set_num_threads(1)
    par = "fsdp" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "ddp"
    common = dict(steps=3, minutes=0.0, log_every=1, progress=False, dtype="fp32", parallel=par, seed=0)
    r = Path(root)
    train_reward(base, RewardConfig(out=str(r / "reward"), prefs=prefs, batch_size=rows, max_len=24, lr=1e-3,
                                    eval_every=3, **common))
    train_dpo(base, DPOConfig(out=str(r / "dpo_lora"), prefs=prefs, batch_size=rows, max_len=24, lora=True,
                              lora_rank=4, lr=1e-3, eval_every=3, **common))
    rl = dict(tasks="spelling", train_examples=16, n_prompts=4, samples=2, max_new_tokens=6, minibatches=1,
              update_epochs=2, eval_every=0, lr=1e-3, **common)
    train_rl(base, RLConfig(out=str(r / "grpo"), algo="grpo", kl_coef=0.1, **rl), reward_fn=_even_tokens)
    train_rl(base, RLConfig(out=str(r / "ppo"), algo="ppo", **rl), reward_fn=_even_tokens)
    distill(base, DistillConfig(out=str(r / "distill"), teacher=teacher, mode="onpolicy", tasks="spelling",
                                train_examples=16, n_prompts=4, samples=2, max_new_tokens=6, lr=1e-3, **common))


@pytest.fixture(scope="module")
def policy_runs(reference, corpus_dir, tmp_path_factory):
    """The stages after SFT, in 2 FSDP ranks (one torchrun launch for all of them) and in one process, from a
    base with room for the task prompts (96 tokens); the teacher shares its tokenizer, not its weights."""
    root = tmp_path_factory.mktemp("policy")
    base, teacher = root / "base", root / "teacher"
    for out, seed in ((base, "0"), (teacher, "1")):
        assert main(_pretrain(corpus_dir, out, "--batch-size", "4", "--seq-len", "96", "--steps", "4", "--seed", seed,
                              "--eval-every", "0", "--tokenizer", str(reference))) == 0
    prefs = root / "prefs.jsonl"
    _write_prefs(prefs)
    args = [str(base), str(teacher), str(prefs)]
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", __file__] + args + [str(root / "fsdp"), "2"],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    policy_stage_runs(*args, str(root / "one"), 4)
    return root


@pytest.mark.parametrize("stage", POLICY_STAGES)
def test_policy_stages_fsdp_two_ranks_match_one_process(policy_runs, stage):
    """2 ranks x 2 pairs = 1 x 4 pairs (reward, DPO with LoRA: its reference is the adapters-disabled sharded
    base), and 2 ranks x 2 of the 4 prompts of each rollout = 1 x 4 (GRPO, PPO with its value head and a sharded
    frozen reference, on-policy distillation against a sharded teacher): losses, the all-shard gradient norm and
    the held-out figures of every step within 1e-4, and the weights or the adapter written from rank 0 too."""
    a, b = policy_runs / "fsdp" / stage, policy_runs / "one" / stage
    keys = ["loss", "grad_norm"] + {"reward": ["val_accuracy", "val_loss"], "dpo_lora": ["val_loss"]}.get(stage, [])
    for key in keys:
        _assert_close(_losses(a, key), _losses(b, key), key)
    assert len(_losses(a)) == 3 and min(abs(v) for v in _losses(b, "grad_norm").values()) > 0
    assert _state(a)["checkpoint_format"] == "dcp" and _state(a)["world"] == 2
    if stage == "dpo_lora":
        from gptstack.model.adapters import read_adapter

        x, y = read_adapter(a / "adapter")[0], read_adapter(b / "adapter")[0]
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=TOL) for k in x)
    else:
        _assert_same_weights(a, b)
    if stage == "ppo":
        from safetensors.torch import load_file

        x, y = load_file(a / "value_head.safetensors"), load_file(b / "value_head.safetensors")
        assert all(torch.allclose(x[k], y[k], atol=TOL) for k in x)


if __name__ == "__main__":   # one rank of policy_runs' torchrun launch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # conftest's WORDS
    policy_stage_runs(*sys.argv[1:5], int(sys.argv[5]))
