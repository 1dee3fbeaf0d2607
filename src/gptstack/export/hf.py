"""A run written out as a Hugging Face model directory that transformers, PEFT, vLLM and llama.cpp's
converter read:

    DIR/config.json              Qwen3 layout when the model has q/k norm (ours do), else Llama (or Qwen2)
       model.safetensors         LlamaForCausalLM names (`model.layers.N...`); a tied head is stored once
       tokenizer.json            the same BPE (ours: split pattern, byte-level alphabet, merges, specials)
       tokenizer_config.json     special tokens and a chat_template that renders what our renderer renders
       generation_config.json    BOS / EOS (our <|assistant_end|>) / pad
       [adapter/]                with --adapter: the LoRA run's adapter in PEFT format, for this base

A LoRA run exports its merged weights, or (`adapter=True`) the base plus the adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..hub.convert import hf_config_from_gpt
from ..io import atomic_write_json, commit_checkpoint, save_weights
from ..model.gpt import core_gpt, hf_name
from ..tokenizer import OUR_CHAT_TEMPLATE



def hf_state(model) -> dict:
    """The GPT's tensors under transformers' names (a tied lm_head is the embedding: stored once)."""
    gpt = core_gpt(model)
    state = gpt.state_dict()
    if gpt.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {hf_name(k): v.detach().contiguous().clone() for k, v in state.items()}


def _tokenizer_files(tokenizer, seq_len: int) -> dict[str, dict]:
    if getattr(tokenizer, "kind", None) == "hf":
        return {"tokenizer.json": tokenizer.to_hf_json(), "tokenizer_config.json": tokenizer.tokenizer_config()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
              "pad_token": "<|bos|>", "model_max_length": seq_len, "add_bos_token": False,
              "clean_up_tokenization_spaces": False, "chat_template": OUR_CHAT_TEMPLATE}
    return {"tokenizer.json": tokenizer.to_hf_json(), "tokenizer_config.json": config}


def write_hf_model(model, tokenizer, out_dir) -> Path:
    """config.json, model.safetensors, generation_config.json and the tokenizer files into `out_dir`
    (a fresh directory, written whole or not at all)."""
    gpt = core_gpt(model)
    cfg = gpt.config
    stops = list(dict.fromkeys(getattr(tokenizer, "stop_ids", None) or [tokenizer.assistant_end_id]))
    eos = stops[0] if len(stops) == 1 else stops
    hf_cfg = hf_config_from_gpt(cfg, tokenizer.bos_id, eos, pad_id=tokenizer.bos_id)
    out = Path(out_dir)
    with commit_checkpoint(out) as tmp:
        atomic_write_json(tmp / "config.json", hf_cfg)
        atomic_write_json(tmp / "generation_config.json",
                          {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "pad_token_id": tokenizer.bos_id})
        for name, data in _tokenizer_files(tokenizer, cfg.seq_len).items():
            (tmp / name).write_text(json.dumps(data, ensure_ascii=False, indent=None if name == "tokenizer.json"
                                               else 2), encoding="utf-8")
        save_weights(tmp / "model.safetensors", hf_state(gpt), {"format": "pt"})
    return out


def export_hf(run_dir, out_dir, adapter: bool = False) -> Path:
    """Write the run of `run_dir` as an HF model directory at `out_dir` (which must not hold one already)."""
    from ..model.adapters import merge_adapter
    from ..runs import is_peft, load_model

    out = Path(out_dir)
    if (out / "config.json").exists() or (out / "model.safetensors").exists():
        raise ConfigError(f"'{out}' already holds a model; choose another --out (nothing was overwritten)")
    model, tokenizer, config = load_model(run_dir, "cpu", with_adapter=not adapter)
    lora = (Path(str(run_dir)) / "adapter").is_dir() and config.get("adapter")
    if adapter and not lora:
        raise ConfigError(f"'{run_dir}' is not a LoRA run: --adapter exports a base plus its adapter")
    if is_peft(model):
        model = merge_adapter(model)
    write_hf_model(model, tokenizer, out)
    if adapter:
        _copy_adapter(Path(str(run_dir)) / "adapter", out / "adapter", out)
    return out


def _copy_adapter(src: Path, dst: Path, base: Path) -> None:
    """The run's adapter files (already PEFT's names for the HF model), pointed at the exported base."""
    from ..model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    if not (src / ADAPTER_CONFIG).exists():
        raise CheckpointError(f"'{src}' holds no {ADAPTER_CONFIG}")
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / ADAPTER_WEIGHTS, dst / ADAPTER_WEIGHTS)
    config = json.loads((src / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = str(base.resolve())
    atomic_write_json(dst / ADAPTER_CONFIG, config)
