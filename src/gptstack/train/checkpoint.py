"""Run directories: atomic save, validated load, resume.

    RUN/model.safetensors  config.json  tokenizer/  trainer_state.json  optimizer.pt  metrics.jsonl  [adapter/]

Each file is written to a temporary name, fsynced and renamed. A random checkpoint id goes into the
safetensors metadata, optimizer.pt and trainer_state.json (written last); on load a mismatch means the run
was killed between renames, and is reported instead of loading a half-updated checkpoint.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model.gpt import GPT, GPTConfig
from ..tokenizer import Tokenizer


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), json.dumps(obj, indent=2, default=str).encode())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    # Tied weights share storage, which safetensors refuses; each tensor is stored once, contiguous.
    seen, tensors = set(), {}
    for k, v in state.items():
        if v.data_ptr() in seen and k == "lm_head.weight":
            continue
        seen.add(v.data_ptr())
        tensors[k] = v.detach().to("cpu").contiguous()
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}' is missing: the run directory holds no weights (did the run finish?)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises its own error types for truncation and garbage
        raise CheckpointError(f"'{path}' is corrupt or truncated ({str(e).splitlines()[0]})") from None


def read_config(run_dir: str | os.PathLike) -> dict:
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"'{run}' is not a run directory (it does not exist)")
    path = run / "config.json"
    if not path.exists():
        raise CheckpointError(f"'{run}' is not a gptstack run directory: it has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"'{path}' is corrupt ({e.msg})") from None


def new_checkpoint_id() -> str:
    return secrets.token_hex(8)


def load_tokenizer(run_dir: str | os.PathLike) -> Tokenizer:
    run = Path(run_dir)
    if (run / "tokenizer").is_dir():
        return Tokenizer.load(run / "tokenizer")
    if (run / "meta.json").exists():  # a bare tokenizer directory
        return Tokenizer.load(run)
    raise CheckpointError(f"'{run}' has no tokenizer/ directory")


def check_checkpoint_consistent(run: Path, weights_meta: dict) -> None:
    state_path = run / "trainer_state.json"
    if not state_path.exists():
        return
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"'{state_path}' is corrupt") from None
    cid = state.get("checkpoint_id")
    if cid and weights_meta.get("checkpoint_id") and cid != weights_meta["checkpoint_id"]:
        raise CheckpointError(f"'{run}' holds weights and trainer state from different saves "
                              "(the run was killed mid-save); restore a backup or retrain")


def load_model(run_dir: str | os.PathLike, device="cpu", with_adapter: bool = True) -> tuple[GPT, Tokenizer, dict]:
    """A language model from a run directory, with its tokenizer and config. Adapters (adapter/) are applied
    through PEFT when present."""
    run = Path(run_dir)
    config = read_config(run)
    if "model" not in config:
        raise CheckpointError(f"'{run}/config.json' has no model section: not a gptstack model run")
    tokenizer = load_tokenizer(run)
    mcfg = GPTConfig.from_dict(config["model"])
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise CheckpointError(f"tokenizer in '{run}' has {tokenizer.vocab_size} tokens but the model expects "
                              f"{mcfg.vocab_size}: they do not belong together")
    has_adapter = (run / "adapter").is_dir() and not (run / "model.safetensors").exists()
    weights_dir = run
    if has_adapter:
        # a LoRA run stores only the adapter; the base weights live in the parent run
        parent = config.get("parent_run")
        if not parent:
            raise CheckpointError(f"'{run}' holds only an adapter and names no parent run")
        weights_dir = Path(parent)
    state, meta = load_weights(weights_dir / "model.safetensors")
    if weights_dir == run:
        check_checkpoint_consistent(run, meta)
    model = GPT(mcfg)
    if mcfg.tie_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights in '{weights_dir}' do not match its config ({str(e).splitlines()[0]})") from None
    model.to(device)
    if has_adapter and with_adapter:
        from ..model.adapters import load_adapter

        model = load_adapter(model, run / "adapter")
    model.eval()
    return model, tokenizer, config
