"""The HTTP layer: an OpenAI-compatible API and the chat page, in front of one engine.

    GET  /v1/models               the one served model
    POST /v1/chat/completions     chat (stream or not), n, stop, seed, logprobs, response_format, ...
    POST /v1/completions          raw continuation of a prompt (base models)
    GET  /health                  liveness and queue depth (no key needed)
    GET  /                        the chat page (static/ next to this module; no network, no CDN)

Requests are parsed in schemas.py, generated through scheduler.py, and every failure reaches the client as
an OpenAI error object with a status: 400 bad parameter, 401 key, 404 model or route, 413 body too large,
503 queue full. A streaming client that disconnects cancels its generation; a non-streaming one is
watched for disconnects while it waits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServeConfig
from .schemas import APIError, Parsed, RequestParser, Responses, error_for
from .scheduler import Delta, Result, Scheduler

STATIC = {"index.html": "text/html; charset=utf-8", "chat.js": "text/javascript; charset=utf-8",
          "chat.css": "text/css; charset=utf-8"}
# the page loads only its own files: no CDN, no inline script, nothing from the network
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once at start-up; requests name one of these, never a path."""
    root = resources.files("gptstack.serve") / "static"
    return {name: ((root / name).read_bytes(), media) for name, media in STATIC.items()}


def create_app(engine, model_name: str, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    scheduler = Scheduler(engine, max_batch=config.max_batch, max_queue=config.max_queue)
    parser = RequestParser(engine.tokenizer, engine.max_context, model_name, config.max_n,
                           vocab=engine.config.vocab_size)
    static = _static_files()
    created = int(time.time())

    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="gptstack", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.model_name = model_name

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(APIError(e.status_code, msg, code=code).body(), status_code=e.status_code)

    def check_key(request: Request) -> None:
        if not config.api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "missing API key: send the header `Authorization: Bearer KEY`",
                           type="authentication_error", code="invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise APIError(401, "incorrect API key", type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        limit = config.max_body_bytes
        too_big = APIError(413, f"the request body is over the server's limit of {limit} bytes",
                           code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_big
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    # ---- routes --------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **scheduler.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [_model_card(model_name, created, engine.max_context)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(request)
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return _model_card(model_name, created, engine.max_context)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        body = await read_json(request)
        parsed = await run_in_threadpool(parser.chat, body)   # a schema compiles off the event loop
        return await respond(request, parsed, "chatcmpl-")

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        body = await read_json(request)
        parsed = await run_in_threadpool(parser.completion, body)
        return await respond(request, parsed, "cmpl-")

    @app.get("/")
    async def page():
        return _static_response(static, "index.html")

    @app.get("/static/{name}")
    async def static_file(name: str):
        if name not in static:
            raise APIError(404, f"no static file {name!r}", code="not_found")
        return _static_response(static, name)

    # ---- generation ----------------------------------------------------------------------------------------
    async def respond(request: Request, parsed: Parsed, prefix: str):
        try:
            handle = scheduler.submit(parsed.gen)
        except Exception as e:
            raise error_for(e) from None
        out = Responses(parsed, prefix + uuid.uuid4().hex[:24], int(time.time()), model_name, engine.tokenizer)
        if parsed.stream:
            return StreamingResponse(_sse(handle, parsed, out), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        task = asyncio.ensure_future(handle.result())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    break
                if await request.is_disconnected():   # nobody will read the answer: stop generating it
                    handle.cancel()
                    task.cancel()
                    return Response(status_code=499)
            try:
                result = task.result()
            except Exception as e:
                raise error_for(e) from None
        finally:
            if not task.done():
                task.cancel()
            handle.cancel()
        return JSONResponse(out.full(result))

    return app


async def _sse(handle, parsed: Parsed, out: Responses):
    """Server-sent events: a role chunk per choice, content deltas, one finish_reason per choice, a usage
    chunk (with stream_options.include_usage), then [DONE]. Cancelled when the client goes away."""
    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    n_choices = len(parsed.gen.prompts) * parsed.gen.params.n
    calls = _CallStream(out, n_choices) if parsed.tools else None
    try:
        for i in range(n_choices):
            if out.chat:
                yield event(out.chunk(i, "", role=True))
            elif parsed.echo:
                yield event(out.chunk(i, out._echo(i)))
        async for items in handle.batches():   # what arrived together is written together
            data = []
            for item in items:
                if calls is not None:
                    data += [event(obj) for obj in calls.feed(item)]
                    if isinstance(item, Result) and parsed.include_usage:
                        data.append(event(out.usage_chunk(item)))
                    continue
                if isinstance(item, Delta):
                    if item.text or item.logprobs:
                        data.append(event(out.chunk(item.choice, item.text, logprobs=item.logprobs or None)))
                    if item.finish_reason:
                        data.append(event(out.chunk(item.choice, None if out.chat else "",
                                                    finish_reason=item.finish_reason)))
                elif isinstance(item, Result) and parsed.include_usage:
                    data.append(event(out.usage_chunk(item)))
            if data:
                yield "".join(data)
    except Exception as e:   # mid-stream the status is already sent: the error goes in the stream
        yield event(error_for(e).body())
    finally:
        handle.cancel()
    yield "data: [DONE]\n\n"


class _CallStream:
    """The stream of a request with tools: text is streamed as content until a tool call starts (the call's
    own text is never shown as content); the calls, read from the reply's tokens once it is whole (the
    Result), follow as `tool_calls` deltas, then the finish_reason ("tool_calls" when there are calls)."""

    def __init__(self, out, n_choices: int):
        self.out = out
        tok = out.tok
        self.marker = ("<|python_start|>" if "<|python_start|>" in tok.special_ids
                       else tok.tool_format().get("open") or "\0")
        self.text = [""] * n_choices       # all text of each choice so far
        self.sent = [0] * n_choices        # how much of it went out as content
        self.cut = [False] * n_choices     # a call has started: the rest is not content

    def feed(self, item) -> list[dict]:
        if isinstance(item, Delta):
            i = item.choice
            self.text[i] += item.text
            if self.cut[i]:
                return []
            at = self.text[i].find(self.marker, self.sent[i])
            if at >= 0:
                self.cut[i] = True
                upto = at
            else:   # hold back a tail that may be the start of the marker
                upto = len(self.text[i])
                for k in range(min(len(self.marker) - 1, upto - self.sent[i]), 0, -1):
                    if self.marker.startswith(self.text[i][upto - k:]):
                        upto -= k
                        break
            piece, self.sent[i] = self.text[i][self.sent[i]:upto], upto
            return [self.out.chunk(i, piece, logprobs=item.logprobs or None)] if piece or item.logprobs else []
        if not isinstance(item, Result):
            return []
        chunks = []
        for c in item.choices:
            _, tool_calls, finish = self.out.tool_reply(c.tokens, c.text, c.finish_reason)
            rest = self.text[c.index][self.sent[c.index]:] if not tool_calls else ""
            if rest:
                chunks.append(self.out.chunk(c.index, rest))
            if tool_calls:
                chunks.append(self.out.chunk(c.index, tool_calls=tool_calls))
            chunks.append(self.out.chunk(c.index, None, finish_reason=finish))
        return chunks


def _model_card(name: str, created: int, context: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "gptstack", "context_length": context}


def _static_response(static: dict, name: str) -> Response:
    data, media = static[name]
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if name == "index.html":
        headers["Content-Security-Policy"] = CSP
    return Response(data, media_type=media, headers=headers)


def serve(run_dir: str, config: ServeConfig, log=print) -> None:
    """Load the run's model and serve it until Ctrl-C (the CLI's `gptstack serve`)."""
    from pathlib import Path

    import uvicorn

    from ..devices import resolve_device
    from ..infer.engine import Engine
    from ..runs import load_model

    config.validate()
    sock = _listen(config.host, config.port)   # before loading: a busy port should not wait for the model
    model, tok, _ = load_model(run_dir, resolve_device(config.device))
    engine = Engine(model, tok)
    name = config.model_name or Path(run_dir).resolve().name
    app = create_app(engine, name, config)
    if config.open_to_network():
        log(f"warning: serving on {config.host} without an API key (--no-auth): anyone who can reach this "
            "address can use the model")
    log(f"serving {name!r} ({engine.max_context}-token context, {engine.device}) at "
        f"http://{config.host}:{config.port}/  (OpenAI API under /v1; Ctrl-C stops)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=3))
    server.run(sockets=[sock])


def _listen(host: str, port: int):
    import socket

    from ..errors import ConfigError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host") \
            from None
    return sock
