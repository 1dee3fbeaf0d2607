import json

import pytest
import torch

from gptstack.data.chat import ChatBatches, block_causal_mask, encode_conversations, load_conversations
from gptstack.errors import ConfigError, DataError
from gptstack.tokenizer import Tokenizer

TEXT = ("To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune. What is 47 + 385? Answer: 432. Hello! I am gptstack.") * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], vocab_size=300)


def conv(i: int, turns: int = 1) -> list[dict]:
    msgs = []
    for t in range(turns):
        msgs += [{"role": "user", "content": f"q{i}.{t}" + " more" * (i % 3)},
                 {"role": "assistant", "content": f"a{i}.{t}" + " yes" * (i % 4)}]
    return msgs


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---- loading ------------------------------------------------------------------------------------------
def test_load_messages_and_alpaca(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        "",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                      {"role": "assistant", "content": "c"}]},
    ])
    convs = load_conversations(path)
    assert convs[0][0] == {"role": "system", "content": "Be brief."}
    assert convs[1] == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert convs[2][0]["content"] == "Say hi"
    assert convs[3][0]["content"] == "ab"
    assert len(load_conversations(path, max_examples=2)) == 2
    with open(path, "a") as f:
        f.write("{broken\n")
    assert len(load_conversations(path, max_examples=4)) == 4  # the limit stops reading before the bad line


def test_field_map_sharegpt(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])
    convs = load_conversations(path, field_map={"messages": "conversations", "role": "from", "content": "value"})
    assert convs == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]
    with pytest.raises(ConfigError):
        load_conversations(path, field_map={"msgs": "conversations"})


@pytest.mark.parametrize("bad,match", [
    ('{"messages": [', "not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "out of order"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "out of order"),
    ({"text": "plain"}, "expected a 'messages' list"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "string"),
])
def test_malformed_lines_are_named(tmp_path, bad, match):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{match}"):
        load_conversations(path)


def test_json_array_file(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"messages": [{"role": "user", "content": "x"}]}]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"c\.json\[1\]: .*no assistant turn"):
        load_conversations(str(tmp_path / "c.json"))
    assert load_conversations(str(tmp_path / "c.json"), max_examples=1)[0][1]["content"] == "b"


def test_empty_or_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no conversations"):
        load_conversations(str(tmp_path / "e.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_conversations(str(tmp_path / "missing.jsonl"))


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    rows = [{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    convs = load_conversations(f"hf:{tmp_path / 'ds'}")
    assert [c[1]["content"] for c in convs] == ["0", "1", "2"]
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "x"}]}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad\[0\]: .*no assistant turn"):
        load_conversations(f"hf:{tmp_path / 'bad'}")


# ---- encoding and masks ---------------------------------------------------------------------------------
def test_mask_covers_exactly_assistant_content_and_end(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 47 + 385?"}, {"role": "assistant", "content": "Answer: 432"},
                {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "I am gptstack."}]
    (ids, mask), = encode_conversations(tok, [messages], max_len=1000)[0]
    shown = "".join(f"[{tok.decode([i])}]" if m else tok.decode([i]) for i, m in zip(ids, mask))
    print(shown)  # trained tokens in brackets
    trained = [i for i, m in zip(ids, mask) if m]
    end = tok.special("<|assistant_end|>")
    expected = tok.encode("Answer: 432") + [end] + tok.encode("I am gptstack.") + [end]
    assert trained == expected
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Answer: 432<|assistant_end|>I am gptstack.<|assistant_end|>"
    assert shown.count("[<|assistant_end|>]") == 2 and "[<|assistant_start|>]" not in shown


def test_encode_truncates_at_turn_boundary_or_skips(tok):
    long_reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes " * 200}]
    long_prompt = [{"role": "user", "content": "hi " * 200}, {"role": "assistant", "content": "ok"}]
    two_turns = conv(1, turns=2)
    full = len(tok.render_conversation(two_turns)[0])
    first = len(tok.render_conversation(two_turns[:2])[0])
    out, stats = encode_conversations(tok, [long_reply, long_prompt, two_turns, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]],
                                      max_len=first + 2)
    assert stats["truncated"] == 2 and stats["skipped"] == 1 and stats["kept"] == 3 and stats["conversations"] == 4
    assert len(out[0][0]) == first + 2 and all(out[0][1][-3:])  # hard cut inside the only reply
    ids, mask = out[1]
    assert full > first + 2 and len(ids) == first and ids[-1] == tok.assistant_end_id  # cut after a whole reply
    assert stats["trained_tokens"] == sum(sum(m) for _, m in out)


# ---- batches ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoded(tok):
    out, stats = encode_conversations(tok, [conv(i, turns=1 + (i % 4 == 0)) for i in range(40)], max_len=65)
    assert stats["kept"] == 40 and stats["truncated"] == 0
    return out


def test_packed_batches_rebuild_each_conversation(encoded):
    batches = ChatBatches(encoded, batch_size=3, seq_len=64, seed=0, pack=True)
    lookup = {tuple(ids[:-1]): (ids, mask) for ids, mask in encoded}
    seen, shared, filled = 0, 0, 0
    for _ in range(4):
        b = next(batches)
        assert all(b[k].shape == (3, 64) and b[k].dtype == torch.long for k in b)
        for r in range(3):
            docs = b["doc_ids"][r]
            shared += int(docs.max() >= 1)
            filled += int((docs >= 0).sum())
            for d in range(int(docs.max()) + 1):
                sel = docs == d
                inputs = tuple(b["input_ids"][r][sel].tolist())
                ids, mask = lookup[inputs]
                assert b["position_ids"][r][sel].tolist() == list(range(len(inputs)))
                want = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
                assert b["targets"][r][sel].tolist() == want
                seen += 1
            pad = docs == -1
            assert (b["targets"][r][pad] == -1).all()
            used = int((docs >= 0).sum())
            assert (docs[:used] >= 0).all() and (docs[used:] == -1).all()  # padding only at the end
    assert seen > 12 and shared >= 10  # packing really puts several conversations in a row
    assert filled / (12 * 64) > 0.85  # and the first-fit look-ahead keeps rows nearly full


def test_unpacked_is_one_conversation_per_row(encoded):
    b = next(ChatBatches(encoded, batch_size=4, seq_len=64, seed=0, pack=False))
    assert set(b["doc_ids"].unique().tolist()) == {-1, 0}
    assert ChatBatches(encoded, 4, 64, seed=0).epoch_tokens == sum(len(ids) - 1 for ids, _ in encoded)
    assert (b["position_ids"][:, 0] == 0).all()


def test_block_causal_mask_isolates_conversations(encoded):
    b = next(ChatBatches(encoded, batch_size=2, seq_len=64, seed=1))
    docs = b["doc_ids"]
    mask = block_causal_mask(docs)
    assert mask.shape == (2, 1, 64, 64) and mask.dtype == torch.bool
    for r in range(2):
        for q in range(64):
            for k in range(64):
                allowed = bool(mask[r, 0, q, k])
                if docs[r, q] >= 0:
                    assert allowed == (docs[r, k] == docs[r, q] and k <= q)
                else:
                    assert allowed == (k == q)  # padding sees itself only: no empty softmax rows
    small = block_causal_mask(torch.tensor([[0, 0, 1, 1, -1]]))[0, 0].int()
    print(small)
    assert small.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]


def test_mask_really_blocks_attention_across_conversations():
    # attention output of conversation 2 must not change when conversation 1's tokens change
    torch.manual_seed(0)
    docs = torch.tensor([[0, 0, 0, 1, 1, -1]])
    q = torch.randn(1, 1, 6, 8)
    kv = torch.randn(1, 1, 6, 8)
    kv2 = kv.clone()
    kv2[:, :, :3] += 5.0
    m = block_causal_mask(docs)
    out1 = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, attn_mask=m)
    out2 = torch.nn.functional.scaled_dot_product_attention(q, kv2, kv2, attn_mask=m)
    assert torch.allclose(out1[:, :, 3:], out2[:, :, 3:]) and not torch.isnan(out1).any()


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("pack", [True, False])
def test_resume_gives_the_same_following_batches(encoded, pack):
    ref = ChatBatches(encoded, batch_size=4, seq_len=64, seed=5, pack=pack)
    _take(ref, 12)
    assert ref.epoch >= 1  # the resumed stretch starts past an epoch boundary (40 conversations)
    state = json.loads(json.dumps(ref.state_dict()))  # survives a JSON round trip (trainer_state.json)
    expected = _take(ref, 6)
    resumed = ChatBatches(encoded, batch_size=4, seq_len=64, seed=5, pack=pack)
    resumed.load_state_dict(state)
    for a, b in zip(expected, _take(resumed, 6)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="seed"):
        ChatBatches(encoded, batch_size=4, seq_len=64, seed=6).load_state_dict(state)


def test_epochs_reshuffle_with_the_seed(encoded):
    def first_rows(seed, epochs):
        it = ChatBatches(encoded, batch_size=1, seq_len=64, seed=seed, pack=False)
        out = []
        while it.epoch < epochs:
            out.append(tuple(next(it)["input_ids"][0].tolist()))
        return out
    it = ChatBatches(encoded, batch_size=4, seq_len=64, seed=0)
    placed = sum(int(b["doc_ids"][r].max()) + 1 for b in _take(it, 12) for r in range(4))
    assert it.epochs_done == pytest.approx(placed / len(encoded)) and it.epochs_done > 1
    a = first_rows(0, 2)
    assert len(a) == 2 * len(encoded)
    assert a[:40] != a[40:] and sorted(a[:40]) == sorted(a[40:])  # every conversation once per epoch, reordered
    assert a == first_rows(0, 2) and a != first_rows(1, 2)


def test_ranks_get_disjoint_shards(encoded):
    rows = []
    for rank in range(3):
        it = ChatBatches(encoded, batch_size=1, seq_len=64, seed=0, rank=rank, world=3, pack=False)
        rows.append({tuple(next(it)["input_ids"][0].tolist()) for _ in range(len(it._order))})
    assert not rows[0] & rows[1] and not rows[1] & rows[2] and not rows[0] & rows[2]
    assert sum(map(len, rows)) == len(encoded)


def test_bad_batch_configs(encoded):
    with pytest.raises(ConfigError, match="max_len=33"):
        ChatBatches(encoded, batch_size=2, seq_len=32, seed=0)
    with pytest.raises(ConfigError):
        ChatBatches(encoded, batch_size=2, seq_len=64, seed=0, rank=2, world=2)
    with pytest.raises(DataError):
        ChatBatches(encoded[:1], batch_size=2, seq_len=64, seed=0, rank=0, world=2)


def test_packed_row_gives_each_conversation_its_unpacked_loss(tok, encoded):
    """End to end with the model: packing changes nothing a conversation sees."""
    from gptstack.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, n_kv_head=2,
                          mlp_hidden=64, seq_len=64)).eval()
    b = next(ChatBatches(encoded, batch_size=2, seq_len=64, seed=3))
    with torch.no_grad():
        packed = model(b["input_ids"], b["targets"], position_ids=b["position_ids"],
                       attn_mask=block_causal_mask(b["doc_ids"]), reduction="none")
        for r in range(2):
            for d in range(int(b["doc_ids"][r].max()) + 1):
                sel = b["doc_ids"][r] == d
                alone = model(b["input_ids"][r][sel][None], b["targets"][r][sel][None], reduction="none")[0]
                assert torch.allclose(packed[r][sel], alone, atol=1e-5)
