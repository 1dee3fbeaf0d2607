"""Low-precision inference: replace a model's Linear layers by quantized ones, in place.

    quantize(model, "int8")   our own weight-only int8: per-output-channel absmax scales, int8 storage,
                              dequantized on the fly in forward (CPU and GPU; a quarter of fp32's bytes)
    quantize(model, "bnb8")   bitsandbytes LLM.int8() (`Linear8bitLt`)
    quantize(model, "nf4")    bitsandbytes 4-bit NormalFloat (`Linear4bit`, QLoRA's format)

Embeddings stay in full precision (a lookup reads one row, so quantizing them saves memory but no time);
norms are vectors and stay too. The KV cache stays float (the engine decides its dtype).

Weight-only int8: W ≈ q · s with q = round(W / s) in [-127, 127] and s = max|W_row| / 127 per output row,
so y = x Wᵀ = (x qᵀ) · s — the scale multiplies the output, never the activations.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, DependencyError

MODES = ("int8", "bnb8", "nf4")


class Int8Linear(nn.Module):
    """A bias-free Linear with int8 weights and one float scale per output channel."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        if linear.bias is not None:
            raise ConfigError("Int8Linear supports bias-free Linear layers only (gptstack's model has no biases)")
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        m = cls(linear.in_features, linear.out_features, device=w.device)
        m.qweight.copy_(q)
        m.scale.copy_(scale)
        return m

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise DependencyError(f"--quantize bnb8/nf4 needs bitsandbytes ({e}); pip install 'gptstack[quant]', "
                              "or use --quantize int8") from None
    return bnb


def _bnb_linear(linear: nn.Linear, mode: str) -> nn.Module:
    bnb = _bnb()
    device = linear.weight.device
    w = linear.weight.detach().float().cpu()
    try:
        if mode == "nf4":
            m = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, quant_type="nf4",
                                  compute_dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
            m.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
        else:
            m = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False,
                                    threshold=6.0)
            m.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        return m.to(device)  # bitsandbytes quantizes when the weights move to the device
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        raise DependencyError(f"bitsandbytes cannot run {mode} on {device.type} here "
                              f"({str(e).splitlines()[0]}); use --quantize int8") from None


def quantize(model: nn.Module, mode: str, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear (except names in `skip`) by its quantized form, in place; returns the model."""
    if mode not in MODES:
        raise ConfigError(f"unknown --quantize {mode!r}; choose one of {', '.join(MODES)}")
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not any(name.endswith(s) for s in skip)]
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        targets = [(n, m) for n, m in targets if not n.endswith("lm_head")]  # shares the embedding's storage
    for name, mod in targets:
        new = Int8Linear.from_linear(mod) if mode == "int8" else _bnb_linear(mod, mode)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    model.quantized = mode
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (excluding RoPE tables), as stored."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "rope_" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
