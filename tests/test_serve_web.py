"""The chat page in headless Chromium (the system's /usr/bin/chromium, never a downloaded one): a reply streams
in, a second turn carries the first, a reply is stopped mid-stream (and the server stops generating it),
JSON-schema mode, errors shown, markdown rendered with HTML escaped, and no console errors."""

import json
import os
import shutil
import time

import jsonschema
import pytest

from _infer_util import tiny_model
from gptstack.serve.app import create_app
from gptstack.serve.config import ServeConfig
from test_serve import RunningServer, instrumented_engine, wait_idle

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = "/tmp/serve_web.png"

playwright_sync = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) or shutil.which("chromium")),
                                reason="needs the system Chromium at /usr/bin/chromium")


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    e = instrumented_engine(tiny_model(tiny_tokenizer, seq_len=512), tiny_tokenizer)
    e.delay, e.ban_stop = 0.004, True   # visible streaming, and replies that run to max tokens
    return e


@pytest.fixture(scope="module")
def server(engine):
    s = RunningServer(create_app(engine, "tiny-web", ServeConfig()))
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1100, "height": 760})
    pg = ctx.new_page()
    problems = []
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.problems = problems
    pg.goto(server.url + "/")
    wait_js(pg, "document.getElementById('model').textContent.includes('tiny-web')")
    yield pg
    ctx.close()


def wait_js(page, expression: str, timeout: float = 30.0) -> None:
    """Poll a JS expression until it is true. (page.wait_for_function evaluates its predicate with eval, which
    the page's Content-Security-Policy forbids, as it should; page.evaluate goes through the debugger.)"""
    deadline = time.time() + timeout
    while not page.evaluate(expression):
        assert time.time() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.02)


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_done(page, timeout: float = 30.0) -> None:
    wait_js(page, "!document.getElementById('send').disabled && !document.querySelector('.streaming')", timeout)


def test_streams_two_turns_and_stops(page, server, engine):
    page.fill("#system", "You are a courtly assistant.")
    page.fill("#max-tokens", "40")
    page.fill("#temperature", "0")
    send(page, "Good morrow, what news?")
    # the reply grows while it streams
    page.wait_for_selector(".msg.assistant.streaming")
    wait_js(page, "document.querySelector('.msg.assistant').textContent.length > 0")
    first_seen = page.inner_text(".msg.assistant")
    wait_done(page)
    first = page.inner_text(".msg.assistant")
    assert len(first) > len(first_seen) or first_seen == first   # it arrived in pieces (or at once, if fast)
    assert "40 reply tokens" in first and "token limit" in first
    history = page.evaluate("window.gptstackChat.state.messages")
    assert [m["role"] for m in history] == ["user", "assistant"]

    # second turn: the request carries the first exchange and the system prompt
    with page.expect_request("**/v1/chat/completions") as req:
        send(page, "And the queen?")
    body = json.loads(req.value.post_data)
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][0]["content"] == "You are a courtly assistant." and body["stream"] is True
    assert body["messages"][2]["content"] == history[1]["content"]
    wait_done(page)
    assert page.locator(".msg.assistant").count() == 2

    # third turn, long: stop it mid-stream
    page.fill("#max-tokens", "450")
    send(page, "Tell me everything.")
    wait_js(page, "document.querySelectorAll('.msg.assistant')[2].textContent.length > 20")
    assert page.is_visible("#stop")
    page.click("#stop")
    wait_done(page, timeout=5)
    third = page.locator(".msg.assistant").nth(2).inner_text()
    assert "stopped" in third and page.inner_text("#status") == "stopped"
    wait_idle(server, timeout=5)      # the server stopped generating it
    calls = engine.calls
    time.sleep(0.2)
    assert engine.calls == calls
    state = page.evaluate("window.gptstackChat.state.messages")
    assert [m["role"] for m in state] == ["user", "assistant"] * 3
    assert 0 < len(state[5]["content"]) < 450

    page.screenshot(path=SCREENSHOT, full_page=True)
    assert not page.problems, page.problems


def test_json_schema_mode_and_errors(page):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "n"], "additionalProperties": False}
    page.check("#json-mode")
    page.fill("#schema", json.dumps(schema))
    page.fill("#max-tokens", "120")
    send(page, "Answer in JSON")
    wait_done(page)
    reply = page.evaluate("window.gptstackChat.state.messages[1].content")
    jsonschema.validate(json.loads(reply), schema)

    # an invalid schema: the server's 400 is shown, the turn is taken back, the text returned to the box
    page.fill("#schema", json.dumps({"type": "nonsense"}))
    send(page, "Again")
    page.wait_for_selector(".msg.error")
    error = page.inner_text(".msg.error")
    assert "schema" in error and "HTTP 400" in error
    assert page.input_value("#input") == "Again"
    assert len(page.evaluate("window.gptstackChat.state.messages")) == 2
    # not JSON at all: caught before sending
    page.fill("#schema", "{oops")
    page.fill("#input", "")
    send(page, "Once more")
    wait_js(page, "document.querySelectorAll('.msg.error').length == 2")
    assert "not valid JSON" in page.locator(".msg.error").nth(1).inner_text()
    # a prompt longer than the context
    page.uncheck("#json-mode")
    send(page, "the king " * 400)
    wait_js(page, "document.querySelectorAll('.msg.error').length == 3")
    assert "context" in page.locator(".msg.error").nth(2).inner_text()
    # the server still answers, and the page recovers
    page.fill("#input", "")
    page.fill("#max-tokens", "5")
    send(page, "Hello")
    wait_done(page)
    assert [m["role"] for m in page.evaluate("window.gptstackChat.state.messages")] == ["user", "assistant"] * 2
    # Chromium logs every 4xx response itself; the two refused requests are those, and nothing else went wrong
    refused = "Failed to load resource: the server responded with a status of 400 (Bad Request)"
    assert page.problems == [f"console error: {refused}"] * 2, page.problems


def test_markdown_renderer_escapes_html(page):
    html = page.evaluate("""window.gptstackChat.renderMarkdown(
        "Hi **there** and `a<b>`\\n\\n<script>alert(1)</script>\\n\\n```py\\nx = '<i>'\\n```\\nafter")""")
    assert "<strong>there</strong>" in html and "<code>a&lt;b&gt;</code>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert '<pre><code class="language-py">x = &#39;&lt;i&gt;&#39;</code></pre>' in html
    assert html.count("<p>") == 3
    # an unclosed fence while streaming is still a code block
    assert page.evaluate("window.gptstackChat.renderMarkdown('```\\nopen')") == "<pre><code>open</code></pre>"
    assert not page.problems, page.problems
