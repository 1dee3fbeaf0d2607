"""The engine: batching equals one-at-a-time, the cache equals a full forward, per-row stopping, streaming,
logprobs, sessions, and clear errors."""

import pytest
import torch

from _infer_util import tiny_model
from gptstack.errors import ConfigError, PromptError
from gptstack.infer.engine import Engine
from gptstack.infer.sampling import SamplingParams
from gptstack.model.gpt import KVCache

GREEDY = dict(temperature=0.0, stop_token_ids=[])


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    return Engine(tiny_model(tiny_tokenizer), tiny_tokenizer)


def prompts_of(tok, texts):
    return [tok.encode(t, bos=True) for t in texts]


def test_batched_greedy_equals_one_at_a_time(engine, tiny_tokenizer):
    ps = prompts_of(tiny_tokenizer, ["The king", "Thou art a noble lord and the queen", "Sweet"])
    params = SamplingParams(max_tokens=12, **GREEDY)
    together = [c[0].tokens for c in engine.generate(ps, params)]
    alone = [engine.generate([p], params)[0][0].tokens for p in ps]
    assert together == alone
    assert all(len(t) == 12 for t in together)


def test_cached_decode_logits_equal_full_forward(engine, tiny_tokenizer):
    p = tiny_tokenizer.encode("Good night sweet lady", bos=True)
    out = engine.generate([p], SamplingParams(max_tokens=8, **GREEDY))[0][0]
    seq = torch.tensor([p + out.tokens])
    with torch.no_grad():
        full = engine.model(seq)[0]
    # replay the decode with a cache, comparing each step's logits with the full forward's
    cache = KVCache(engine.config, 1, seq.shape[1], "cpu", torch.float32)
    with torch.no_grad():
        logits = engine.model(seq[:, :len(p)], kv_cache=cache)[0, -1]
        assert torch.allclose(logits, full[len(p) - 1], atol=1e-4)
        for i, t in enumerate(out.tokens[:-1]):
            logits = engine.model(torch.tensor([[t]]), kv_cache=cache)[0, -1]
            assert torch.allclose(logits, full[len(p) + i], atol=1e-4)
            assert int(logits.argmax()) == out.tokens[i + 1]


def test_logprobs_match_full_forward_log_softmax(engine, tiny_tokenizer):
    ps = prompts_of(tiny_tokenizer, ["Hear me", "The crown of the king is"])
    outs = engine.generate(ps, SamplingParams(max_tokens=6, temperature=1.0, seed=3, logprobs=True,
                                              stop_token_ids=[]))
    for p, c in zip(ps, outs):
        c = c[0]
        seq = torch.tensor([p + c.tokens])
        with torch.no_grad():
            lsm = torch.log_softmax(engine.model(seq)[0].float(), dim=-1)
        want = [float(lsm[len(p) - 1 + i, t]) for i, t in enumerate(c.tokens)]
        assert c.logprobs == pytest.approx(want, abs=1e-4)


def test_n_samples_share_one_prefill(engine, tiny_tokenizer):
    calls = []
    hook = engine.model.register_forward_pre_hook(lambda m, args, kw: calls.append(args[0].shape), with_kwargs=True)
    try:
        ps = prompts_of(tiny_tokenizer, ["The lady", "Come hither"])
        out = engine.generate(ps, SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=5, stop_token_ids=[]))
    finally:
        hook.remove()
    assert [c.shape for c in [torch.empty(s) for s in calls[:1]]] == [torch.Size([2, max(map(len, ps))])]
    assert all(s[1] == 1 for s in calls[1:]), "after one prefill every forward is a one-token decode step"
    assert all(s[0] <= 8 for s in calls[1:])
    assert len(out) == 2 and all(len(o) == 4 for o in out)
    assert [(c.prompt_index, c.sample_index) for c in out[1]] == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert len({tuple(c.tokens) for o in out for c in o}) > 1


def test_greedy_deterministic_and_seeded_reproducible(engine, tiny_tokenizer):
    p = prompts_of(tiny_tokenizer, ["Fair day"])
    g = SamplingParams(max_tokens=10, **GREEDY)
    assert engine.generate(p, g)[0][0].tokens == engine.generate(p, g)[0][0].tokens
    s = SamplingParams(max_tokens=10, temperature=1.0, seed=11, n=3, stop_token_ids=[])
    a = [c.tokens for c in engine.generate(p, s)[0]]
    b = [c.tokens for c in engine.generate(p, s)[0]]
    assert a == b


def test_per_row_stopping(engine, tiny_tokenizer):
    ps = prompts_of(tiny_tokenizer, ["The king", "Thou art", "Night"])
    base = [c[0] for c in engine.generate(ps, SamplingParams(max_tokens=10, **GREEDY))]
    # a stop token chosen from row 0's output stops row 0 there and leaves rows that never make it alone
    stop_tok = base[0].tokens[3]
    stopped = [c[0] for c in engine.generate(ps, SamplingParams(max_tokens=10, temperature=0.0,
                                                                 stop_token_ids=[stop_tok]))]
    assert stopped[0].tokens == base[0].tokens[:base[0].tokens.index(stop_tok)]
    assert stopped[0].finish_reason == "stop"
    for s, b in zip(stopped[1:], base[1:]):
        if stop_tok not in b.tokens:
            assert s.tokens == b.tokens and s.finish_reason == "length"
    # a stop string cuts the text before it
    text = base[1].text
    needle = text[len(text) // 2: len(text) // 2 + 2]
    assert needle.strip()
    cut = [c[0] for c in engine.generate(ps, SamplingParams(max_tokens=10, stop=[needle], **GREEDY))]
    assert cut[1].text == text[:text.find(needle)] and cut[1].finish_reason == "stop"
    # max tokens
    short = engine.generate(ps, SamplingParams(max_tokens=3, **GREEDY))
    assert all(len(c[0].tokens) == 3 and c[0].finish_reason == "length" for c in short)


def test_generation_stops_at_context_end(tiny_tokenizer):
    eng = Engine(tiny_model(tiny_tokenizer, seq_len=32), tiny_tokenizer)
    p = [tiny_tokenizer.bos_id] + tiny_tokenizer.encode("the king")[:5]
    c = eng.generate([p], SamplingParams(max_tokens=100, **GREEDY))[0][0]
    assert len(p) + len(c.tokens) == 32 and c.finish_reason == "length"


def test_stream_deltas_concatenate_to_final_text(engine, tiny_tokenizer):
    p = tiny_tokenizer.encode("héllo wörld the", bos=True)
    for stop in ([], ["e "], ["th", "zzz"]):
        params = SamplingParams(max_tokens=30, temperature=1.0, seed=5, stop=stop, stop_token_ids=[])
        final = engine.generate([p], params)[0][0].text
        assert "".join(engine.stream(p, params)) == final
        for s in stop:
            assert s not in final


def test_session_matches_generate_and_keeps_history(engine, tiny_tokenizer):
    p = tiny_tokenizer.encode("Speak, lord", bos=True)
    params = SamplingParams(max_tokens=8, **GREEDY)
    want = engine.generate([p], params)[0][0]
    s = engine.session()
    s.append(p)
    deltas = []
    got = s.generate(params, on_delta=deltas.append)
    assert got.tokens == want.tokens and "".join(deltas) == want.text
    assert s.tokens == p + want.tokens
    # a second turn only prefills the new tokens, and equals generating from the whole history
    more = tiny_tokenizer.encode(" and the queen")
    s.append(more)
    turn2 = s.generate(params)
    assert turn2.tokens == engine.generate([p + want.tokens + more], params)[0][0].tokens
    s.truncate(len(p))
    s.append(more)
    assert s.generate(params).tokens == engine.generate([p + more], params)[0][0].tokens


@pytest.mark.parametrize("prompts,params,err", [
    ([[]], SamplingParams(), PromptError),
    ([], SamplingParams(), PromptError),
    ([list(range(3)) * 60], SamplingParams(), PromptError),     # 180 tokens > 128 context
    ([[1, 2, 3]], SamplingParams(n=0), ConfigError),
    ([[1, 2, 3]], SamplingParams(stop=[""]), ConfigError),
    ([[1, 2, 10 ** 6]], SamplingParams(), PromptError),
])
def test_errors(engine, prompts, params, err):
    with pytest.raises(err):
        engine.generate(prompts, params)


def test_stream_requires_single_sample(engine):
    with pytest.raises(ConfigError):
        list(engine.stream([1, 2], SamplingParams(n=2)))


def test_ragged_chunk_step_equals_token_by_token(engine, tiny_tokenizer):
    """A fast-forward step feeds rows different numbers of tokens (right-aligned, padding invalid, cache grown
    past its first size): each row's logits equal feeding its tokens one at a time in a cache of its own."""
    model, tok = engine.model, tiny_tokenizer
    prompts = prompts_of(tok, ["The king is", "Sweet"])
    extra = [tok.encode(" dead, long live")[:3], tok.encode(" lady")[:1]]
    longest = max(map(len, prompts))
    with torch.no_grad():
        cache = KVCache(model.config, 2, longest + 1, "cpu", torch.float32)   # too small: the step grows it
        ids = torch.zeros(2, longest, dtype=torch.long)
        valid = torch.zeros(2, longest, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p)
            valid[i, longest - len(p):] = True
        pad = (~valid).sum(1)
        model(ids, kv_cache=cache, position_ids=(torch.arange(longest)[None] - pad[:, None]).clamp(min=0),
              new_valid=valid, last_only=True)
        width = max(map(len, extra))
        chunk = torch.zeros(2, width, dtype=torch.long)
        cvalid = torch.zeros(2, width, dtype=torch.bool)
        for i, e in enumerate(extra):
            chunk[i, width - len(e):] = torch.tensor(e)
            cvalid[i, width - len(e):] = True
        lens = cvalid.sum(1)
        start = torch.tensor([len(p) for p in prompts])
        pos = (start[:, None] + torch.arange(width)[None] - (width - lens)[:, None]).clamp(min=0)
        cache.grow(cache.pos + width - cache.max_len)
        batched = model(chunk, kv_cache=cache, position_ids=pos, new_valid=cvalid, last_only=True)[:, -1]
        for i, (p, e) in enumerate(zip(prompts, extra)):
            alone = KVCache(model.config, 1, len(p) + len(e), "cpu", torch.float32)
            model(torch.tensor([p]), kv_cache=alone, position_ids=torch.arange(len(p))[None], last_only=True)
            for j, t in enumerate(e):
                out = model(torch.tensor([[t]]), kv_cache=alone, position_ids=torch.tensor([[len(p) + j]]),
                            last_only=True)[:, -1]
            assert torch.allclose(batched[i], out[0], atol=1e-4)


def test_grammar_masks_overlap_the_forward_pass(engine, tiny_tokenizer):
    """Masks computed on the worker thread during the forward pass (prefetch) are the masks of the rows the
    next step processes: the same seeded outputs with overlap on and off, every step's mask prefetched after
    the first (so the loop's exposed mask time is only waiting and applying), in batches and a session."""
    from gptstack.infer.constrained import GrammarHook, compile_grammar, grammar_params

    tok = tiny_tokenizer
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tags": {"type": "array", "items": {"enum": ["a", "bb"]}}},
              "required": ["name", "age", "tags"], "additionalProperties": False}
    grammar = compile_grammar(json_schema=schema, tokenizer=tok)
    prompts = prompts_of(tok, ["The king", "A longer prompt about the court of Denmark"])
    params = grammar_params(SamplingParams(n=3, seed=5, temperature=1.0, max_tokens=60), tok)

    class Spy(GrammarHook):
        prefetched = computed_sync = 0

        def prefetch(self, rows):
            self.prefetched += 1
            super().prefetch(rows)

        def process(self, logits, rows):
            if self._pending is None or self._pending[0] != rows.tolist():
                self.computed_sync += 1
            return super().process(logits, rows)

    texts = {}
    for overlap in (True, False):
        hook = Spy(tok, grammar, engine.config.vocab_size, overlap=overlap)
        out = engine.generate(prompts, params, hooks=[hook])
        texts[overlap] = [(c.text, c.finish_reason) for o in out for c in o]
        if overlap:
            assert hook.computed_sync == 1 and hook.prefetched >= 1, (hook.computed_sync, hook.prefetched)
        assert hook.mask_seconds > 0 and hook.exposed_seconds > 0
    assert texts[True] == texts[False]

    session_texts = {}
    for overlap in (True, False):
        session = engine.session()
        session.append(tok.encode("The king", bos=True))
        hook = Spy(tok, grammar, engine.config.vocab_size, overlap=overlap)
        c = session.generate(grammar_params(SamplingParams(seed=2, temperature=1.0, max_tokens=60), tok), hooks=[hook])
        session_texts[overlap] = (c.text, list(session.tokens))
        if overlap:
            assert hook.computed_sync == 1, hook.computed_sync
    assert session_texts[True] == session_texts[False]


def test_grammar_forced_tokens_are_fast_forwarded(engine, tiny_tokenizer):
    """With a grammar that fixes most of the text, the engine takes forced tokens without computing masks:
    far fewer mask computations than tokens, the same valid output as without fast-forward."""
    import json

    from gptstack.infer.constrained import GrammarHook, compile_grammar, grammar_params

    tok = tiny_tokenizer
    schema = {"type": "object", "properties": {"kingdom": {"enum": ["Denmark", "Scotland"]},
                                               "ruler": {"const": "the old king"},
                                               "note": {"type": "string", "minLength": 2, "maxLength": 6}},
              "required": ["kingdom", "ruler", "note"], "additionalProperties": False}
    grammar = compile_grammar(json_schema=schema, tokenizer=tok)
    prompts = prompts_of(tok, ["The king", "A long prompt about Denmark and its court"])
    params = grammar_params(SamplingParams(n=2, seed=3, max_tokens=100), tok)
    results = {}
    try:
        for ff in (True, False):
            engine.fast_forward = ff
            hook = GrammarHook(tok, grammar, engine.config.vocab_size)
            out = engine.generate(prompts, params, hooks=[hook])
            texts = [c.text for o in out for c in o]
            n_tokens = sum(len(c.tokens) for o in out for c in o)
            for c in (c for o in out for c in o):
                assert c.finish_reason == "stop", (ff, c.text, len(c.tokens))
                assert json.loads(c.text)["ruler"] == "the old king"
            results[ff] = (hook.mask_calls, n_tokens, texts)
    finally:
        engine.fast_forward = True
    calls_ff, tokens_ff, _ = results[True]
    calls_plain, tokens_plain, _ = results[False]
    # one mask per token without fast-forward (+1 per row when it samples the end token)
    assert tokens_plain <= calls_plain <= tokens_plain + 4
    assert calls_ff < tokens_ff / 2, results     # most tokens are forced

    # rows that run to max_tokens after ragged fast-forward steps need more cache columns than planned
    long_text = {"type": "object", "properties": {
        "ruler": {"enum": ["Denmark and Norway", "Rome"]},   # rows force different tails
        "note": {"type": "string"}}, "required": ["ruler", "note"], "additionalProperties": False}
    hook = GrammarHook(tok, compile_grammar(json_schema=long_text, tokenizer=tok), engine.config.vocab_size)
    out = engine.generate(prompts, grammar_params(SamplingParams(n=4, seed=1, max_tokens=70), tok), hooks=[hook])
    assert {c.text.startswith("{\"ruler\": \"Rome") for o in out for c in o} == {True, False}, [c.text for o in out for c in o]
    assert all(len(c.tokens) <= 70 for o in out for c in o)
    assert any(c.finish_reason == "length" for o in out for c in o)


def test_prompt_lookup_drafts():
    from gptstack.infer.engine import _prompt_lookup

    assert _prompt_lookup([5, 6, 7, 8, 9, 5, 6, 7], 3) == [8, 9, 5]      # after the last earlier "5 6 7"
    assert _prompt_lookup([1, 2, 3, 1, 2], 2) == [3, 1]
    assert _prompt_lookup([1, 2, 3, 4], 4) == []                        # the last token never occurred before
    assert _prompt_lookup([4, 1, 2, 4], 5) == []                        # one token in common is too weak a hint
    assert _prompt_lookup([4, 1, 2, 4], 5, min_ngram=1) == [1, 2, 4]    # cut at the end of the history
    assert _prompt_lookup([1, 2, 1], 0) == []


def test_speculative_greedy_equals_plain_greedy(engine, tiny_tokenizer):
    """Prompt-lookup speculation only changes how many forward passes greedy decoding takes, never what it
    outputs: same tokens, finish reasons and text as one token per pass, with drafts actually accepted."""
    tok = tiny_tokenizer
    prompts = prompts_of(tok, ["The king the king the king the king the king", "Sweet lady, sweet lady, sweet",
                               "Good night"])
    cases = [SamplingParams(max_tokens=40, **GREEDY), SamplingParams(max_tokens=25, temperature=0.0),
             SamplingParams(max_tokens=30, temperature=0.0, stop=["king", "e"])]
    try:
        for params in cases:
            for p in prompts:
                engine.speculate = 0
                plain = engine.generate([p], params)[0][0]
                engine.speculate = 4
                engine.spec_stats = {"forwards": 0, "drafted": 0, "accepted": 0}
                fast = engine.generate([p], params)[0][0]
                assert (fast.tokens, fast.finish_reason, fast.text) == (plain.tokens, plain.finish_reason, plain.text)
                streamed = "".join(engine.stream(p, params))
                assert streamed == plain.text
        engine.spec_stats = {"forwards": 0, "drafted": 0, "accepted": 0}
        out = engine.generate([prompts[0]], SamplingParams(max_tokens=60, **GREEDY))[0][0]
        st = engine.spec_stats
        assert len(out.tokens) == 60 and st["accepted"] > 0 and st["forwards"] < 60
    finally:
        engine.speculate = 0


def test_session_fast_forwards_grammar_tokens_and_keeps_them_in_the_cache(engine, tiny_tokenizer):
    """Session (chat) takes grammar-forced tokens without masks, like events(): valid JSON, far fewer mask
    computations than tokens, the same text with and without fast-forward (greedy), and the session's
    cache holds the whole reply (the next logits equal a fresh prefill's)."""
    import json

    from gptstack.infer.constrained import GrammarHook, compile_grammar, grammar_params

    tok = tiny_tokenizer
    schema = {"type": "object", "properties": {"ruler": {"const": "the old king"},
                                               "kingdom": {"enum": ["Denmark", "Scotland"]}},
              "required": ["ruler", "kingdom"], "additionalProperties": False}
    grammar = compile_grammar(json_schema=schema, tokenizer=tok)
    params = grammar_params(SamplingParams(temperature=0, max_tokens=60), tok)
    out = {}
    try:
        for ff in (True, False):
            engine.fast_forward = ff
            session = engine.session()
            prompt = prompts_of(tok, ["Who rules?"])[0]
            session.append(prompt)
            hook = GrammarHook(tok, grammar, engine.config.vocab_size)
            c = session.generate(params, hooks=[hook])
            assert c.finish_reason == "stop" and json.loads(c.text)["ruler"] == "the old king", c.text
            out[ff] = (c.text, hook.mask_calls, len(c.tokens), list(session.tokens), session._logits)
    finally:
        engine.fast_forward = True
    assert out[True][0] == out[False][0]
    assert out[True][1] < out[True][2] / 2 and out[False][1] >= out[False][2]
    seq = out[True][3]
    fresh = engine._forward(torch.tensor([seq]), KVCache(engine.config, 1, len(seq), "cpu", torch.float32),
                            torch.arange(len(seq))[None])
    assert torch.allclose(out[True][4], fresh, atol=1e-4)
