"""The OpenAI-compatible server, driven by the real `openai` client against uvicorn on a free port: chat and
completions, streaming equal to non-streaming, n, stop, seeds, logprobs, JSON schema, exact usage, every error
status with the server still answering afterwards, disconnects, a full queue, continuous batching
(overlapping requests share decode steps, a cancelled one leaves, nobody's text depends on the neighbours),
and the CLI."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch
import uvicorn

from _infer_util import save_run, tiny_model
from gptstack.infer.engine import Engine
from gptstack.infer.sampling import SamplingParams
from gptstack.serve.app import create_app
from gptstack.serve.config import ServeConfig

KEY = "test-key"
MODEL = "tiny-chat"
SEQ_LEN = 256
USER = [{"role": "user", "content": "Speak, good lord: what of the crown?"}]


# ---- helpers (test_serve_web.py uses them too) -------------------------------------------------------------

def instrumented_engine(model, tok) -> Engine:
    """An engine whose forward passes are counted and can be slowed down (`delay` seconds each) or kept from
    ever choosing a stop token (`ban_stop`), so a reply is long enough to interrupt."""
    engine = Engine(model, tok)
    engine.calls, engine.delay, engine.ban_stop, engine.widths = 0, 0.0, False, []
    forward = engine._forward

    def counted(*args, **kwargs):
        engine.calls += 1
        engine.widths.append(args[0].shape[0])   # rows in this forward pass
        if engine.delay:
            time.sleep(engine.delay)
        logits = forward(*args, **kwargs)
        if engine.ban_stop:
            logits[:, engine.default_stop_ids()] = float("-inf")
        return logits

    engine._forward = counted
    return engine


class RunningServer:
    """uvicorn serving `app` in a thread, on a socket bound here (no port race)."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def wait_idle(server: RunningServer, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        h = server.health()
        if h["running"] == 0 and h["waiting"] == 0:
            return h
        assert time.time() < deadline, f"the worker is still busy: {h}"
        time.sleep(0.02)


# ---- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_model(tiny_tokenizer, seq_len=SEQ_LEN)


@pytest.fixture(scope="module")
def engine(model, tiny_tokenizer):
    return instrumented_engine(model, tiny_tokenizer)


@pytest.fixture(scope="module")
def reference(model, tiny_tokenizer):
    """A separate engine on the same weights, to compare the server's output with."""
    return Engine(model, tiny_tokenizer)


@pytest.fixture(scope="module")
def server(engine):
    s = RunningServer(create_app(engine, MODEL, ServeConfig(api_key=KEY, max_body_bytes=64 * 1024, max_n=8)))
    yield s
    s.close()


@pytest.fixture
def client(server, engine):
    engine.delay, engine.ban_stop = 0.0, False
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(client, **kw):
    return client.chat.completions.create(**{"model": MODEL, "messages": USER, **kw})


def still_serving(client, server):
    """After a refused request: the server answers a normal one, and nothing is left running."""
    r = chat(client, max_tokens=4, temperature=0)
    assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1
    wait_idle(server)


# ---- the API -----------------------------------------------------------------------------------------------

def test_models_health_and_page(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert server.health()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "chat.js" in page.text and "default-src 'none'" in page.headers[
        "content-security-policy"]
    assert httpx.get(server.url + "/static/chat.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(server.url + "/static/..%2Fapp.py").status_code == 404   # only the page's own files


def test_chat_matches_the_engine_with_exact_usage(client, reference, tiny_tokenizer):
    r = chat(client, max_tokens=24, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert abs(r.created - time.time()) < 60
    prompt = tiny_tokenizer.render_prompt(USER)
    want = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0][0]
    c = r.choices[0]
    assert c.index == 0 and c.message.role == "assistant"
    assert c.message.content == want.text and c.finish_reason == (want.finish_reason or "length")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(want.tokens)
    assert r.usage.total_tokens == len(prompt) + len(want.tokens)


def test_content_parts_system_and_developer_roles(client, reference, tiny_tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Good night"},
            {"role": "assistant", "content": "Sweet lady"}, {"role": "user", "content": "The king"}]
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             *msgs[1:]]
    a = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens == len(tiny_tokenizer.render_prompt(msgs))


def test_stream_equals_non_stream(client):
    full = chat(client, max_tokens=40, temperature=0)
    chunks = list(chat(client, max_tokens=40, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(ch.object == "chat.completion.chunk" and ch.model == MODEL for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    body, last = chunks[:-1], chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert all(ch.usage is None for ch in body)
    text = "".join(ch.choices[0].delta.content or "" for ch in body)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in body if ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert body[-1].choices[0].finish_reason is not None   # the last choice chunk carries it


def test_stream_without_usage_and_with_n(client):
    chunks = list(chat(client, max_tokens=12, temperature=0.9, seed=5, n=3, stream=True))
    assert all(ch.choices for ch in chunks)   # no usage chunk unless asked for
    texts, finishes = {}, {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                assert c.index not in finishes, "finish_reason twice"
                finishes[c.index] = c.finish_reason
    assert sorted(finishes) == [0, 1, 2]
    full = chat(client, max_tokens=12, temperature=0.9, seed=5, n=3)
    assert [texts[i] for i in range(3)] == [c.message.content for c in full.choices]


def test_n_and_seed_reproducibility(client):
    a = chat(client, n=2, max_tokens=16, temperature=1.0, seed=1234)
    b = chat(client, n=2, max_tokens=16, temperature=1.0, seed=1234)
    c = chat(client, n=2, max_tokens=16, temperature=1.0, seed=99)
    assert [ch.index for ch in a.choices] == [0, 1]
    texts = [ch.message.content for ch in a.choices]
    assert texts == [ch.message.content for ch in b.choices]
    assert texts != [ch.message.content for ch in c.choices]
    assert texts[0] != texts[1]   # two samples, not one twice
    # usage counts the prompt once and every choice's tokens
    lp = chat(client, n=2, max_tokens=16, temperature=1.0, seed=1234, logprobs=True)
    assert [ch.message.content for ch in lp.choices] == texts
    assert lp.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in lp.choices)
    assert lp.usage.prompt_tokens == a.usage.prompt_tokens


def test_stop_strings(client):
    full = chat(client, max_tokens=40, temperature=0).choices[0].message.content
    assert len(full) > 12, full
    stop = full[6:9]
    cut = full[:full.index(stop)]
    r = chat(client, max_tokens=40, temperature=0, stop=stop)
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    r = chat(client, max_tokens=40, temperature=0, stop=["\x00never", stop])
    assert r.choices[0].message.content == cut
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       chat(client, max_tokens=40, temperature=0, stop=stop, stream=True))
    assert streamed == cut


def test_logprobs(client, model, tiny_tokenizer):
    r = chat(client, max_tokens=10, temperature=0.8, seed=3, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    prompt = tiny_tokenizer.render_prompt(USER)
    # each entry is one token: recover its id from its bytes, and check against a full forward pass
    by_bytes = {tiny_tokenizer.decode_bytes([i]): i for i in range(tiny_tokenizer.vocab_size)}
    toks = [by_bytes[bytes(e.bytes)] for e in content]
    assert tiny_tokenizer.decode(toks) == r.choices[0].message.content
    with torch.no_grad():
        lsm = torch.log_softmax(model(torch.tensor([prompt + toks]))[0].float(), dim=-1)
    for i, e in enumerate(content):
        row = lsm[len(prompt) - 1 + i]
        assert e.logprob == pytest.approx(float(row[toks[i]]), abs=1e-4)
        assert len(e.top_logprobs) == 3
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].logprob == pytest.approx(float(row.max()), abs=1e-4)
        assert e.top_logprobs[0].logprob >= e.logprob - 1e-6
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    # greedy: the chosen token is the most likely one
    g = chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=1).choices[0].logprobs.content
    assert all(e.token == e.top_logprobs[0].token and e.logprob == e.top_logprobs[0].logprob for e in g)
    # logprobs without alternatives, and none unless asked
    assert chat(client, max_tokens=3, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []
    assert chat(client, max_tokens=3).choices[0].logprobs is None
    # streamed logprobs cover the streamed tokens
    chunks = list(chat(client, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    full = chat(client, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in full]


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}


def test_response_format_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in (0, 1):
        r = chat(client, max_tokens=120, temperature=0.7, seed=seed, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       chat(client, max_tokens=120, temperature=0, response_format=fmt, stream=True))
    jsonschema.validate(json.loads(streamed), SCHEMA)
    assert streamed == chat(client, max_tokens=120, temperature=0, response_format=fmt).choices[0].message.content
    # n choices all follow the schema
    for c in chat(client, n=3, max_tokens=120, temperature=1.0, seed=4, response_format=fmt).choices:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_json_object_regex_and_extras(client):
    r = chat(client, max_tokens=60, temperature=0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    r = chat(client, max_tokens=30, temperature=0.9, seed=2, extra_body={"regex": "(yes|no), [0-9]{3}"})
    assert r.choices[0].finish_reason == "stop"
    import re
    assert re.fullmatch(r"(yes|no), [0-9]{3}", r.choices[0].message.content)
    r = chat(client, max_tokens=30, temperature=0.9, seed=2,
             extra_body={"grammar": 'start: "ab" NUM\nNUM: /[0-9]{2}/'})
    assert re.fullmatch(r"ab[0-9]{2}", r.choices[0].message.content)
    # top_k=1 is greedy whatever the temperature; min_p and the penalties are accepted
    greedy = chat(client, max_tokens=12, temperature=0).choices[0].message.content
    assert chat(client, max_tokens=12, temperature=1.5, seed=8, extra_body={"top_k": 1}).choices[0].message.content \
        == greedy
    chat(client, max_tokens=8, temperature=1.0, seed=1, frequency_penalty=1.5, presence_penalty=0.5,
         extra_body={"min_p": 0.1, "repetition_penalty": 1.2, "an_unknown_field": [1, 2]})


def test_logit_bias_bans_tokens(client, tiny_tokenizer):
    greedy = chat(client, max_tokens=10, temperature=0, logprobs=True).choices[0].logprobs.content
    by_bytes = {tiny_tokenizer.decode_bytes([i]): i for i in range(tiny_tokenizer.vocab_size)}
    first = by_bytes[bytes(greedy[0].bytes)]
    r = chat(client, max_tokens=10, temperature=0, logprobs=True, logit_bias={str(first): -100})
    assert all(by_bytes[bytes(e.bytes)] != first for e in r.choices[0].logprobs.content)


def test_completions(client, reference, tiny_tokenizer):
    prompt = "The king hath"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    want = reference.generate([tiny_tokenizer.encode(prompt, bos=True)], SamplingParams(temperature=0, max_tokens=12))
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].text == want[0][0].text
    assert r.usage.prompt_tokens == len(tiny_tokenizer.encode(prompt, bos=True))
    assert r.usage.completion_tokens == len(want[0][0].tokens)
    # echo, several prompts, logprobs in the completions format
    r = client.completions.create(model=MODEL, prompt=[prompt, "Sweet"], max_tokens=5, temperature=0, echo=True,
                                  logprobs=2, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith(prompt) and r.choices[2].text.startswith("Sweet")
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset[0] == len(prompt) and all(len(t) <= 2 for t in lp.top_logprobs)
    # token-id prompts and streaming
    ids = tiny_tokenizer.encode(prompt, bos=True)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == want[0][0].text
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want[0][0].text
    assert chunks[-1].usage.completion_tokens == len(want[0][0].tokens)
    # default max_tokens is OpenAI's 16
    assert client.completions.create(model=MODEL, prompt=prompt, temperature=0).usage.completion_tokens <= 16


def test_max_tokens_is_capped_by_the_context(client, tiny_tokenizer):
    long_user = [{"role": "user", "content": "the " * 100}]
    prompt = tiny_tokenizer.render_prompt(long_user)
    assert 100 < len(prompt) < SEQ_LEN
    r = client.chat.completions.create(model=MODEL, messages=long_user, max_tokens=10_000, temperature=0,
                                       logit_bias={str(i): -100 for i in (tiny_tokenizer.assistant_end_id,
                                                                         tiny_tokenizer.bos_id)})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == SEQ_LEN - len(prompt)
    r = client.chat.completions.create(model=MODEL, messages=long_user, max_completion_tokens=3, max_tokens=50)
    assert r.usage.completion_tokens <= 3   # max_completion_tokens wins


# ---- errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, param, text", [
    (dict(temperature=5), "temperature", "temperature must be in [0, 2]"),
    (dict(top_p=0), "top_p", "top_p"),
    (dict(n=9), "n", "n must be"),
    (dict(max_tokens=0), "max_tokens", "max_tokens"),
    (dict(stop=[""]), "stop", "must not be empty"),
    (dict(top_logprobs=3), "top_logprobs", "needs logprobs"),
    (dict(logit_bias={"99999": 5}), "logit_bias", "outside the vocabulary"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role", "system, user, assistant or tool"),
    (dict(messages=[{"role": "assistant", "content": "hi"}, {"role": "system", "content": "x"}]), "messages",
     "system message"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0]", "only text"),
    (dict(messages=[]), "messages", "non-empty"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
     "response_format", "schema"),
    (dict(response_format={"type": "xml"}), "response_format", "json_object or json_schema"),
    (dict(extra_body={"regex": "(unclosed"}), "regex", "regex"),
    (dict(extra_body={"regex": "a", "grammar": "start: \"b\""}), "response_format", "one constraint"),
    (dict(extra_body={"functions": [{"name": "f", "parameters": {}}]}), "functions", "legacy functions"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}], tool_choice="sometimes"),
     "tool_choice", "tool_choice must be"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
          tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice", "not among the tools"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
          response_format={"type": "json_object"}), "tools", "not both"),
    (dict(tools=[{"type": "function"}]), "tools", "tools[0] must be"),
    (dict(messages=[*USER, {"role": "tool", "tool_call_id": "call_x", "content": "6"}]), "messages",
     "without a preceding assistant tool call"),
])
def test_bad_parameters_are_400(client, server, kw, param, text):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, **{"max_tokens": 4, **kw})
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param and text in err["message"], err
    still_serving(client, server)


def test_prompt_longer_than_the_context(client, server, tiny_tokenizer):
    msgs = [{"role": "user", "content": "the king " * 200}]
    over = len(tiny_tokenizer.render_prompt(msgs)) - SEQ_LEN + 1
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=msgs)
    assert e.value.body["code"] == "context_length_exceeded"
    assert f"shorten it by {over} tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="the king " * 200)
    still_serving(client, server)


def test_auth_model_size_and_routes(client, server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": USER})
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200   # health needs no key
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert e.value.body["code"] == "model_not_found" and MODEL in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.APIStatusError) as e:
        chat(client, messages=[{"role": "user", "content": "x" * 70_000}])
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"[1, 2]", headers=auth)
    assert r.status_code == 400
    r = httpx.get(server.url + "/v1/nothing", headers=auth)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    still_serving(client, server)


def test_disconnect_mid_stream_stops_generation(client, server, engine):
    engine.delay, engine.ban_stop = 0.01, True     # ~100 tokens/s, and no early stop token
    stream = chat(client, max_tokens=200, temperature=0, stream=True)
    got = 0
    for ch in stream:
        got += bool(ch.choices and ch.choices[0].delta.content)
        if got >= 3:
            break
    start = engine.calls
    stream.close()
    wait_idle(server, timeout=5)
    stopped_at = engine.calls
    time.sleep(0.3)
    assert engine.calls == stopped_at, "generation went on after the client left"
    assert stopped_at - start < 100, f"{stopped_at - start} steps after the disconnect"
    engine.delay, engine.ban_stop = 0.0, False
    still_serving(client, server)


def test_non_stream_disconnect_cancels(server, engine):
    engine.delay, engine.ban_stop = 0.01, True
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/v1/chat/completions", timeout=0.3, headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": MODEL, "messages": USER, "max_tokens": 200, "temperature": 0})
        h = wait_idle(server, timeout=5)
        assert h["running"] == 0
    finally:
        engine.delay, engine.ban_stop = 0.0, False


# ---- queue and continuous batching (a server of their own) -------------------------------------------------

class NoStop:
    """The reference engine's counterpart of `engine.ban_stop`: the default stop tokens are never chosen."""

    def __init__(self, engine):
        self.ids = engine.default_stop_ids()

    def start(self, n_rows):
        pass

    def process(self, logits, rows):
        logits = logits.clone()
        logits[:, self.ids] = float("-inf")
        return logits

    def accept(self, rows, tokens):
        pass

    def finished(self, row):
        return False


def streamed_text(stream) -> str:
    return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)


def test_full_queue_is_503_and_overlapping_requests_share_steps(model, tiny_tokenizer, reference):
    engine = instrumented_engine(model, tiny_tokenizer)
    srv = RunningServer(create_app(engine, MODEL, ServeConfig(max_queue=4, max_batch=4)))
    try:
        cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        engine.delay, engine.ban_stop = 0.01, True      # >= 0.6 s per request: all four overlap
        prompts = ["The king", "Sweet lady, good night", "Thou art", "Hear me, good lord"]
        mark = len(engine.widths)
        streams = [cl.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                              max_tokens=60, temperature=0, stream=True) for p in prompts]
        h = srv.health()
        assert h["running"] + h["waiting"] == 4, h
        t0 = time.time()
        with pytest.raises(openai.InternalServerError) as e:   # 4 waiting or running = the limit: refused now
            cl.chat.completions.create(model=MODEL, messages=USER, max_tokens=4)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full" and time.time() - t0 < 5
        texts = [streamed_text(s) for s in streams]
        widths = engine.widths[mark:]
        after = wait_idle(srv)
        # they ran together: one decode pass served all four rows (60 tokens each: 240 passes one at a time)
        assert max(widths) == 4 and len(widths) < 120, widths
        assert after["batched_requests"] == 4 and after["batches"] == 1
        for p, text in zip(prompts, texts):   # each text is what the request gives alone
            ids = tiny_tokenizer.render_prompt([{"role": "user", "content": p}])
            alone = reference.generate([ids], SamplingParams(temperature=0, max_tokens=60), [NoStop(reference)])
            assert text == alone[0][0].text and len(alone[0][0].tokens) == 60
        engine.delay, engine.ban_stop = 0.0, False
        r = cl.chat.completions.create(model=MODEL, messages=USER, max_tokens=4)   # serving again
        assert r.usage.completion_tokens >= 1
    finally:
        srv.close()


def test_cancelling_one_request_of_a_batch_keeps_the_other(model, tiny_tokenizer, reference):
    engine = instrumented_engine(model, tiny_tokenizer)
    srv = RunningServer(create_app(engine, MODEL, ServeConfig(max_batch=4)))
    try:
        cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        engine.delay, engine.ban_stop = 0.01, True
        params = dict(model=MODEL, max_tokens=60, temperature=0, stream=True)
        a = cl.chat.completions.create(messages=[{"role": "user", "content": "The king"}], **params)
        b = cl.chat.completions.create(messages=[{"role": "user", "content": "Thou art"}], **params)
        a_iter, b_iter = iter(a), iter(b)
        b_text = ""
        for _ in range(4):
            next(a_iter)
            ch = next(b_iter)
            b_text += ch.choices[0].delta.content or "" if ch.choices else ""
        assert srv.health()["running"] == 2
        mark = len(engine.widths)
        a.close()
        b_text += streamed_text(b_iter)
        wait_idle(srv)
        widths = engine.widths[mark:]
        assert widths[-1] == 1 and widths.count(2) < 20, widths   # a's row left the batch, b's went on
        ids = tiny_tokenizer.render_prompt([{"role": "user", "content": "Thou art"}])
        alone = reference.generate([ids], SamplingParams(temperature=0, max_tokens=60), [NoStop(reference)])[0][0]
        assert b_text == alone.text and len(alone.tokens) == 60
    finally:
        srv.close()


def test_concurrent_requests_keep_their_own_text(model, tiny_tokenizer):
    """Under concurrency (rows joining and leaving one batch) a greedy stream equals the non-streamed reply,
    and a seeded sample is the same text it is alone: nothing depends on the neighbours."""
    engine = instrumented_engine(model, tiny_tokenizer)
    srv = RunningServer(create_app(engine, MODEL, ServeConfig(max_batch=8, max_queue=64)))
    try:
        cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        lines = ["The king", "Sweet lady, good night", "Thou art", "Hear me, good lord", "What of the crown?",
                 "Speak", "Good night, sweet prince", "My lord"]
        jobs = []
        for i, line in enumerate(lines):
            msgs = [{"role": "user", "content": line}]
            jobs.append(dict(messages=msgs, max_tokens=24 + 4 * i, temperature=0))
            jobs.append(dict(messages=msgs, max_tokens=24 + 4 * i, temperature=0, stream=True))
            jobs.append(dict(messages=msgs, max_tokens=20, temperature=1.0, seed=100 + i, n=2))
            jobs.append(dict(messages=msgs, max_tokens=20, temperature=0.8, top_p=0.9, seed=7, stream=True))

        def run(job):
            r = cl.chat.completions.create(model=MODEL, **job)
            if job.get("stream"):
                return [streamed_text(r)]
            return [c.message.content for c in r.choices]

        engine.delay = 0.002
        mark = len(engine.widths)
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(run, jobs))
        assert max(engine.widths[mark:]) >= 4, "the requests did not overlap"
        engine.delay = 0.0
        one_by_one = [run(job) for job in jobs]
        assert together == one_by_one
        for i in range(len(lines)):   # greedy: streamed == non-streamed
            assert together[4 * i] == together[4 * i + 1]
    finally:
        srv.close()


# ---- the command -------------------------------------------------------------------------------------------

def test_open_bind_needs_a_key_or_no_auth(capsys, tmp_path):
    from gptstack.cli import main

    assert main(["serve", str(tmp_path / "missing"), "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err
    ServeConfig(host="0.0.0.0", api_key="k").validate()
    ServeConfig(host="0.0.0.0", no_auth=True).validate()
    ServeConfig(host="::1").validate()
    assert ServeConfig(host="0.0.0.0", no_auth=True).open_to_network()
    with pytest.raises(Exception, match="contradict"):
        ServeConfig(api_key="k", no_auth=True).validate()


def test_gptstack_serve_command(tmp_path, model, tiny_tokenizer):
    run = save_run(tmp_path / "run", model, tiny_tokenizer)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    exe = os.path.join(os.path.dirname(sys.executable), "gptstack")
    env = {**os.environ, "GPTSTACK_API_KEY": "from-env"}
    proc = subprocess.Popen([exe, "serve", run, "--port", str(port), "--device", "cpu", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "gptstack serve did not come up"
            time.sleep(0.2)
        cl = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="from-env", max_retries=0)
        assert [m.id for m in cl.models.list().data] == ["run"]   # named after the run directory
        r = cl.chat.completions.create(model="run", messages=USER, max_tokens=5, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(30)
    assert "serving 'run'" in proc.stderr.read()


# ---- tools -------------------------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Lima"]},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tool_server(tiny_tokenizer):
    engine = Engine(tiny_model(tiny_tokenizer, seq_len=1024), tiny_tokenizer)
    s = RunningServer(create_app(engine, MODEL, ServeConfig(api_key=KEY)))
    yield s
    s.close()


def test_tool_calls_come_back_the_openai_way_and_the_client_sends_results(tool_server, tiny_tokenizer):
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    ask = dict(model=MODEL, messages=USER, tools=[WEATHER_TOOL], temperature=0, max_tokens=200,
               tool_choice={"type": "function", "function": {"name": "weather"}})
    r = client.chat.completions.create(**ask)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
    assert r.usage.prompt_tokens == len(tiny_tokenizer.render_prompt(USER, tools=[WEATHER_TOOL]))

    # streamed: content deltas (none here), then the call as tool-call deltas, then finish_reason tool_calls
    streamed, finishes = {}, []
    for chunk in client.chat.completions.create(**ask, stream=True):
        for c in chunk.choices:
            assert not c.delta.content
            for d in c.delta.tool_calls or ():
                entry = streamed.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += d.id or ""
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert finishes == ["tool_calls"] and list(streamed) == [0]
    assert streamed[0]["name"] == "weather" and json.loads(streamed[0]["arguments"]) == args
    assert streamed[0]["id"].startswith("call_")

    # "auto" and "required" calls also always validate (sampled, several seeds)
    for seed, mode in ((0, "required"), (1, "required"), (2, "auto"), (3, "auto")):
        r = client.chat.completions.create(**{**ask, "tool_choice": mode, "temperature": 1.0, "seed": seed})
        for tc in r.choices[0].message.tool_calls or ():
            jsonschema.validate(json.loads(tc.function.arguments), WEATHER_TOOL["function"]["parameters"])
        if mode == "required" and r.choices[0].finish_reason != "length":
            assert r.choices[0].message.tool_calls and r.choices[0].finish_reason == "tool_calls"

    # the client runs the tool and sends its result back: the model answers in text
    history = [*USER, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "rain, 4 degrees"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL], tool_choice="none",
                                       temperature=0, max_tokens=12)
    final = r.choices[0]
    assert final.message.tool_calls is None and final.finish_reason in ("stop", "length")
    assert isinstance(final.message.content, str)
    ours = [*USER, {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "rain, 4 degrees"}]
    assert r.usage.prompt_tokens == len(tiny_tokenizer.render_prompt(ours, tools=[WEATHER_TOOL]))
    assert "<|python_start|>" not in final.message.content
