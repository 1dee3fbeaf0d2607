"""LoRA and QLoRA through PEFT, on our plain nn.Module GPT.

    model = apply_lora(gpt, rank=16, alpha=32, targets=DEFAULT_TARGETS)   # a peft.PeftModel; base frozen
    save_adapter(model, run / "adapter")       # PEFT format: adapter_config.json + adapter_model.safetensors
    model = load_adapter(gpt, run / "adapter") # what runs.load_model calls for adapter-only runs
    merged = merge_adapter(model)              # a plain GPT with the LoRA update folded into its weights
    merge_run("runs/sft_lora", "runs/sft_merged")

`peft.get_peft_model` wraps any nn.Module once it is given explicit `target_modules`; our parameter names
follow Llama's, so the usual names (q_proj ... down_proj) work. lm_head is only adapted when listed.

QLoRA (`quantize_4bit`) swaps the Linear layers inside the Transformer blocks for bitsandbytes `Linear4bit`
(nf4) before LoRA is applied; embeddings, norms and lm_head stay in full precision, as in the QLoRA paper.
The adapter is trained against the *quantized* weights, so loading a QLoRA run re-quantizes the base the same
way (deterministic), and merging folds the adapter into the dequantized weights: the merged model then gives
the same logits as the unmerged one.

peft pulls in transformers (~10 s to import), so it is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from ..config import DEFAULT_LORA_TARGETS
from ..errors import CheckpointError, ConfigError, DependencyError
from .gpt import hf_name, our_name

DEFAULT_TARGETS = tuple(DEFAULT_LORA_TARGETS.split(","))   # every projection of every block (config.LoraOptions)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _peft():
    try:
        # bitsandbytes (imported by peft) logs a warning about an optional CPU kernel package on every import
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import peft
    except ImportError:
        raise DependencyError("LoRA needs the peft library: pip install peft") from None
    return peft


def _bnb():
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library raising at import
        raise DependencyError("QLoRA needs bitsandbytes with 4-bit support on this device (pip install "
                              f"'bitsandbytes>=0.48'; {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "or train with --lora and no --qlora") from None
    return bnb


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    names = [t for t in targets if t]
    if not names:
        raise ConfigError("--lora-targets is empty: name the modules to adapt, e.g. q_proj,v_proj")
    return list(dict.fromkeys(names))


def check_targets(model: nn.Module, targets: Iterable[str]) -> None:
    """Every target must name (the last part of) at least one Linear or Embedding module, as PEFT matches them."""
    adaptable = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            adaptable[name] = module
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in adaptable})
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in adaptable):
            raise ConfigError(f"LoRA target '{t}' matches no Linear/Embedding module in the model; "
                              f"adaptable names are: {', '.join(suffixes)}")


def apply_lora(model: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               targets: str | Sequence[str] = DEFAULT_TARGETS, trainable_tokens: dict | None = None):
    """Wrap `model` in a peft.PeftModel with fresh LoRA factors (B = 0, so it starts as the base model).
    Only the LoRA factors are trainable (and `trainable_tokens` rows, {"embed_tokens": [ids]}, if given)."""
    if rank < 1:
        raise ConfigError(f"--lora-rank must be at least 1, got {rank}")
    if alpha <= 0:
        raise ConfigError(f"--lora-alpha must be positive, got {alpha}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"--lora-dropout must be in [0, 1), got {dropout}")
    names = parse_targets(targets)
    check_targets(model, names)
    peft = _peft()
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none",
                          trainable_token_indices=trainable_tokens or None)
    return peft.get_peft_model(model, cfg)


# ---- QLoRA -------------------------------------------------------------------------------------------------
def quantize_4bit(model: nn.Module, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                  blocksize: int = 64) -> nn.Module:
    """Replace every nn.Linear inside the Transformer blocks with a frozen bitsandbytes Linear4bit, in place.
    Raises DependencyError when bitsandbytes cannot quantize or run a 4-bit layer on this device."""
    bnb = _bnb()
    device = next(model.parameters()).device
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if not (isinstance(child, nn.Linear) and full.startswith("layers.")):
                continue
            try:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type=quant_type, device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.detach().to("cpu", torch.float32).contiguous(),
                                             requires_grad=False, quant_type=quant_type, blocksize=blocksize)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                q = q.to(device)  # quantization happens on the move (bitsandbytes' convention)
                # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for a bf16 kernel the first time
                # an eval-mode layer runs without grad: inference would then compute in bf16, unlike training.
                # Keep one numeric path (dequantize to fp32, matmul) so eval sees what the adapter learned on.
                q.support_avx512bf16_for_cpu = False
                if replaced == 0:  # one smoke forward: a backend without 4-bit kernels fails here, clearly
                    q(torch.zeros(1, child.in_features, device=device, dtype=compute_dtype))
            except DependencyError:
                raise
            except Exception as e:
                raise DependencyError(f"bitsandbytes cannot run 4-bit ({quant_type}) layers on {device.type} here "
                                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); QLoRA "
                                      "needs bitsandbytes >= 0.48 (CPU or CUDA backend). Use --lora without "
                                      "--qlora instead") from None
            setattr(parent, name, q)
            replaced += 1
    if not replaced:
        raise ConfigError("QLoRA found no Linear layers inside the Transformer blocks to quantize")
    model.is_loaded_in_4bit = True  # PEFT then wraps the 4-bit layers with its bitsandbytes-aware LoRA layers
    return model


@torch.no_grad()
def dequantize_4bit_(model: nn.Module) -> nn.Module:
    """Replace each Linear4bit with a plain nn.Linear holding its dequantized weight, in place."""
    bnb = _bnb()
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                if getattr(child.weight.quant_state, "packing_format_for_cpu", False):
                    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

                    child.weight.data, child.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                        child.weight.data, child.weight.quant_state)
                w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                lin = nn.Linear(w.shape[1], w.shape[0], bias=child.bias is not None, device=w.device)
                lin.weight.copy_(w)
                if child.bias is not None:
                    lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
    if hasattr(model, "is_loaded_in_4bit"):
        del model.is_loaded_in_4bit
    return model


# ---- save / load / merge -----------------------------------------------------------------------------------
def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's on-disk names (adapter name stripped)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)


_PEFT_PREFIX = "base_model.model."


def _to_hf_keys(state: dict) -> dict:
    """Adapter files use the names PEFT gives the same adapter on the Hugging Face model
    (`base_model.model.model.layers.0...`), so `PeftModel.from_pretrained` loads them onto the HF base (an
    imported model, or our run exported with `gptstack export --format hf`)."""
    return {(_PEFT_PREFIX + hf_name(k[len(_PEFT_PREFIX):]) if k.startswith(_PEFT_PREFIX) else k): v
            for k, v in state.items()}


def _from_hf_keys(state: dict) -> dict:
    """Back to our module names; adapters saved before the HF naming (no inner `model.`) pass unchanged."""
    return {(_PEFT_PREFIX + our_name(k[len(_PEFT_PREFIX):]) if k.startswith(_PEFT_PREFIX) else k): v
            for k, v in state.items()}


def save_adapter(peft_model, directory: str | Path, checkpoint_id: str = "") -> None:
    """Write `directory/adapter_config.json` and `adapter_model.safetensors` in PEFT's format, each file
    atomically (PEFT's own save_pretrained writes in place). Training stages call it on the staging
    directory of a checkpoint commit (io.commit_checkpoint), so the whole adapter/ is swapped
    in with the rest of the checkpoint. The checkpoint id goes into the safetensors metadata so a resume can
    tell an adapter from a different save."""
    from ..io import atomic_write_bytes, save_weights

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = peft_model.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["inference_mode"] = True
    config.setdefault("base_model_name_or_path", None)
    atomic_write_bytes(directory / ADAPTER_CONFIG, json.dumps(config, indent=2, default=str).encode())
    meta = {"format": "pt"}
    if checkpoint_id:
        meta["checkpoint_id"] = checkpoint_id
    save_weights(directory / ADAPTER_WEIGHTS, _to_hf_keys(adapter_state(peft_model)), meta)


def read_adapter(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from ..io import load_weights

    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).exists():
        raise CheckpointError(f"'{directory}' is not a PEFT adapter directory: it has no {ADAPTER_CONFIG}")
    state, meta = load_weights(directory / ADAPTER_WEIGHTS)
    return _from_hf_keys(state), meta


def set_adapter_state(peft_model, state: dict[str, torch.Tensor], where: str = "") -> None:
    """Load adapter tensors (PEFT names) into a PeftModel, refusing partial or mismatched ones."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "trainable_tokens" in k]
    expected = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    missing = [k for k in getattr(result, "missing_keys", []) if k in expected]
    if unexpected or missing:
        raise CheckpointError(f"adapter {where} does not fit this model: "
                              f"{len(missing)} missing and {len(unexpected)} unexpected LoRA tensors "
                              f"(e.g. {(missing + unexpected)[0]})")


def is_qlora_run(config: dict) -> bool:
    return bool((config.get("adapter") or {}).get("qlora"))


def load_adapter(model: nn.Module, directory: str | Path, trainable: bool = False, run_config: dict | None = None):
    """Apply the PEFT adapter in `directory` to `model` (a plain GPT holding the parent run's weights) and
    return the PeftModel. A QLoRA adapter (its run's config.json, `run_config`, says so) gets the 4-bit base
    it was trained against."""
    from ..io import check_same_save

    directory = Path(directory)
    state, meta = read_adapter(directory)
    config = run_config or {}
    check_same_save(directory.parent, meta, "an adapter")
    if is_qlora_run(config):
        quantize_4bit(model, **_quant_kwargs(config))
    peft = _peft()
    try:
        lora_cfg = peft.LoraConfig.from_pretrained(str(directory))
    except Exception as e:
        raise CheckpointError(f"'{directory / ADAPTER_CONFIG}' is not a valid LoRA config ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    lora_cfg.inference_mode = not trainable
    check_targets(model, lora_cfg.target_modules if not isinstance(lora_cfg.target_modules, str)
                  else [lora_cfg.target_modules])
    peft_model = peft.get_peft_model(model, lora_cfg)
    set_adapter_state(peft_model, state, f"'{directory}'")
    if not trainable:
        peft_model.eval()
    return peft_model


def _quant_kwargs(config: dict) -> dict:
    a = config.get("adapter") or {}
    return {"quant_type": a.get("quant_type", "nf4")}


@torch.no_grad()
def merge_adapter(peft_model) -> nn.Module:
    """Fold the LoRA update into the base weights and return the plain model (4-bit bases are dequantized
    first, so the result is an ordinary full-precision GPT that computes what the adapted model computed)."""
    base = peft_model.get_base_model()
    if getattr(base, "is_loaded_in_4bit", False):
        # PEFT's own 4-bit merge re-quantizes the sum (lossy); instead fold into the dequantized weights.
        state = {k: v.detach().clone() for k, v in adapter_state(peft_model).items()}
        lora_cfg = peft_model.peft_config["default"]
        base = peft_model.unload()          # the 4-bit base, adapter layers removed
        dequantize_4bit_(base)
        peft_model = _peft().get_peft_model(base, lora_cfg)
        set_adapter_state(peft_model, state)
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


# ---- memory accounting -------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def model_memory(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()) -> dict[str, int]:
    """Bytes held by weights (4-bit ones as stored, with their quantization statistics), gradients (one per
    trainable parameter) and optimizer state."""
    weights = 0
    for p in model.parameters():
        weights += tensor_bytes(p.data)
        weights += _quant_state_bytes(getattr(p, "quant_state", None))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    grads = sum(tensor_bytes(p.data) for p in model.parameters() if p.requires_grad)
    opt = 0
    for o in optimizers:
        for state in o.state.values():
            opt += sum(tensor_bytes(v) for v in state.values() if torch.is_tensor(v) and v.numel() > 1)
    return {"weights": weights, "grads": grads, "optimizer": opt, "total": weights + grads + opt,
            "trainable_params": trainable}


def _quant_state_bytes(qs) -> int:
    if qs is None:
        return 0
    n = tensor_bytes(qs.absmax) + (tensor_bytes(qs.code) if getattr(qs, "code", None) is not None else 0)
    if getattr(qs, "nested", False) and getattr(qs, "state2", None) is not None:  # double quantization
        n += _quant_state_bytes(qs.state2) + (tensor_bytes(qs.offset) if torch.is_tensor(qs.offset) else 4)
    return n
