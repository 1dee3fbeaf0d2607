import json

import numpy as np
import pytest

from gptstack.data.corpus import Document, load_corpus, split_documents
from gptstack.data.loader import TokenBatches, sequential_batches
from gptstack.data.shards import build_shards
from gptstack.errors import DataError


def test_txt_folder_jsonl_and_parquet(tmp_path, corpus_dir):
    docs = load_corpus(str(corpus_dir))
    assert len(docs) == 6 and all(d.text for d in docs)
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "alpha"}) + "\n\n" + json.dumps({"text": "beta"}) + "\n")
    assert [d.text for d in load_corpus(str(jl))] == ["alpha", "beta"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two", ""]}), tmp_path / "c.parquet")
    assert [d.text for d in load_corpus(str(tmp_path / "c.parquet"))] == ["one", "two"]


@pytest.mark.parametrize("content,needle", [
    ('{"text": "ok"}\n{"text": oops}\n', "c.jsonl:2"),
    ('{"text": "ok"}\n{"body": "x"}\n', "c.jsonl:2"),
])
def test_malformed_jsonl_names_the_line(tmp_path, content, needle):
    p = tmp_path / "c.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=needle):
        load_corpus(str(p))


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError):
        load_corpus(str(tmp_path / "dir"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x80garbage")
    with pytest.raises(DataError, match="UTF-8"):
        load_corpus(str(tmp_path / "bin.txt"))


def test_split_holds_out_whole_documents():
    docs = [Document(f"d{i}", "x" * (100 + i)) for i in range(20)]
    train, val = split_documents(docs, 0.1, seed=0)
    assert val and {d.name for d in train}.isdisjoint({d.name for d in val})
    assert len(train) + len(val) == 20
    assert split_documents(docs, 0.1, seed=0)[1] == val  # deterministic


def test_shards_cached_and_complete(corpus_dir, tiny_tokenizer):
    docs = load_corpus(str(corpus_dir))
    train, val = split_documents(docs, 0.2)
    a = build_shards(tiny_tokenizer, train, val, progress=False)
    b = build_shards(tiny_tokenizer, train, val, progress=False)
    assert a.directory == b.directory
    toks = a.tokens("train")
    expected = []
    for d in train:
        expected += [tiny_tokenizer.bos_id] + tiny_tokenizer.encode(d.text)
    assert toks.tolist() == expected
    # no cross-split leakage: val tokens decode to exactly the held-out documents
    assert tiny_tokenizer.decode([t for t in a.tokens("val").tolist() if t != tiny_tokenizer.bos_id]) == "".join(d.text for d in val)


def test_loader_sees_every_token_once_per_epoch():
    tokens = np.arange(1001, dtype=np.uint16)
    T, B = 10, 7
    loader = TokenBatches(tokens, B, T, seed=3)
    n_windows = loader.n_windows
    seen = []
    while loader.epoch == 0:
        batch = next(loader)
        assert batch["input_ids"].shape == (B, T)
        assert (batch["targets"] == batch["input_ids"] + 1).all()
        seen += batch["targets"].flatten().tolist()
    first_epoch = seen[:n_windows * T]
    assert sorted(first_epoch) == list(range(1, n_windows * T + 1))


def test_loader_rank_sharding_is_disjoint_and_complete():
    tokens = np.arange(801, dtype=np.uint16)
    ranks = [TokenBatches(tokens, 4, 10, seed=1, rank=r, world=2) for r in range(2)]
    full = TokenBatches(tokens, 8, 10, seed=1)
    for _ in range(5):
        a, b, f = next(ranks[0]), next(ranks[1]), next(full)
        assert set(a["input_ids"][:, 0].tolist()).isdisjoint(b["input_ids"][:, 0].tolist())
        assert sorted(a["input_ids"][:, 0].tolist() + b["input_ids"][:, 0].tolist()) == sorted(f["input_ids"][:, 0].tolist())


def test_loader_resumes_exactly():
    tokens = np.arange(5000, dtype=np.uint16)
    a = TokenBatches(tokens, 4, 16, seed=0)
    for _ in range(100):  # crosses an epoch boundary
        next(a)
    state = a.state_dict()
    expected = [next(a)["input_ids"] for _ in range(5)]
    b = TokenBatches(tokens, 4, 16, seed=0)
    b.load_state_dict(state)
    assert all((x == next(b)["input_ids"]).all() for x in expected)


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one sequence"):
        TokenBatches(np.arange(5, dtype=np.uint16), 2, 16)


def test_sequential_batches_limit():
    tokens = np.arange(1001, dtype=np.uint16)
    batches = list(sequential_batches(tokens, 4, 10, max_tokens=200))
    assert sum(b["targets"].numel() for b in batches) == 200
