"""Hugging Face config.json <-> GPTConfig, and parameter names.

Our GPT is the Llama layout (SwiGLU MLP, RMSNorm, rotate-half RoPE, GQA) with optional Qwen3 per-head q/k
norm, so Llama, Mistral, Qwen2, Qwen3 and SmolLM2 checkpoints map onto it tensor for tensor:
`model.layers.N.self_attn.q_proj.weight` is our `layers.N.self_attn.q_proj.weight`. What does not map (another
activation, MLP biases, a RoPE scaling we do not implement, pre-quantized weights) is refused by name, before
any weights are read.
"""

from __future__ import annotations

from ..errors import CheckpointError
from ..model.gpt import ROPE_TYPES, GPTConfig

ARCHITECTURES = {   # model_type -> the transformers class it is saved from
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# what transformers assumes when a config.json leaves the key out
_TIED_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False}


def _rope(hf: dict, where: str) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers 5's `rope_parameters` or 4's `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    scaling = params or dict(hf.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"{where}: RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return float(theta), None
    need = ["factor"] + (["original_max_position_embeddings"] if kind == "llama3" else [])
    missing = [k for k in need if k not in scaling]
    if missing:
        raise CheckpointError(f"{where}: RoPE scaling {kind!r} needs {', '.join(missing)}")
    keep = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                    "original_max_position_embeddings") if k in scaling}
    return float(theta), {"rope_type": kind, **keep}


def gpt_config_from_hf(hf: dict, where: str = "config.json") -> tuple[GPTConfig, list[str]]:
    """Our model config for an HF config, and notes on what was adapted (e.g. the context capped to a sliding
    window). Any feature we cannot reproduce exactly is a CheckpointError naming it."""
    mtype = hf.get("model_type")
    if mtype not in ARCHITECTURES:
        arch = (hf.get("architectures") or [None])[0]
        raise CheckpointError(f"{where}: architecture {arch or mtype!r} (model_type {mtype!r}) is not supported; "
                              f"supported: {', '.join(ARCHITECTURES.values())}")
    if hf.get("quantization_config"):
        raise CheckpointError(f"{where}: pre-quantized checkpoints ({hf['quantization_config'].get('quant_method')}) "
                              "are not supported; import the full-precision model (and use --quantize / --qlora)")
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (only silu, the SwiGLU MLP)")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias is not supported")
    try:
        n_embd, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        n_layer, vocab = int(hf["num_hidden_layers"]), int(hf["vocab_size"])
        mlp = int(hf["intermediate_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: missing or invalid {e}") from None
    n_kv = int(hf.get("num_key_value_heads") or n_head)
    head_dim = int(hf.get("head_dim") or n_embd // n_head)
    if n_head % n_kv:
        raise CheckpointError(f"{where}: {n_head} attention heads do not split into {n_kv} key/value groups")
    theta, scaling = _rope(hf, where)
    notes = []
    context = int(hf.get("max_position_embeddings") or 2048)
    window = hf.get("sliding_window")
    windowed = window and (mtype == "mistral" or hf.get("use_sliding_window"))
    if windowed and int(window) < context:
        # we attend to the whole context; inside the window that is exactly what the model computes
        notes.append(f"context capped at the sliding window ({window} of {context} positions)")
        context = int(window)
    if mtype == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    cfg = GPTConfig(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv,
                    mlp_hidden=mlp, seq_len=context, rope_theta=theta, qk_norm=(mtype == "qwen3"),
                    tie_embeddings=bool(hf.get("tie_word_embeddings", _TIED_DEFAULT[mtype])),
                    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                    attn_head_dim=0 if head_dim * n_head == n_embd else head_dim,
                    qkv_bias=qkv_bias, o_bias=o_bias, rope_scaling=scaling)
    return cfg, notes


def hf_config_from_gpt(cfg: GPTConfig, bos_id: int | None, eos_id: int | list[int] | None,
                       pad_id: int | None = None) -> dict:
    """config.json for our model: Qwen3 when it uses q/k norm, Qwen2 for q/k/v-only biases, else Llama."""
    if cfg.qk_norm and cfg.qkv_bias != cfg.o_bias:
        raise CheckpointError("a model with q/k norm and q/k/v-only biases has no transformers architecture")
    mtype = "qwen3" if cfg.qk_norm else ("qwen2" if cfg.qkv_bias and not cfg.o_bias else "llama")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    hf = {
        "architectures": [ARCHITECTURES[mtype]], "model_type": mtype,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        # both spellings: transformers 5 reads rope_parameters, 4.x (and llama.cpp's converter) rope_theta/scaling
        "rope_parameters": rope, "rope_theta": cfg.rope_theta,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "torch_dtype": "float32", "dtype": "float32", "use_cache": True,
    }
    if cfg.rope_scaling:
        hf["rope_scaling"] = dict(cfg.rope_scaling)
    if mtype == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    elif mtype == "qwen3":
        hf.update(attention_bias=cfg.qkv_bias, use_sliding_window=False, sliding_window=None)
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf

