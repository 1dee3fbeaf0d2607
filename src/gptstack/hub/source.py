"""Where a Hugging Face model can stand in for a run directory.

A directory whose config.json is a transformers config (it has `model_type`, and none of our run keys) is an
HF model directory; a name like `HuggingFaceTB/SmolLM2-135M-Instruct` that is not a local path is a hub id,
downloaded once into the HF cache (`huggingface_hub.snapshot_download`, safetensors and tokenizer files only).
`hf_run_config` describes such a directory the way a run's config.json would, so every command reads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CheckpointError, DependencyError
from .convert import gpt_config_from_hf

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def is_hf_model_dir(path) -> bool:
    p = Path(path)
    cfg = p / "config.json"
    if not p.is_dir() or not cfg.exists():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data and "model" not in data and "stage" not in data


def looks_like_hub_id(name) -> bool:
    s = str(name)
    return not Path(s).exists() and bool(HUB_ID.match(s)) and not s.startswith(("runs/", "./", "../"))


def resolve_model(name) -> Path:
    """A local path for a run directory, an HF model directory or a hub id (downloaded on first use)."""
    if not looks_like_hub_id(name):
        return Path(name)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DependencyError(f"'{name}' looks like a Hugging Face hub id, and downloading it needs huggingface_hub "
                              "(pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(str(name), allow_patterns=_FILES))
    except Exception as e:   # offline, unknown repo, gated model: one line, the hub's own words
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"'{name}' is neither a local directory nor a downloadable hub model ({msg})") from None


def hf_run_config(model_dir) -> dict:
    """What a run's config.json would say about an HF model directory (nothing is written)."""
    d = Path(model_dir)
    try:
        hf = json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{d}/config.json' is not readable JSON ({type(e).__name__}: {e})") from None
    cfg, notes = gpt_config_from_hf(hf, f"'{d}/config.json'")
    return {"kind": "lm", "stage": "import", "model": cfg.to_dict(), "parent_run": str(d), "source_run": str(d),
            "adapter": None, "hf": {"model_type": hf.get("model_type"), "architectures": hf.get("architectures"),
                                     "path": str(d), "notes": notes}}
