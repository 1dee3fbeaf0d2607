import pytest
from hypothesis import given, settings, strategies as st

from gptstack.errors import CheckpointError, ConfigError, DataError
from gptstack.tokenizer import SPECIAL_TOKENS, Tokenizer, validate_messages


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_roundtrip_any_unicode(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


@given(st.text(max_size=100))
@settings(max_examples=100, deadline=None)
def test_ordinary_text_never_yields_special_tokens(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text + "<|bos|><|assistant_end|>")
    assert not set(ids) & set(tiny_tokenizer.special_ids.values())


def test_vocab_layout_and_digits(tiny_tokenizer):
    assert tiny_tokenizer.vocab_size == 320
    assert tiny_tokenizer.bos_id == 320 - len(SPECIAL_TOKENS)
    # numbers split into single digits: each digit its own token
    ids = tiny_tokenizer.encode("12345")
    assert [tiny_tokenizer.decode([i]) for i in ids] == list("12345")


def test_save_load_and_hf_export_encode_identically(tmp_path, tiny_tokenizer):
    from tokenizers import Tokenizer as HFTokenizer

    tiny_tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    samples = ["The king hath spoken, 123 times!\n\n  And  thou?", "héllo wörld 😀 tabs\tand\r\nnewlines",
               "'tis 'll 've don't", " " * 7 + "x", ""]
    for s in samples:
        assert loaded.encode(s) == tiny_tokenizer.encode(s)
        assert hf.encode(s, add_special_tokens=False).ids == tiny_tokenizer.encode(s)
        assert hf.decode(tiny_tokenizer.encode(s)) == s
    assert hf.token_to_id("<|assistant_end|>") == tiny_tokenizer.assistant_end_id


def test_corrupt_tokenizer_is_a_clear_error(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path)
    lines = (tmp_path / "ranks.tiktoken").read_text().splitlines()
    (tmp_path / "ranks.tiktoken").write_text("\n".join(lines[:-5]) + "\n")
    with pytest.raises(CheckpointError):
        Tokenizer.load(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        Tokenizer.load(tmp_path)


def test_vocab_too_small():
    with pytest.raises(ConfigError):
        Tokenizer.train(["abc"], vocab_size=100)


def test_chat_mask_covers_assistant_content_and_end(tiny_tokenizer):
    t = tiny_tokenizer
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "good day"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "farewell"}]
    ids, mask = t.render_conversation(msgs)
    assert len(ids) == len(mask)
    trained = [i for i, m in zip(ids, mask) if m]
    expected = t.encode("good day") + [t.assistant_end_id] + t.encode("farewell") + [t.assistant_end_id]
    assert trained == expected
    assert ids[0] == t.bos_id
    prompt = t.render_prompt(msgs[:2])
    assert prompt[-1] == t.special("<|assistant_start|>") and prompt == ids[:len(prompt)]


@pytest.mark.parametrize("msgs", [
    [],
    [{"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
    [{"role": "user", "content": "a"}],
    [{"role": "bot", "content": "a"}],
])
def test_bad_conversations(msgs):
    with pytest.raises(DataError):
        validate_messages(msgs)
