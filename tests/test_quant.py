"""Quantized inference: int8 weight-only is numerically close and 4x smaller; bitsandbytes modes run on CPU."""

import pytest
import torch

from _infer_util import save_run, tiny_model
from gptstack.errors import ConfigError
from gptstack.infer.engine import Engine
from gptstack.infer.sampling import SamplingParams
from gptstack.model.quant import Int8Linear, model_bytes, quantize
from gptstack.runs import load_model


def test_int8_linear_error_bound():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    q = Int8Linear.from_linear(lin)
    w = lin.weight.detach()
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() <= 127
    # per-channel absmax: each weight is off by at most half a step of its row's scale
    assert ((q.dequantized() - w).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(5, 64)
    assert torch.allclose(q(x), x @ q.dequantized().t(), atol=1e-5)


def test_int8_model_close_to_fp32_and_smaller(tiny_tokenizer):
    m = tiny_model(tiny_tokenizer)
    x = torch.randint(0, tiny_tokenizer.vocab_size, (2, 20))
    with torch.no_grad():
        ref = torch.log_softmax(m(x), -1)
    before = model_bytes(m)
    quantize(m, "int8")
    assert sum(isinstance(mod, Int8Linear) for mod in m.modules()) == 2 * 7 + 1
    with torch.no_grad():
        got = torch.log_softmax(m(x), -1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean()
    assert kl < 0.02, kl
    linear_fp32 = sum(p.numel() * 4 for n, p in tiny_model(tiny_tokenizer).named_parameters() if p.dim() == 2
                      and "embed" not in n)
    assert before - model_bytes(m) >= 0.7 * linear_fp32
    out = Engine(m, tiny_tokenizer).generate([[tiny_tokenizer.bos_id, 5, 6]], SamplingParams(max_tokens=5,
                                                                                         temperature=0))
    assert len(out[0][0].tokens) <= 5


@pytest.mark.parametrize("mode", ["nf4", "bnb8"])
def test_bitsandbytes_modes_run(tiny_tokenizer, mode):
    pytest.importorskip("bitsandbytes")
    m = tiny_model(tiny_tokenizer)
    x = torch.randint(0, tiny_tokenizer.vocab_size, (1, 12))
    with torch.no_grad():
        ref = torch.log_softmax(m(x), -1)
    quantize(m, mode)
    with torch.no_grad():
        got = torch.log_softmax(m(x).float(), -1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean()
    assert torch.isfinite(got).all() and kl < (0.5 if mode == "nf4" else 0.05), kl
    out = Engine(m, tiny_tokenizer).generate([[tiny_tokenizer.bos_id, 5]], SamplingParams(max_tokens=3))
    assert out[0][0].finish_reason in ("stop", "length")


def test_load_quantized_and_bad_mode(tmp_path, tiny_tokenizer):
    run = save_run(tmp_path / "r", tiny_model(tiny_tokenizer), tiny_tokenizer)
    m, tok, _ = load_model(run, "cpu", quantize="int8")
    assert any(isinstance(mod, Int8Linear) for mod in m.modules())
    with pytest.raises(ConfigError):
        load_model(run, "cpu", quantize="int3")
