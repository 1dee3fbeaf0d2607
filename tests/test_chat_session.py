"""ChatSession (infer/chat.py): the conversation `gptstack chat` runs through — turns kept in one KV cache, the
system prompt, context overflow, and the /reset /system /temp /quit commands."""

import pytest

from _infer_util import BanHook, tiny_model
from gptstack.errors import ConfigError, PromptError
from gptstack.infer.chat import ChatSession
from gptstack.infer.engine import Engine
from gptstack.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    return Engine(tiny_model(tiny_tokenizer, seq_len=96), tiny_tokenizer)


def greedy(max_tokens=12, **kw):
    return SamplingParams(temperature=0, top_k=50, max_tokens=max_tokens, **kw)


def user_segment(tok, text):
    S = tok.special_ids
    return [S["<|user_start|>"]] + tok.encode(text) + [S["<|user_end|>"], S["<|assistant_start|>"]]


def test_turns_reuse_the_session_and_render_with_special_tokens(engine, tiny_tokenizer):
    tok = tiny_tokenizer
    chat = ChatSession(engine, greedy())
    deltas = []
    first = chat.turn("Hello there my lord", on_delta=deltas.append)
    assert "".join(deltas) == first.text
    end = tok.assistant_end_id
    assert chat.session.tokens == [tok.bos_id] + user_segment(tok, "Hello there my lord") + first.tokens + [end]
    after_first = list(chat.session.tokens)

    appended = []
    real_append = chat.session.append
    chat.session.append = lambda ids: appended.append(list(ids)) or real_append(ids)
    try:
        # what greedy decoding gives after the history, computed from scratch
        want = engine.generate([after_first + user_segment(tok, "What news")], greedy())[0][0]
        second = chat.turn("What news")
    finally:
        del chat.session.append
    assert second.tokens == want.tokens and second.text == want.text
    # the second turn prefilled only its own message (and closed its reply), not the history
    assert appended[0] == user_segment(tok, "What news")
    assert chat.session.tokens[:len(after_first)] == after_first
    assert chat.turns == 2
    assert chat.messages == [{"role": "user", "content": "Hello there my lord"},
                             {"role": "assistant", "content": first.text},
                             {"role": "user", "content": "What news"},
                             {"role": "assistant", "content": second.text}]


def test_a_reply_cut_by_the_budget_is_closed(engine, tiny_tokenizer):
    chat = ChatSession(engine, greedy(max_tokens=3))
    reply = chat.turn("the king")
    assert reply.finish_reason == "length" and len(reply.tokens) == 3
    assert chat.session.tokens[-1] == tiny_tokenizer.assistant_end_id


def test_system_prompt_and_reset(engine, tiny_tokenizer):
    tok = tiny_tokenizer
    S = tok.special_ids
    chat = ChatSession(engine, greedy(), system="You are a king.")
    assert chat.messages == [{"role": "system", "content": "You are a king."}]
    chat.turn("Hail")
    system_ids = [tok.bos_id, S["<|system_start|>"]] + tok.encode("You are a king.") + [S["<|system_end|>"]]
    assert chat.session.tokens[:len(system_ids)] == system_ids
    turn_ids = chat.session.tokens[len(system_ids):]

    r = chat.command("/system Be brief.")
    assert (r.ok, r.message, r.quit) == (True, "system prompt set", False)
    head = [tok.bos_id, S["<|system_start|>"]] + tok.encode("Be brief.") + [S["<|system_end|>"]]
    assert chat.session.tokens == head + turn_ids       # the history is kept under the new system prompt
    assert chat.messages[0] == {"role": "system", "content": "Be brief."} and chat.turns == 1

    r = chat.command("/system")
    assert r.message == "system prompt cleared" and chat.system == ""
    assert chat.session.tokens == [tok.bos_id] + turn_ids

    chat.set_system("Speak as a queen.")
    r = chat.command("/reset")
    assert r.message == "conversation reset" and chat.turns == 0 and chat.session.tokens == []
    assert chat.messages == [{"role": "system", "content": "Speak as a queen."}]   # reset keeps the system prompt
    chat.turn("Again")
    assert chat.session.tokens[:2] == [tok.bos_id, S["<|system_start|>"]] and chat.turns == 1


def test_a_system_prompt_with_no_room_for_a_reply_is_refused(engine):
    chat = ChatSession(engine, greedy())
    chat.turn("Hello")
    before = list(chat.session.tokens)
    r = chat.command("/system " + "very long " * 60)
    assert not r.ok and r.message.startswith("error: ") and "leaves no room for a reply" in r.message
    assert "kept the previous one" in r.message
    assert chat.system == "" and chat.session.tokens == before
    with pytest.raises(PromptError, match="leaves no room"):
        chat.set_system("very long " * 60)
    with pytest.raises(PromptError, match="leaves no room"):
        ChatSession(engine, greedy(), system="very long " * 60)


def test_overflow_drops_the_oldest_turns_with_a_notice(engine):
    notices = []
    chat = ChatSession(engine, SamplingParams(temperature=1.0, seed=0, max_tokens=40), on_notice=notices.append)
    users = [f"Speak of the {w} good lady" for w in ("king", "queen", "lord", "night", "sword", "crown")]
    for u in users:
        chat.turn(u)
        assert len(chat.session.tokens) <= engine.max_context
    dropped = [n for n in notices if n.startswith("context full: dropped the ")]
    assert dropped and all(n.endswith(" oldest turn(s)") for n in dropped)
    total = sum(int(n.split()[4]) for n in dropped)
    assert chat.turns == len(users) - total
    kept = [m["content"] for m in chat.messages if m["role"] == "user"]
    assert kept == users[len(users) - chat.turns:]      # the newest turns are the ones kept


def test_a_message_too_long_for_the_context_is_a_prompt_error(engine):
    chat = ChatSession(engine, greedy())
    chat.turn("Hello")
    before, turns = list(chat.session.tokens), chat.turns
    with pytest.raises(PromptError, match="does not fit the 96-token context"):
        chat.turn("the king " * 80)
    with pytest.raises(PromptError, match="empty"):
        chat.turn("   ")
    assert chat.session.tokens == before and chat.turns == turns
    chat.turn("Still here")                               # and the conversation goes on
    assert chat.turns == turns + 1


def test_temp_command_validates(engine):
    chat = ChatSession(engine, SamplingParams(temperature=0.7, max_tokens=8))
    for bad in ("/temp", "/temp -1", "/temp hot", "/temp nan", "/temp inf"):
        r = chat.command(bad)
        assert (r.ok, r.message) == (False, "usage: /temp T with T >= 0"), bad
        assert chat.params.temperature == 0.7
    r = chat.command("/temp 0")
    assert (r.ok, r.message) == (True, "temperature 0.0") and chat.params.temperature == 0.0
    chat.set_temperature(1.25)
    assert chat.params.temperature == 1.25
    with pytest.raises(ConfigError):
        chat.set_temperature(-0.5)
    assert chat.params.temperature == 1.25


def test_quit_and_unknown_commands(engine):
    chat = ChatSession(engine, greedy())
    assert chat.command("/quit").quit
    r = chat.command("/bogus stuff")
    assert not r.ok and not r.quit and r.message == "unknown command /bogus; commands: /reset /system TEXT /temp T /quit"
    assert ChatSession.is_command("/reset") and not ChatSession.is_command("hello /reset")


def test_an_interrupted_turn_is_rolled_back(engine, tiny_tokenizer):
    chat = ChatSession(engine, greedy(max_tokens=20))
    chat.turn("Hello")
    before, turns = list(chat.session.tokens), chat.turns

    def interrupt(delta):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chat.turn("What news of the king", on_delta=interrupt)
    assert chat.session.tokens == before and chat.turns == turns
    want = engine.generate([before + user_segment(tiny_tokenizer, "Again")], greedy(max_tokens=20))[0][0]
    assert chat.turn("Again").tokens == want.tokens     # the cache is consistent with the rolled-back history


def test_hooks_apply_to_every_reply(engine):
    free = ChatSession(engine, greedy(max_tokens=16))
    reply = free.turn("Hello there my lord")
    assert reply.tokens
    ban = BanHook(reply.tokens[0])
    chat = ChatSession(engine, greedy(max_tokens=16), hooks=[ban])
    for text in ("Hello there my lord", "What news", "Fair day"):
        assert ban.token not in chat.turn(text).tokens
    assert ban.calls > 0


def test_retrieval_augments_the_message_but_history_keeps_the_original(tiny_tokenizer):
    from gptstack.infer.retrieval import augment, build_index

    engine = Engine(tiny_model(tiny_tokenizer, seq_len=384), tiny_tokenizer)
    index = build_index([("a.txt", "The capital of Zorvania is Kelmith."), ("b.txt", "Night falls on the lady.")],
                        embedder="bm25")
    chat = ChatSession(engine, greedy(max_tokens=8), index=index, passages=1)
    chat.turn("What is the capital of Zorvania?")
    want = augment("What is the capital of Zorvania?", index.search("What is the capital of Zorvania?", 1))
    assert "Kelmith" in want
    seg = user_segment(tiny_tokenizer, want)
    assert chat.session.tokens[1:1 + len(seg)] == seg
    assert chat.messages[0] == {"role": "user", "content": "What is the capital of Zorvania?"}


def test_params_are_one_sample(engine):
    chat = ChatSession(engine, SamplingParams(n=4, max_tokens=4, temperature=0))
    assert chat.params.n == 1
