"""Tokenize a corpus once into memmapped token files, cached by content hash.

    GPTSTACK_HOME/shards/<corpus fingerprint>-<tokenizer fingerprint>-<split>/{train.bin, val.bin, meta.json}

Documents are joined as `<|bos|> doc <|bos|> doc ...`. uint16 when the vocabulary fits, else uint32.
A second run with the same corpus, tokenizer and split finds the shards and starts at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .corpus import Document, corpus_fingerprint, gptstack_home


@dataclass
class Shards:
    directory: Path
    meta: dict

    def tokens(self, split: str) -> np.ndarray:
        path = self.directory / f"{split}.bin"
        n = self.meta[f"{split}_tokens"]
        if n == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(path, dtype=self.meta["dtype"], mode="r", shape=(n,))

    @property
    def train_tokens(self) -> int:
        return self.meta["train_tokens"]

    @property
    def val_tokens(self) -> int:
        return self.meta["val_tokens"]


def _encode_split(tokenizer, docs: list[Document], path: Path, dtype, progress: bool) -> tuple[int, int]:
    from tqdm import tqdm

    n_tokens = n_bytes = 0
    chunk = 64  # documents per encode_batch call: tiktoken spreads one call over all cores
    with open(path, "wb") as f:
        bar = tqdm(total=len(docs), desc=f"tokenizing {path.stem}", unit="doc", disable=not progress, leave=False)
        for i in range(0, len(docs), chunk):
            batch = docs[i:i + chunk]
            for ids in tokenizer.encode_batch([d.text for d in batch]):
                arr = np.asarray([tokenizer.bos_id] + ids, dtype=dtype)
                f.write(arr.tobytes())
                n_tokens += len(arr)
            n_bytes += sum(len(d.text.encode("utf-8")) for d in batch)
            bar.update(len(batch))
        bar.close()
        f.flush()
        os.fsync(f.fileno())
    return n_tokens, n_bytes


def build_shards(tokenizer, train_docs: list[Document], val_docs: list[Document], progress: bool = True) -> Shards:
    if not train_docs:
        raise DataError("the training split is empty: the corpus needs at least one document outside validation")
    key = hashlib.sha256(
        f"{corpus_fingerprint(train_docs)}-{corpus_fingerprint(val_docs)}-{tokenizer.fingerprint()}".encode()
    ).hexdigest()[:20]
    root = gptstack_home() / "shards"
    target = root / key
    if (target / "meta.json").exists():
        return Shards(target, json.loads((target / "meta.json").read_text()))
    root.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if tokenizer.vocab_size <= 65536 else "uint32"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        train_n, train_b = _encode_split(tokenizer, train_docs, staging / "train.bin", dtype, progress)
        val_n, val_b = _encode_split(tokenizer, val_docs, staging / "val.bin", dtype, progress)
        unique = len(np.unique(np.fromfile(staging / "train.bin", dtype=dtype)))
        meta = {"dtype": dtype, "train_tokens": train_n, "val_tokens": val_n, "train_bytes": train_b,
                "val_bytes": val_b, "train_docs": len(train_docs), "val_docs": len(val_docs),
                "val_names": [d.name for d in val_docs][:50], "unique_token_types": unique,
                "tokenizer": tokenizer.fingerprint()}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Shards(target, meta)
