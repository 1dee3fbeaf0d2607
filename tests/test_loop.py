import json

import numpy as np
import pytest
import torch

from gptstack.config import TrainConfig
from gptstack.data.loader import TokenBatches
from gptstack.errors import CheckpointError, ConfigError
from gptstack.model.gpt import GPT
from gptstack.runs import load_model
from gptstack.train.loop import Stage, train
from gptstack.train.pretrain import lm_loss


def _stage(tiny_config, tiny_tokenizer, interrupt_at=None):
    from conftest import make_text

    torch.manual_seed(0)
    model = GPT(tiny_config)
    model.init_weights(0)
    tokens = np.asarray(tiny_tokenizer.encode(make_text(400, 11), bos=True), dtype=np.uint16)
    batches = TokenBatches(tokens, 4, tiny_config.seq_len, seed=0)

    def after_step(step, metrics):
        if step == interrupt_at:
            raise KeyboardInterrupt

    return Stage(name="test", model=model, batches=batches, loss_fn=lm_loss, tokenizer=tiny_tokenizer,
                 run_config={"kind": "lm", "stage": "test", "model": tiny_config.to_dict()},
                 after_step=after_step if interrupt_at else None)


def _cfg(out, **kw):
    base = dict(out=str(out), steps=8, batch_size=4, seq_len=64, log_every=1, eval_every=1000, progress=False,
                matrix_lr=0.02, embedding_lr=0.1, warmup_frac=0.1)
    base.update(kw)
    return TrainConfig(**base)


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(l)]


def test_loss_falls_and_every_parameter_changes(tmp_path, tiny_config, tiny_tokenizer):
    stage = _stage(tiny_config, tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in stage.model.named_parameters()}
    result = train(stage, _cfg(tmp_path / "run", steps=30))
    losses = _losses(tmp_path / "run")
    assert losses[-1] < losses[0] - 1.0
    for n, p in stage.model.named_parameters():
        assert not torch.equal(p.detach().cpu(), before[n]), f"{n} did not change"
    assert result.steps == 30


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_config, tiny_tokenizer, optimizer):
    full = tmp_path / "full"
    train(_stage(tiny_config, tiny_tokenizer), _cfg(full, optimizer=optimizer))
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(_stage(tiny_config, tiny_tokenizer, interrupt_at=3), _cfg(part, optimizer=optimizer))
    assert json.loads((part / "trainer_state.json").read_text())["step"] == 3
    train(_stage(tiny_config, tiny_tokenizer), _cfg(part, optimizer=optimizer, resume=True))
    assert np.allclose(_losses(full), _losses(part), atol=1e-6)
    a, _, _ = load_model(full)
    b, _, _ = load_model(part)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_refuses_to_overwrite_and_detects_corruption(tmp_path, tiny_config, tiny_tokenizer):
    run = tmp_path / "run"
    train(_stage(tiny_config, tiny_tokenizer), _cfg(run, steps=2))
    weights = (run / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds"):
        train(_stage(tiny_config, tiny_tokenizer), _cfg(run, steps=2))
    assert (run / "model.safetensors").read_bytes() == weights  # nothing overwritten
    (run / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(run)


def test_mismatched_checkpoint_files_are_detected(tmp_path, tiny_config, tiny_tokenizer):
    a, b = tmp_path / "a", tmp_path / "b"
    train(_stage(tiny_config, tiny_tokenizer), _cfg(a, steps=2))
    train(_stage(tiny_config, tiny_tokenizer), _cfg(b, steps=3))
    (a / "trainer_state.json").write_bytes((b / "trainer_state.json").read_bytes())  # half-finished save
    with pytest.raises(CheckpointError, match="different saves"):
        load_model(a)


def test_not_a_run_dir(tmp_path):
    with pytest.raises(CheckpointError, match="not a run directory"):
        load_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_tokenizer_model_mismatch(tmp_path, tiny_config, tiny_tokenizer):
    from gptstack.tokenizer import Tokenizer
    from conftest import make_text

    run = tmp_path / "run"
    train(_stage(tiny_config, tiny_tokenizer), _cfg(run, steps=1))
    Tokenizer.train([make_text(200, 5)], vocab_size=300).save(run / "tokenizer")
    with pytest.raises(CheckpointError, match="do not belong together"):
        load_model(run)


def test_auto_dtype_trains_in_bf16_only_where_bf16_matmuls_are_fast(monkeypatch):
    """--dtype auto: bf16 autocast for training where the probe finds bf16 matmuls fast, never for generation
    on CPU; GPTSTACK_CPU_BF16 overrides the probe; explicit dtypes are taken as given."""
    from gptstack import devices

    cpu = torch.device("cpu")
    for env, want in (("1", torch.bfloat16), ("0", None)):
        monkeypatch.setenv("GPTSTACK_CPU_BF16", env)
        assert devices.resolve_dtype("auto", cpu, training=True) == want
        assert devices.resolve_dtype("auto", cpu) is None
        assert devices.resolve_dtype("fp32", cpu, training=True) is None
        assert devices.resolve_dtype("bf16", cpu) == torch.bfloat16
        assert devices.matmul_dtype(cpu) == (want or torch.float32)
    with pytest.raises(ConfigError):
        devices.resolve_dtype("fp8", cpu)


def test_bf16_probe_measures_this_cpu(monkeypatch):
    """Without an override the decision is the probe's: a real timing of both dtypes, consistent with it."""
    from gptstack import devices

    monkeypatch.delenv("GPTSTACK_CPU_BF16", raising=False)
    probe = devices.bf16_probe("cpu")
    assert probe["fp32_ms"] > 0 and probe["bf16_ms"] > 0
    assert devices.bf16_is_fast("cpu") == (probe["bf16_over_fp32"] <= devices.FAST_BF16_RATIO)
    want = torch.bfloat16 if devices.bf16_is_fast("cpu") else None
    assert devices.resolve_dtype("auto", torch.device("cpu"), training=True) == want
