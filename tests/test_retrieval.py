"""Chunking, BM25 against hand-computed scores, MiniLM offline, index round trips and embedder checks."""

import json
import math

import numpy as np
import pytest

from gptstack.errors import ConfigError, DataError
from gptstack.infer.retrieval import BM25, Index, augment, build_index, chunk_documents, load_documents


def test_chunking_packs_paragraphs_and_splits_long_ones():
    docs = [("a.txt", "one two three\n\nfour five"), ("b.txt", " ".join(f"w{i}" for i in range(25)))]
    chunks = chunk_documents(docs, max_words=10, overlap=2)
    assert chunks[0].source == "a.txt" and chunks[0].text == "one two three four five"
    long = [c for c in chunks if c.source.startswith("b.txt")]
    assert [c.source for c in long] == ["b.txt#1", "b.txt#2", "b.txt#3"]
    assert long[0].text.split()[-2:] == long[1].text.split()[:2]          # windows overlap by 2 words
    assert long[-1].text.split()[-1] == "w24"


def test_bm25_matches_hand_computation():
    texts = ["the cat sat", "the dog sat down", "a cat and a cat"]
    bm = BM25.build(texts)
    k1, b, n = 1.5, 0.75, 3
    lens = [3, 4, 5]
    avg = sum(lens) / 3

    def idf(df):
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    def term(tf, dl, df):
        return idf(df) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avg))

    want = [term(1, 3, 2), 0.0, term(2, 5, 2)]
    assert bm.scores("cat").tolist() == pytest.approx(want)
    want2 = [term(1, 3, 2) + term(1, 3, 2), term(1, 4, 2), term(2, 5, 2)]
    assert bm.scores("Cat sat!").tolist() == pytest.approx(want2)
    assert bm.scores("unknown words").tolist() == [0, 0, 0]


def test_load_documents_folder_and_jsonl(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.md").write_text("hello")
    (tmp_path / "d" / "skip.bin").write_text("no")
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "y.txt").write_text("world")
    assert load_documents(tmp_path / "d") == [("sub/y.txt", "world"), ("x.md", "hello")]
    j = tmp_path / "docs.jsonl"
    j.write_text(json.dumps({"text": "alpha", "source": "s1"}) + "\n" + json.dumps({"text": "beta"}) + "\n")
    assert load_documents(j) == [("s1", "alpha"), ("docs.jsonl:2", "beta")]
    j.write_text('{"nope": 1}\n')
    with pytest.raises(DataError):
        load_documents(j)
    with pytest.raises(DataError):
        load_documents(tmp_path / "missing")


def test_bm25_index_round_trip_finds_facts(tmp_path):
    from gptstack.data.tasks import get_task

    facts = get_task("facts")
    index = build_index(facts.documents(), embedder="bm25")
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx", embedder="bm25")
    examples = facts.generate("test", 20, seed=0)
    hits = sum(any(c.source == ex.meta["source"] for _, c in loaded.search(ex.meta["question"], 2))
               for ex in examples)
    assert hits >= 18
    assert loaded.search("x y z", 1)[0][1] in loaded.chunks
    with pytest.raises(ConfigError, match="built with the bm25 embedder"):
        Index.load(tmp_path / "idx", embedder="minilm")
    with pytest.raises(DataError):
        Index.load(tmp_path / "nothing")
    prompt = augment("What is it?", loaded.search(examples[0].meta["question"], 2))
    assert "Context:" in prompt and "[facts/" in prompt and prompt.endswith("Question: What is it?")


@pytest.mark.slow
def test_minilm_index_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = [("zor", "The capital of Zorvania is Kelmith."), ("bak", "Bread is baked in an oven by a baker."),
            ("sea", "Sailors cross the ocean in ships.")]
    index = build_index(docs, embedder="minilm")
    assert index.vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(index.vectors, axis=1), 1, atol=1e-5)
    index.save(tmp_path / "m")
    loaded = Index.load(tmp_path / "m")
    assert loaded.search("who makes loaves of bread?", 1)[0][1].source == "bak"
    assert loaded.search("boats on the sea", 1)[0][1].source == "sea"
    with pytest.raises(ConfigError):
        Index.load(tmp_path / "m", embedder="bm25")


def test_retrieval_gain_runs(tiny_tokenizer):
    from _infer_util import tiny_model
    from gptstack.data.tasks import get_task
    from gptstack.infer.engine import Engine
    from gptstack.infer.retrieval import retrieval_gain
    from gptstack.infer.sampling import SamplingParams

    engine = Engine(tiny_model(tiny_tokenizer, seq_len=512), tiny_tokenizer)
    examples = get_task("facts").generate("test", 4, seed=0)
    r = retrieval_gain(engine, examples, k=2, params=SamplingParams(temperature=0, max_tokens=4))
    assert r["n"] == 4 and r["retrieval_recall"] >= 0.75
    assert 0 <= r["accuracy_without"] <= 1 and r["gain"] == r["accuracy_with_retrieval"] - r["accuracy_without"]
