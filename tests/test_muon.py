"""Muon: torch's update, orthogonalised in the precision the device is fast in; never bf16 where bf16 is slow."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptstack.config import TrainConfig
from gptstack.model.gpt import model_config_from_depth
from gptstack.model.gpt import GPT
from gptstack.train.muon import Muon, orthogonalise
from gptstack.train.optim import build_optimizers

MATMULS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "addbmm", "dot", "mv"}


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every matrix product that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name in MATMULS:
            self.seen.append((name, args[0].dtype))
        return func(*args, **(kwargs or {}))


def _model_and_grads():
    cfg = model_config_from_depth(2, 256, 32)
    model = GPT(cfg)
    model.init_weights(0)
    x = torch.randint(0, 256, (2, 32))
    model(x, x).backward()
    return model, cfg


@pytest.mark.parametrize("fast", ["0", "1"])
def test_muon_matmul_dtype_follows_the_bf16_probe(monkeypatch, fast):
    """Forced slow-bf16 (GPTSTACK_CPU_BF16=0): the optimizer step multiplies only in fp32; forced fast: the
    Newton-Schulz products run in bf16, as torch's Muon does."""
    monkeypatch.setenv("GPTSTACK_CPU_BF16", fast)
    model, cfg = _model_and_grads()
    optimizers = build_optimizers(model, TrainConfig(optimizer="muon"), cfg.n_embd)
    muon = [o for o in optimizers if isinstance(o, Muon)]
    assert len(muon) == 1
    with MatmulDtypes() as rec:
        for o in optimizers:
            o.step()
    dtypes = {d for _, d in rec.seen}
    assert rec.seen, "Muon's Newton-Schulz iteration did not run"
    if fast == "0":
        assert dtypes == {torch.float32}, rec.seen
    else:
        assert torch.bfloat16 in dtypes


def test_training_step_never_multiplies_in_bf16_when_bf16_is_slow(monkeypatch, tmp_path):
    """The whole loop (autocast choice + optimizer) under the forced slow-bf16 rule: no bf16 matmul anywhere."""
    from gptstack.train.loop import Stage, train
    from gptstack.tokenizer import Tokenizer

    monkeypatch.setenv("GPTSTACK_CPU_BF16", "0")
    cfg = model_config_from_depth(1, 300, 32)
    model = GPT(cfg)
    model.init_weights(0)
    tok = Tokenizer.train(["hello world, a tiny text for a tiny tokenizer " * 20], vocab_size=300)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            x = torch.randint(0, 300, (2, 32), generator=g)
            yield {"input_ids": x, "targets": x}

    stage = Stage(name="t", model=model, batches=batches(), loss_fn=lambda m, b: (m(b["input_ids"], b["targets"]), {}),
                  run_config={"model": cfg.to_dict()}, tokenizer=tok)
    with MatmulDtypes() as rec:
        train(stage, TrainConfig(out=str(tmp_path / "run"), steps=2, batch_size=2, seq_len=32, progress=False,
                                 log_every=1, eval_every=1000))
    assert rec.seen and {d for _, d in rec.seen} == {torch.float32}
    import json
    machine = json.loads((tmp_path / "run" / "config.json").read_text())["machine"]
    assert machine["autocast"] == "fp32" and machine["optimizer_matmul"] == "float32"
    assert machine["bf16_probe"]["fast"] is False and machine["bf16_probe"]["forced_by_env"] == "0"


def test_same_update_as_torch_muon():
    """Our Muon with bf16 Newton-Schulz reproduces torch.optim.Muon to bf16 rounding, over several steps, and
    loads torch's optimizer state."""
    torch.manual_seed(0)
    shapes = [(64, 64), (160, 64), (64, 160), (64, 64)]
    ref = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    a = torch.optim.Muon(ref, lr=0.02, momentum=0.95, weight_decay=0.01)
    b = Muon(ours, lr=0.02, momentum=0.95, weight_decay=0.01, ns_dtype=torch.bfloat16)
    for _ in range(3):
        for p, q in zip(ref, ours):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ref, ours):
        assert (p - q).abs().max() < 2e-3
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.state[ours[0]]["momentum_buffer"], a.state[ref[0]]["momentum_buffer"])


def test_orthogonalise_fp32_flattens_the_spectrum():
    """The quintic iteration maps every singular value into ~[0.6, 1.2] (not exactly 1, by design), tall and
    wide alike, and fp32 and bf16 agree to bf16 precision."""
    torch.manual_seed(0)
    for shape in ((3, 48, 120), (2, 120, 48)):
        g = torch.randn(shape)
        o = orthogonalise(g, dtype=torch.float32)
        assert o.shape == g.shape and o.dtype == torch.float32
        sv = torch.linalg.svdvals(o)
        assert sv.min() > 0.5 and sv.max() < 1.3, sv
        skewed = g * torch.logspace(-1, 1, shape[-1])      # condition number ~100x higher
        sv_in, sv_out = torch.linalg.svdvals(skewed), torch.linalg.svdvals(orthogonalise(skewed, dtype=torch.float32))
        assert (sv_out.max() / sv_out.min()) < (sv_in.max() / sv_in.min()) / 10
        o16 = orthogonalise(g, dtype=torch.bfloat16).float()
        assert (o - o16).norm() / o.norm() < 0.05
