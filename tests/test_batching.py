"""Continuous batching (infer/batch.py): joining a running batch changes no output, rows keep their own
params/stops/hooks, chunked prefill interleaves with decode, the prefix cache reuses KV (counted in prefilled
tokens) and evicts under its budget, a cancelled request leaves at the next step, a finished row is a free
slot a later request is copied into in place, and rows of one request that finish apart keep their seeded text."""

import pytest

from _infer_util import BanHook, tiny_model
from gptstack.infer.batch import Batcher, PrefixCache, Request
from gptstack.infer.engine import Engine
from gptstack.infer.sampling import SamplingParams

GREEDY = dict(temperature=0.0, stop_token_ids=[])


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    return Engine(tiny_model(tiny_tokenizer), tiny_tokenizer)


def ids(tok, text):
    return tok.encode(text, bos=True)


def run_all(batcher, *, until=None, max_steps=2000):
    """Step until idle (or `until()`); events per request: {id(req): [Event, ...]}."""
    got = {}
    for _ in range(max_steps):
        if not batcher.busy or (until is not None and until()):
            break
        for req, ev in batcher.step():
            got.setdefault(id(req), []).append(ev)
    return got


def alone(engine, prompt, params, hooks=()):
    return engine.generate([prompt], params, hooks)[0][0]


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=16, **GREEDY),
                                    SamplingParams(max_tokens=16, temperature=0.9, top_k=40, seed=7,
                                                   stop_token_ids=[])])
def test_joining_a_running_batch_gives_the_same_output_as_alone(engine, tiny_tokenizer, params):
    first = ids(tiny_tokenizer, "Thou art a noble lord and the queen")
    late = ids(tiny_tokenizer, "The king")
    b = Batcher(engine, chunk=8)
    r1 = b.add(Request(engine, [first], params))
    for _ in range(5):                 # r1 is decoding when r2 arrives
        b.step()
    assert r1.flat[0].tokens
    r2 = b.add(Request(engine, [late], params))
    run_all(b)
    assert r1.flat[0].tokens == alone(engine, first, params).tokens
    assert r2.flat[0].tokens == alone(engine, late, params).tokens
    assert r2.flat[0].text == alone(engine, late, params).text


def test_rows_with_different_params_stops_and_hooks_share_a_batch(engine, tiny_tokenizer):
    prompts = [ids(tiny_tokenizer, t) for t in ["The king", "Sweet lady", "Hear me, good lord", "Thou"]]
    base = alone(engine, prompts[2], SamplingParams(max_tokens=20, **GREEDY))
    stop = base.text[6:9] if len(base.text) > 9 else base.text[-2:]
    ban = BanHook(alone(engine, prompts[3], SamplingParams(max_tokens=1, **GREEDY)).tokens[0])
    specs = [
        (prompts[0], SamplingParams(max_tokens=5, **GREEDY), ()),
        (prompts[1], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, min_p=0.05, seed=3,
                                    frequency_penalty=0.5, stop_token_ids=[]), ()),
        (prompts[2], SamplingParams(max_tokens=20, stop=[stop], **GREEDY), ()),
        (prompts[3], SamplingParams(max_tokens=9, repetition_penalty=1.3, n=2, temperature=0.8, seed=11,
                                    stop_token_ids=[]), (ban,)),
    ]
    b = Batcher(engine, chunk=4)
    reqs = [b.add(Request(engine, [p], sp, hooks)) for p, sp, hooks in specs]
    got = run_all(b)
    for (p, sp, hooks), req in zip(specs, reqs):
        ref = engine.generate([p], sp, hooks)[0]
        assert [c.tokens for c in req.completions[0]] == [c.tokens for c in ref]
        assert [c.text for c in req.completions[0]] == [c.text for c in ref]
        assert [c.finish_reason for c in req.completions[0]] == [c.finish_reason for c in ref]
        text = {}
        for ev in got[id(req)]:
            text[ev.row] = text.get(ev.row, "") + ev.delta
        assert [text[r] for r in range(req.rows)] == [c.text for c in ref]   # streamed deltas add up
    assert reqs[0].flat[0].finish_reason == "length" and len(reqs[0].flat[0].tokens) == 5
    assert reqs[2].flat[0].finish_reason == "stop" and stop not in reqs[2].flat[0].text
    assert all(ban.token not in c.tokens for c in reqs[3].completions[0])


def test_grammar_rows_join_a_batch(engine, tiny_tokenizer):
    import json

    from gptstack.infer.constrained import GrammarHook, compile_grammar, grammar_params

    schema = {"type": "object", "properties": {"kingdom": {"enum": ["Denmark", "Scotland"]},
                                               "ruler": {"const": "the old king"},
                                               "note": {"type": "string", "minLength": 2, "maxLength": 6}},
              "required": ["kingdom", "ruler", "note"], "additionalProperties": False}
    grammar = compile_grammar(json_schema=schema, tokenizer=tiny_tokenizer)
    params = grammar_params(SamplingParams(max_tokens=100, seed=3), tiny_tokenizer)
    p = ids(tiny_tokenizer, "Give me JSON")
    ref = alone(engine, p, params, [GrammarHook(tiny_tokenizer, grammar, engine.config.vocab_size)])
    b = Batcher(engine, chunk=16)
    plain = b.add(Request(engine, [ids(tiny_tokenizer, "The king")], SamplingParams(max_tokens=30, **GREEDY)))
    b.step()
    g = b.add(Request(engine, [p], params, [GrammarHook(tiny_tokenizer, grammar, engine.config.vocab_size)]))
    run_all(b)
    assert g.flat[0].tokens == ref.tokens and g.flat[0].finish_reason == "stop"
    assert json.loads(g.flat[0].text)["ruler"] == "the old king"
    assert plain.flat[0].tokens == alone(engine, plain.prompts[0], plain.params).tokens


def test_chunked_prefill_interleaves_with_decode(engine, tiny_tokenizer):
    short = ids(tiny_tokenizer, "The king")
    long = ids(tiny_tokenizer, " ".join(["Now is the winter of our discontent"] * 3))
    assert 60 < len(long) < 120, len(long)
    params = SamplingParams(max_tokens=40, **GREEDY)
    b = Batcher(engine, chunk=8)
    running = b.add(Request(engine, [short], params))
    b.step()
    joining = b.add(Request(engine, [long], SamplingParams(max_tokens=4, **GREEDY)))
    produced_while_prefilling = 0
    steps = 0
    while joining._pf is not None or joining in b.waiting:
        before = len(running.flat[0].tokens)
        b.step()
        steps += 1
        produced_while_prefilling += len(running.flat[0].tokens) - before
    # at most 8 prompt tokens per step: the long prompt took several steps, and the stream went on in each
    assert steps >= len(long) // 8
    assert produced_while_prefilling >= steps - 1
    run_all(b)
    assert joining.prefilled == len(long)
    assert running.flat[0].tokens == alone(engine, short, params).tokens
    assert joining.flat[0].tokens == alone(engine, long, joining.params).tokens


def test_prefix_cache_reuses_a_conversation_history(engine, tiny_tokenizer):
    tok = tiny_tokenizer
    params = SamplingParams(max_tokens=10, temperature=0.0)
    cache = PrefixCache(budget_tokens=4096)
    b = Batcher(engine, chunk=32, prefix_cache=cache)
    turn1 = tok.render_prompt([{"role": "user", "content": "What of the crown, good lord?"}])
    r1 = b.add(Request(engine, [turn1], params))
    run_all(b)
    assert b.prefilled_tokens == len(turn1)
    reply = r1.flat[0]
    history = turn1 + reply.tokens + [tok.assistant_end_id]
    new_msg = tok.render_prompt([{"role": "user", "content": "And the queen?"}])[1:]   # without <|bos|>
    turn2 = history + new_msg
    before = b.prefilled_tokens
    r2 = b.add(Request(engine, [turn2], params))
    run_all(b)
    prefilled = b.prefilled_tokens - before
    # only the new message (plus the last reply token and the stop token, never fed back) is computed
    assert prefilled == len(turn2) - (len(turn1) + len(reply.tokens) - 1)
    assert prefilled <= len(new_msg) + 2 and r2.reused == len(turn2) - prefilled
    assert r2.flat[0].tokens == alone(engine, turn2, params).tokens   # reuse changes nothing


def test_prefix_cache_evicts_least_recently_used_under_its_budget(engine, tiny_tokenizer):
    params = SamplingParams(max_tokens=4, **GREEDY)
    prompts = [ids(tiny_tokenizer, t) for t in ["The king is dead", "Sweet lady, good night", "Thou art a lord"]]
    budget = max(len(p) + 4 for p in prompts) + 2     # room for about one sequence
    cache = PrefixCache(budget_tokens=budget)
    b = Batcher(engine, prefix_cache=cache)
    for p in prompts:
        b.add(Request(engine, [p], params))
        run_all(b)
        assert cache.tokens <= budget
    assert len(cache.entries) == 1 and list(cache.entries)[0][:len(prompts[2])] == tuple(prompts[2])
    (kept,) = cache.entries
    shared = next(i for i, (x, y) in enumerate(zip(kept, prompts[0] + [5, 6])) if x != y)   # <|bos|> at least
    before = b.prefilled_tokens
    b.add(Request(engine, [prompts[0] + [5, 6]], params))    # evicted: computed again (but the shared start)
    run_all(b)
    assert b.prefilled_tokens - before == len(prompts[0]) + 2 - shared
    before = b.prefilled_tokens
    b.add(Request(engine, [prompts[0] + [5, 6, 7]], params))  # the entry just made is reused
    run_all(b)
    assert b.prefilled_tokens - before < 4


def test_cancel_frees_the_row_at_the_next_step(engine, tiny_tokenizer):
    params = SamplingParams(max_tokens=50, **GREEDY)
    b = Batcher(engine)
    a = b.add(Request(engine, [ids(tiny_tokenizer, "The king")], params))
    c = b.add(Request(engine, [ids(tiny_tokenizer, "Thou art")], params))
    for _ in range(3):
        b.step()
    assert len(b.row_req) == 2
    n_a = len(a.flat[0].tokens)
    b.cancel(a)
    b.step()
    assert b.row_req == [c] and len(a.flat[0].tokens) == n_a and a.done
    run_all(b)
    assert c.flat[0].tokens == alone(engine, c.prompts[0], params).tokens
    assert not b.busy and b.cache is None


def test_a_finished_row_is_a_free_slot_that_a_joining_request_takes_in_place(engine, tiny_tokenizer):
    params = lambda n: SamplingParams(max_tokens=n, **GREEDY)   # noqa: E731
    b = Batcher(engine, chunk=64)
    reqs = [b.add(Request(engine, [ids(tiny_tokenizer, t)], params(n)))
            for t, n in [("Thou art a noble lord", 40), ("Sweet lady", 30), ("The king", 3)]]
    run_all(b, until=lambda: reqs[2].done)
    assert b.row_req[2] is None and b.live_rows == 2          # its row stays, free (1 free < 2 live)
    k = b.cache.k
    late = b.add(Request(engine, [ids(tiny_tokenizer, "Hear me")], params(12)))
    run_all(b, until=lambda: late in b.row_req)
    assert b.row_req[2] is late and b.cache.k is k             # copied into the slot, the cache not rebuilt
    run_all(b)
    for r in reqs + [late]:
        assert r.flat[0].tokens == alone(engine, r.prompts[0], r.params).tokens
    assert not b.busy and b.cache is None


def test_rows_of_one_request_finishing_apart_keep_their_seeded_text(engine, tiny_tokenizer):
    """n samples whose rows end at different steps (a hook ends row r after 2 + 3r tokens) next to another
    request: every sample is the one it is alone (the request's rows stay contiguous, one draw per step)."""
    class EndEarly:
        def __init__(self):
            self.n = {}

        def start(self, n_rows):
            self.n = {r: 0 for r in range(n_rows)}

        def process(self, logits, rows):
            return logits

        def accept(self, rows, tokens):
            for r in rows.tolist():
                self.n[r] += 1

        def finished(self, row):
            return self.n[row] >= 2 + 3 * row

    p = ids(tiny_tokenizer, "Good night")
    sp = SamplingParams(n=4, max_tokens=30, temperature=1.0, seed=21, stop_token_ids=[])
    ref = engine.generate([p], sp, [EndEarly()])[0]
    b = Batcher(engine, chunk=64)
    other = b.add(Request(engine, [ids(tiny_tokenizer, "The king")], SamplingParams(max_tokens=30, **GREEDY)))
    b.step()
    req = b.add(Request(engine, [p], sp, [EndEarly()]))
    run_all(b)
    assert [c.tokens for c in req.completions[0]] == [c.tokens for c in ref]
    assert [len(c.tokens) for c in ref] == [2, 5, 8, 11]
    assert other.flat[0].tokens == alone(engine, other.prompts[0], other.params).tokens


def test_max_rows_holds_requests_back_until_rows_leave(engine, tiny_tokenizer):
    params = SamplingParams(max_tokens=6, **GREEDY)
    b = Batcher(engine, max_rows=2)
    reqs = [b.add(Request(engine, [ids(tiny_tokenizer, t)], params)) for t in ["The", "Sweet", "Thou", "Hear"]]
    widths = []
    while b.busy:
        b.step()
        widths.append(len(b.row_req))
    assert max(widths) <= 2
    for r in reqs:
        assert r.flat[0].tokens == alone(engine, r.prompts[0], params).tokens


def test_scheduler_streams_equal_alone_and_cancel_leaves(engine, tiny_tokenizer):
    import asyncio

    from gptstack.serve.scheduler import Delta, GenRequest, Scheduler

    sch = Scheduler(engine, max_batch=4, max_queue=16, prefill_chunk=8)
    sch.start()
    params = SamplingParams(max_tokens=20, **GREEDY)
    prompts = [ids(tiny_tokenizer, t) for t in ["The king", "Sweet lady", "Thou art", "Hear me", "Good night"]]

    async def one(p, cancel_after=None):
        h = sch.submit(GenRequest(prompts=[p], params=params))
        text, result, n = "", None, 0
        async for item in h:
            if isinstance(item, Delta):
                text, n = text + item.text, n + 1
                if cancel_after and n >= cancel_after:
                    h.cancel()
                    return None
            else:
                result = item
        return text, result

    async def main():
        return await asyncio.gather(*[one(p) for p in prompts], one(prompts[0], cancel_after=2))

    try:
        out = asyncio.run(main())
        for p, (text, result) in zip(prompts, out):
            ref = alone(engine, p, params)
            assert text == ref.text == result.choices[0].text and result.completion_tokens == len(ref.tokens)
        stats = sch.stats()
        assert stats["running"] == 0 and stats["batched_requests"] == 6 and stats["prefix_reused_tokens"] > 0
    finally:
        sch.close()
