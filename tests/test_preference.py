import json

import pytest

from gptstack.data.preference import (PreferencePair, encode_pair, encode_pairs, load_preferences,
                                      save_preferences)
from gptstack.errors import DataError
from gptstack.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["Hello there, how are you? I am fine, thank you. Answer: 432. " * 30], vocab_size=300)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_strings_messages_and_implicit_prompt(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        "",
        {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
    ])
    pairs = load_preferences(path)
    assert pairs[0] == PreferencePair([{"role": "user", "content": "Hi"}], "Hello!", "Go away.")
    assert pairs[1].prompt[0]["role"] == "system" and pairs[1].chosen == "Hello!" and pairs[1].rejected == "No."
    assert pairs[2] == PreferencePair([{"role": "user", "content": "2+2?"}], "4", "5")
    assert pairs[2].chosen_messages()[-1] == {"role": "assistant", "content": "4"}


@pytest.mark.parametrize("bad,match", [
    ('{"prompt": "x", "chosen": ', "not valid JSON"),
    ({"prompt": "x", "chosen": "a"}, "'chosen' and 'rejected'"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "out of order"),
    ({"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
      "chosen": "a", "rejected": "b"}, "end with a user message"),
    ({"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "one assistant message"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "share"),
])
def test_errors_name_the_line(tmp_path, bad, match):
    good = {"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: .*{match}"):
        load_preferences(path)


def test_empty_and_missing(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no pairs"):
        load_preferences(tmp_path / "e.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_preferences(tmp_path / "nope.jsonl")


def test_save_load_round_trip_is_atomic(tmp_path):
    pairs = [PreferencePair([{"role": "user", "content": "Hi \u00e9"}], "Hello", "Bye"),
             PreferencePair([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "a", "b")]
    path = tmp_path / "sub" / "prefs.jsonl"
    save_preferences(pairs, path)
    assert load_preferences(path) == pairs
    assert [p.name for p in path.parent.iterdir()] == ["prefs.jsonl"]  # no temp file left behind

    class Boom(Exception):
        pass

    def exploding():
        yield pairs[0]
        raise Boom

    with pytest.raises(Boom):
        save_preferences(exploding(), path)
    assert load_preferences(path) == pairs  # the earlier good file is untouched
    assert [p.name for p in path.parent.iterdir()] == ["prefs.jsonl"]


def test_encode_pair_masks_only_the_final_reply(tok):
    prompt = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi"},
              {"role": "user", "content": "how are you?"}]
    pair = PreferencePair(prompt, "I am fine, thank you.", "Go away.")
    c_ids, c_mask, r_ids, r_mask = encode_pair(tok, pair, max_len=200)
    end = tok.special("<|assistant_end|>")
    assert [i for i, m in zip(c_ids, c_mask) if m] == tok.encode("I am fine, thank you.") + [end]
    assert [i for i, m in zip(r_ids, r_mask) if m] == tok.encode("Go away.") + [end]
    n_prompt = len(tok.render_prompt(prompt))
    assert c_ids[:n_prompt] == r_ids[:n_prompt] == tok.render_prompt(prompt)
    assert len(c_ids) == len(c_mask) and len(r_ids) == len(r_mask)


def test_encode_pair_truncation_and_skips(tok):
    pair = PreferencePair([{"role": "user", "content": "Hi"}], "fine " * 50, "no")
    n_prompt = len(tok.render_prompt(pair.prompt))
    c_ids, c_mask, r_ids, r_mask = encode_pair(tok, pair, max_len=n_prompt + 5)
    assert len(c_ids) == n_prompt + 5 and sum(c_mask) == 5
    assert r_ids == tok.render_conversation(pair.rejected_messages())[0]
    too_long = PreferencePair([{"role": "user", "content": "how are you " * 40}], "a", "b")
    with pytest.raises(DataError, match="no room"):
        encode_pair(tok, too_long, max_len=20)
    out, stats = encode_pairs(tok, [pair, too_long], max_len=n_prompt + 5)
    assert len(out) == 1 and stats == {"pairs": 2, "kept": 1, "truncated": 1, "skipped": 1}
