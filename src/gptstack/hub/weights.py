"""Reading a Hugging Face checkpoint's tensors: one model.safetensors or shards listed in
model.safetensors.index.json; bf16/fp16/fp32 on disk, float32 (or `dtype`; None keeps the file's) in memory, renamed to ours."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..io import load_weights
from ..model.gpt import our_name

INDEX = "model.safetensors.index.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding the model, checked to exist (a missing shard is named)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"'{index}' is not a readable safetensors index ({type(e).__name__}: {e})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"'{model_dir}' is missing shard(s) {', '.join(missing)} listed in {INDEX}")
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pth")):
        raise CheckpointError(f"'{model_dir}' holds PyTorch pickle weights (.bin/.pth), which are not read (they "
                              "can run code); convert them to safetensors first")
    raise CheckpointError(f"'{model_dir}' has no model.safetensors (nor {INDEX}): no weights to load")


def read_hf_state(model_dir: Path, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under our names. Truncated or corrupt files are a CheckpointError;
    whether the tensors fit the model is checked when they are loaded into it (load_state_strict)."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        tensors, _ = load_weights(path)
        for name, t in tensors.items():
            if name.endswith("rotary_emb.inv_freq"):   # old checkpoints saved RoPE's buffer; we compute it
                continue
            state[our_name(name)] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return state
