"""A run written out as one GGUF file that llama.cpp (and the tools built on it) loads and runs.

    gptstack export RUN --format gguf --out FILE.gguf [--type f32|f16|q8_0]

What llama.cpp's own converter (convert_hf_to_gguf.py) writes for the same model saved by transformers:

- architecture `qwen3` when the model has per-head q/k norm (ours do by default), else `llama`. llama.cpp's
  `llama` applies RoPE to adjacent pairs (GPT-J style) while we, like HF, rotate halves, so for `llama` the
  q/k rows of each head are permuted exactly as the converter's `LlamaModel.permute` does (weights and
  biases); `qwen3` uses NeoX (rotate-half) RoPE in llama.cpp and takes the weights as they are.
- tensors `token_embd`, `blk.N.attn_{norm,q,k,v,output,q_norm,k_norm}`, `blk.N.ffn_{norm,gate,up,down}`,
  `output_norm`, `output` (left out when the head is tied: llama.cpp reuses the embedding), `rope_freqs`
  for Llama 3 RoPE scaling; 1-D tensors (norms, biases, RoPE factors) are always f32, matrices f32 / f16 /
  q8_0 (`gguf.quants`; a matrix whose rows do not split into q8_0's 32-wide blocks stays f16).
- hyperparameters: context length (the training context), widths, block count, head counts, head width
  (key/value length and RoPE dimensions), RoPE base and linear scaling, RMSNorm epsilon.
- tokenizer: `gpt2` (byte-level BPE) with every token in GPT-2's byte-to-unicode spelling, token types
  (control for special tokens), the merges, the pre-tokenizer whose split llama.cpp implements for the
  model's split regex (ours is GPT-4's with single digits: llama.cpp's `bailingmoe`, whose source regex is
  ours character for character), BOS / EOS / end-of-turn ids and the chat template.

A LoRA run is written with its adapter merged in. The file is written under a temporary name and renamed into
place, so FILE.gguf is the old file or the whole new one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CheckpointError, ConfigError, DependencyError
from ..tokenizer import OUR_CHAT_TEMPLATE, SPLIT_PATTERN

TENSOR_TYPES = ("f32", "f16", "q8_0")

# tokenizer.json split regexes -> the llama.cpp pre-tokenizer (llama-vocab.cpp) that implements that split
PRE_TOKENIZERS = {
    SPLIT_PATTERN: "bailingmoe",   # GPT-4's split with single digits: llama.cpp quotes this regex verbatim
    # Llama 3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    # Qwen2 / Qwen2.5 / Qwen3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}

# our parameter names -> llama.cpp's (N: the block)
_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_name(ours: str) -> str:
    """`layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`."""
    if ours in _TOP_NAMES:
        return _TOP_NAMES[ours]
    parts = ours.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _BLOCK_NAMES:
        return f"blk.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    raise CheckpointError(f"tensor {ours!r} has no GGUF name (not a plain gptstack GPT parameter)")


def permute_rope(w, n_head: int):
    """Rows of each head from rotate-half order (HF, ours) to adjacent pairs (llama.cpp's `llama`):
    convert_hf_to_gguf.py's LlamaModel.permute. Works on weights (rows, in) and biases (rows,)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_rope(w, n_head: int):
    """The inverse of `permute_rope`."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_arch(cfg) -> str:
    """`qwen3` for q/k norm, else `llama`; what llama.cpp cannot run of the model is a ConfigError."""
    if cfg.qk_norm:
        if cfg.o_bias:
            raise ConfigError("llama.cpp's qwen3 architecture (q/k norm) has no attention output bias; this model "
                              "cannot be written as GGUF")
        if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
            raise ConfigError("llama.cpp's qwen3 architecture (q/k norm) has no Llama 3 RoPE scaling; this model "
                              "cannot be written as GGUF")
        return "qwen3"
    return "llama"


# ---- the tokenizer ---------------------------------------------------------------------------------------

def _pre_tokenizer(spec: dict) -> str:
    """The llama.cpp pre-tokenizer name for a tokenizer.json's pre_tokenizer, or a ConfigError naming it."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
        raise ConfigError(f"the tokenizer's split regex {regex!r} matches no llama.cpp pre-tokenizer that gptstack "
                          f"knows ({', '.join(sorted(set(PRE_TOKENIZERS.values())))}); it cannot be written as GGUF")
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    raise ConfigError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not a byte-level "
                      "BPE split that llama.cpp's gpt2 tokenizer reproduces; it cannot be written as GGUF")


def tokenizer_metadata(tokenizer, n_vocab: int) -> dict:
    """What goes into the GGUF's tokenizer.* keys: model, pre, tokens, token_types, merges, bos/eos/eot ids,
    add_bos, chat_template. `n_vocab` rows (the embedding) may exceed the tokenizer's tokens: padding ids."""
    from gguf import TokenType

    spec = tokenizer.to_hf_json()
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise ConfigError("only byte-level BPE tokenizers can be written as GGUF here (this one is "
                          f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''})")
    pre = _pre_tokenizer(spec)
    tokens: list[str | None] = [None] * n_vocab
    types = [int(TokenType.UNUSED)] * n_vocab
    for text, i in model["vocab"].items():
        if i >= n_vocab:
            raise CheckpointError(f"token {text!r} has id {i}, past the model's {n_vocab} embedding rows")
        tokens[i], types[i] = text, int(TokenType.NORMAL)
    for t in spec.get("added_tokens") or []:
        i = int(t["id"])
        if i >= n_vocab:
            raise CheckpointError(f"token {t['content']!r} has id {i}, past the model's {n_vocab} embedding rows")
        tokens[i] = t["content"]
        types[i] = int(TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    meta = {"model": "gpt2", "pre": pre, "tokens": tokens, "token_types": types, "merges": merges}
    if getattr(tokenizer, "kind", None) == "hf":
        end = tokenizer.assistant_end_id
        post = json.dumps(spec.get("post_processor") or {})
        bos = tokenizer.bos_token_id
        add_bos = tokenizer.config.get("add_bos_token")
        if add_bos is None:   # as gguf.SpecialVocab reads it: the post-processor's template adds the BOS
            add_bos = bos is not None and tokenizer.bos_token is not None and json.dumps(tokenizer.bos_token) in post
        meta.update(bos=bos, eos=tokenizer.eos_token_id, eot=end if end != tokenizer.eos_token_id else None,
                    add_bos=bool(add_bos) and bos is not None,
                    chat_template=tokenizer.chat_template if tokenizer.has_chat_template else None)
    else:
        # ours: documents start with <|bos|> (pretraining rows, raw prompts); an answer ends with <|assistant_end|>
        meta.update(bos=tokenizer.bos_id, eos=tokenizer.assistant_end_id, eot=tokenizer.assistant_end_id,
                    add_bos=True, chat_template=OUR_CHAT_TEMPLATE)
    return meta


# ---- the file ------------------------------------------------------------------------------------------

def _gguf():
    try:
        import gguf
    except ImportError:
        raise DependencyError("GGUF export needs the gguf package: pip install 'gptstack[export]' "
                              "(or pip install gguf)") from None
    return gguf


def _file_type(gguf, tensor_type: str) -> int:
    return int({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[tensor_type])


def write_gguf(model, tokenizer, out_path, tensor_type: str = "f16", name: str = "gptstack") -> Path:
    """Write a (non-PEFT) gptstack GPT and its tokenizer as one GGUF file at `out_path` (atomically)."""
    import numpy as np
    import torch

    from ..model.gpt import core_gpt, rope_inv_freq

    if tensor_type not in TENSOR_TYPES:
        raise ConfigError(f"unknown --type {tensor_type!r} for GGUF; choose one of {', '.join(TENSOR_TYPES)}")
    gguf = _gguf()
    gpt = core_gpt(model)
    cfg = gpt.config
    arch = gguf_arch(cfg)
    tok = tokenizer_metadata(tokenizer, cfg.vocab_size)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")

    w = gguf.GGUFWriter(tmp, arch)
    try:
        w.add_name(name)
        w.add_file_type(_file_type(gguf, tensor_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.seq_len)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.mlp_hidden)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        scaling = cfg.rope_scaling or {}
        if scaling.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))

        w.add_tokenizer_model(tok["model"])
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["token_types"])
        w.add_token_merges(tok["merges"])
        if tok["bos"] is not None:
            w.add_bos_token_id(int(tok["bos"]))
        w.add_eos_token_id(int(tok["eos"]))
        if tok["eot"] is not None:
            w.add_eot_token_id(int(tok["eot"]))
        w.add_add_bos_token(bool(tok["add_bos"]))
        w.add_add_eos_token(False)
        if tok["chat_template"]:
            w.add_chat_template(tok["chat_template"])

        state = {k: v for k, v in gpt.state_dict().items() if not k.startswith("rope_")}
        if cfg.tie_embeddings:
            state.pop("lm_head.weight", None)   # llama.cpp reads the head from token_embd
        for key, t in state.items():
            a = t.detach().to("cpu", torch.float32).contiguous().numpy()
            if arch == "llama" and key.endswith(("q_proj.weight", "q_proj.bias")):
                a = permute_rope(a, cfg.n_head)
            elif arch == "llama" and key.endswith(("k_proj.weight", "k_proj.bias")):
                a = permute_rope(a, cfg.n_kv_head)
            a = np.ascontiguousarray(a, dtype=np.float32)
            _add_tensor(gguf, w, gguf_name(key), a, tensor_type)
        if scaling.get("rope_type") == "llama3":
            # llama.cpp divides each RoPE frequency by rope_freqs[i]: our scaled frequencies, exactly
            base = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
            factors = (base / rope_inv_freq(cfg.head_dim, cfg.rope_theta, scaling)).numpy().astype(np.float32)
            w.add_tensor("rope_freqs.weight", factors)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    w.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out


def _add_tensor(gguf, w, name: str, a, tensor_type: str) -> None:
    import numpy as np

    if a.ndim == 1 or tensor_type == "f32":
        w.add_tensor(name, a.astype(np.float32))
        return
    if tensor_type == "q8_0":
        try:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
        except gguf.quants.QuantError:   # rows not a multiple of 32 wide: what llama.cpp's converter keeps f16
            q = None
        if q is not None:
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            return
    w.add_tensor(name, a.astype(np.float16))


def export_gguf(run_dir, out_path, tensor_type: str = "f16") -> Path:
    """Write the run at `run_dir` (a LoRA run: merged) as a GGUF file at `out_path` and return its path."""
    from ..runs import is_peft, load_model, read_config

    if tensor_type not in TENSOR_TYPES:   # before loading anything: a bad flag should not wait
        raise ConfigError(f"unknown --type {tensor_type!r} for GGUF; choose one of {', '.join(TENSOR_TYPES)}")
    _gguf()
    out = Path(out_path)
    if out.is_dir():
        raise ConfigError(f"--out '{out}' is a directory; give the .gguf file to write")
    config = read_config(run_dir)   # a missing or non-run directory is a CheckpointError here
    if config.get("kind", "lm") != "lm":
        raise CheckpointError(f"'{run_dir}' is a {config.get('kind')} run; only language models can be written as GGUF")
    model, tokenizer, _ = load_model(run_dir, "cpu")
    if is_peft(model):
        from ..model.adapters import merge_adapter

        model = merge_adapter(model)
    return write_gguf(model, tokenizer, out, tensor_type, name=Path(str(run_dir)).name or "gptstack")
