"""OpenAI's request and response shapes: a request body (as the `openai` client sends it) checked and turned
into a GenRequest, and results turned back into `chat.completion` / `text_completion` objects and chunks.

Every rejected field is an APIError naming the parameter, so the client sees a 400 with a message that says
what to change. Unknown fields are ignored, as OpenAI does; fields OpenAI has and we cannot honour
(the legacy `functions`, `suffix`, non-text content parts...) are refused rather than silently dropped.

Tools: a chat request's `tools` are rendered into the prompt (the tokenizer's tool format), `tool_choice`
(auto / none / required / a named function) decides the grammar (infer.constrained.tool_call_grammar), so
every call the model makes parses and validates against its tool's parameters; the reply's calls come back
as `message.tool_calls` (ids `call_...`, arguments as JSON text) with finish_reason "tool_calls", and the
client sends `tool` messages with the results in its next request, after the assistant message that made
the calls.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..errors import ConfigError, DataError, GptstackError, PromptError
from ..infer.sampling import SamplingParams
from .hooks import TokenLogprob
from .scheduler import Cancelled, GenRequest, QueueFull, Result

MAX_STOP = 16            # stop sequences per request (OpenAI allows 4)
MAX_TOP_LOGPROBS = 20    # as OpenAI's chat API
MAX_PROMPTS = 64         # prompts in one /v1/completions request


class APIError(Exception):
    """An error the client gets as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Parsed:
    kind: str                      # "chat" or "completion"
    gen: GenRequest
    stream: bool
    include_usage: bool
    logprobs: bool                 # the response carries logprobs
    echo: list[str] | None = None  # /v1/completions echo: each prompt's text, put before its choices' text
    tools: list | None = None      # a chat request's tools: replies are read for tool calls


# ---- field checks ----------------------------------------------------------------------------------------

def _number(body: dict, name: str, default, lo=None, hi=None, integer: bool = False, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)) \
            or (isinstance(v, float) and not math.isfinite(v)):
        raise bad(f"{name} must be {kind}, got {json.dumps(v)[:40]}", name)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        raise bad(f"{name} must be in {left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                  f", got {v}", name)
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"{name} must be true or false, got {json.dumps(v)[:40]}", name)
    return v


def _stops(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"stop has {len(stops)} sequences; at most {MAX_STOP} are allowed", "stop")
    if any(not s for s in stops):
        raise bad("stop sequences must not be empty", "stop")
    return stops


class RequestParser:
    """Checks request bodies against the served model: its tokenizer, context and name, and the limits."""

    def __init__(self, tokenizer, context: int, model_name: str, max_n: int = 16, vocab: int | None = None):
        self.tok = tokenizer
        self.context = context
        self.model_name = model_name
        self.max_n = max_n
        self.vocab = vocab or tokenizer.vocab_size

    # ---- the two endpoints -----------------------------------------------------------------------------
    def chat(self, body: dict) -> Parsed:
        self._common_checks(body)
        if body.get("functions") or body.get("function_call"):
            raise APIError(400, "the legacy functions/function_call are not supported: send tools and tool_choice",
                           param="functions", code="unsupported_parameter")
        tools, tool_choice = self._tools(body)
        messages = self._messages(body.get("messages"))
        try:
            prompt = self.tok.render_prompt(messages, tools=tools) if tools else self.tok.render_prompt(messages)
        except DataError as e:
            raise bad(str(e), "messages") from None
        logprobs = _bool(body, "logprobs")
        top = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        if top is not None and not logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = body.get("max_completion_tokens")
        name = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, name = body.get("max_tokens"), "max_tokens"
        gen = self._gen([prompt], body, max_tokens, name, top_logprobs=(top or 0) if logprobs else None)
        if tools:
            self._constrain_calls(gen, body, tools, tool_choice)
        stream = _bool(body, "stream")
        return Parsed("chat", gen, stream, self._include_usage(body, stream), logprobs, tools=tools or None)

    def _tools(self, body: dict):
        from ..infer.constrained import tool_choice_of
        from ..tokenizer import check_tools

        try:
            tools = check_tools(body.get("tools"))
        except DataError as e:
            raise bad(str(e), "tools") from None
        choice = body.get("tool_choice")
        if choice is not None and not tools and choice != "none":
            raise bad("tool_choice needs tools", "tool_choice")
        try:
            tool_choice_of(choice, tools)
        except ConfigError as e:
            raise bad(str(e), "tool_choice") from None
        return tools, choice

    def _constrain_calls(self, gen: GenRequest, body: dict, tools: list, tool_choice) -> None:
        """The reply may call `tools`: their grammar (a call always parses and validates), or with tool_choice
        "none" no way to start a call."""
        from dataclasses import replace

        from ..infer.constrained import grammar_params, tool_call_grammar, tool_choice_of

        if gen.grammar is not None:
            raise bad("give either tools or a response_format/regex/grammar constraint, not both", "tools")
        mode, _ = tool_choice_of(tool_choice, tools)
        tok = self.tok
        if mode == "none":
            if "<|python_start|>" in tok.special_ids:
                gen.logit_bias = {**(gen.logit_bias or {}), tok.special("<|python_start|>"): -100.0}
            elif tok.tool_format().get("open"):
                gen.params = replace(gen.params, stop=[*gen.params.stop, tok.tool_format()["open"]])
            return
        try:
            gen.grammar = tool_call_grammar(tok, tools, tool_choice)
        except GptstackError as e:
            raise bad(str(e), "tools", code="invalid_schema") from None
        if gen.grammar is not None:
            gen.params = grammar_params(gen.params, tok)

    def completion(self, body: dict) -> Parsed:
        self._common_checks(body)
        if body.get("suffix"):
            raise APIError(400, "suffix (insertion) is not supported: send only a prompt", param="suffix",
                           code="unsupported_parameter")
        prompts, texts = self._prompts(body.get("prompt"))
        n = _number(body, "n", 1, 1, self.max_n, integer=True)
        best_of = _number(body, "best_of", None, 1, self.max_n, integer=True)
        if best_of not in (None, 1, n):
            raise APIError(400, "best_of other than n is not supported: ask for n choices and pick yourself",
                           param="best_of", code="unsupported_parameter")
        lp = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        gen = self._gen(prompts, body, body.get("max_tokens"), "max_tokens", top_logprobs=lp, default_max=16)
        stream = _bool(body, "stream")
        echo = texts if _bool(body, "echo") else None
        return Parsed("completion", gen, stream, self._include_usage(body, stream), lp is not None, echo)

    # ---- pieces ---------------------------------------------------------------------------------------------
    def _common_checks(self, body) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist: this server serves {self.model_name!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    @staticmethod
    def _include_usage(body: dict, stream: bool) -> bool:
        opts = body.get("stream_options")
        if opts is None:
            return False
        if not isinstance(opts, dict):
            raise bad("stream_options must be an object like {\"include_usage\": true}", "stream_options")
        return stream and _bool(opts, "include_usage")

    def _messages(self, messages) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise bad("messages must be a non-empty list of {role, content} objects", "messages")
        out = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise bad(f"{where} must be an object with role and content", where)
            role = m.get("role")
            if role == "function" or m.get("function_call"):
                raise APIError(400, f"{where}: the legacy function role/function_call are not supported: use "
                                    "tool_calls and tool messages", param=where, code="unsupported_parameter")
            if role == "developer":   # what newer OpenAI models call the system prompt
                role = "system"
            if role not in ("system", "user", "assistant", "tool"):
                raise bad(f"{where}.role must be system, user, assistant or tool, got {json.dumps(role)[:40]}",
                          f"{where}.role")
            calls = m.get("tool_calls") if role == "assistant" else None
            content = m.get("content")
            message = {"role": role, "content": "" if content is None and calls else
                       self._content(content, f"{where}.content")}
            if calls:
                message["tool_calls"] = calls
            if role == "tool":
                if not isinstance(m.get("tool_call_id"), str):
                    raise bad(f"{where}.tool_call_id must be the id of the call this message answers",
                              f"{where}.tool_call_id")
                message["tool_call_id"] = m["tool_call_id"]
            out.append(message)
        return out

    @staticmethod
    def _content(content, where: str) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"{where}[{j}]: only text content parts ({{\"type\": \"text\", \"text\": ...}})"
                                        f" are supported, got type {json.dumps(kind)[:40]}", param=f"{where}[{j}]",
                                   code="unsupported_parameter")
                parts.append(part["text"])
            return "".join(parts)
        raise bad(f"{where} must be a string or a list of text parts", where)

    def _prompts(self, prompt) -> tuple[list[list[int]], list[str]]:
        """String, list of strings, token ids, or list of token-id lists; strings get <|bos|> first."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise bad("prompt must be a string, a list of strings, or token ids", "prompt")
        if len(prompt) > MAX_PROMPTS:
            raise bad(f"prompt has {len(prompt)} prompts; at most {MAX_PROMPTS} per request", "prompt")
        ids, texts = [], []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                ids.append(self.tok.encode(p, bos=True))
                texts.append(p)
            elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                if min(p) < 0 or max(p) >= self.tok.vocab_size:
                    raise bad(f"prompt {i} has token ids outside the vocabulary (0..{self.tok.vocab_size - 1})",
                              "prompt")
                ids.append(list(p))
                texts.append(self.tok.decode(p))
            else:
                raise bad(f"prompt {i} must be a non-empty string or list of token ids", "prompt")
        return ids, texts

    def _gen(self, prompts: list[list[int]], body: dict, max_tokens, max_name: str,
             top_logprobs: int | None, default_max: int | None = None) -> GenRequest:
        longest = max(len(p) for p in prompts)
        room = self.context - longest
        if room < 1:
            raise APIError(400, f"the prompt is {longest} tokens but the model's context is {self.context} tokens, "
                                f"with at least 1 left for the reply: shorten it by {longest - self.context + 1} "
                                "tokens", param="messages", code="context_length_exceeded")
        if max_tokens is not None:
            max_tokens = _number({max_name: max_tokens}, max_name, None, 1, integer=True)
        # capped by the context: the reply ends with finish_reason "length" when the context is full
        max_tokens = min(max_tokens or default_max or room, room)
        n = _number(body, "n", 1, 1, self.max_n, integer=True)
        if n * len(prompts) > self.max_n:
            raise bad(f"{len(prompts)} prompts x n={n} is {n * len(prompts)} choices; at most {self.max_n}", "n")
        top_k = _number(body, "top_k", 0, -1, integer=True)
        params = SamplingParams(
            temperature=float(_number(body, "temperature", 1.0, 0, 2)),
            top_p=float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
            top_k=0 if top_k == -1 else top_k,
            min_p=float(_number(body, "min_p", 0.0, 0, 1)),
            frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2, 2)),
            presence_penalty=float(_number(body, "presence_penalty", 0.0, -2, 2)),
            repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0, None, lo_open=True)),
            max_tokens=max_tokens, n=n, stop=_stops(body),
            seed=_number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True))
        try:
            params.validate()
        except ConfigError as e:
            raise bad(str(e)) from None
        return GenRequest(prompts, params, grammar=self._grammar(body), top_logprobs=top_logprobs,
                          logit_bias=self._logit_bias(body))

    def _grammar(self, body: dict) -> str | None:
        """response_format (json_object, json_schema), or the extras `regex` / `grammar` (Lark): at most one."""
        wanted = {}
        rf = body.get("response_format")
        if rf is not None:
            if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
                raise bad("response_format.type must be text, json_object or json_schema", "response_format")
            if rf["type"] == "json_object":
                wanted["json_schema"] = {"type": "object"}
            elif rf["type"] == "json_schema":
                spec = rf.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, (dict, bool)):
                    raise bad("response_format.json_schema.schema must be a JSON schema object",
                              "response_format.json_schema.schema")
                wanted["json_schema"] = schema   # strict or not, the schema is always enforced exactly
        for name, kw in (("regex", "regex"), ("grammar", "lark")):
            v = body.get(name)
            if v is not None:
                if not isinstance(v, str):
                    raise bad(f"{name} must be a string", name)
                wanted[kw] = v
        if len(wanted) > 1:
            raise bad("give one constraint: response_format json, regex or grammar", "response_format")
        if not wanted:
            return None
        from ..infer.constrained import compile_grammar

        param = {"json_schema": "response_format", "regex": "regex", "lark": "grammar"}[next(iter(wanted))]
        try:
            return compile_grammar(tokenizer=self.tok, **wanted)
        except GptstackError as e:
            raise bad(str(e), param, code="invalid_schema" if "json_schema" in wanted else "invalid_grammar") from None

    def _logit_bias(self, body: dict) -> dict[int, float] | None:
        lb = body.get("logit_bias")
        if not lb:
            return None
        if not isinstance(lb, dict):
            raise bad("logit_bias must be an object mapping token ids to numbers in [-100, 100]", "logit_bias")
        out = {}
        for k, v in lb.items():
            try:
                t = int(k)
            except (TypeError, ValueError):
                raise bad(f"logit_bias key {k!r} is not a token id", "logit_bias") from None
            if not 0 <= t < self.vocab:
                raise bad(f"logit_bias token {t} is outside the vocabulary (0..{self.vocab - 1})", "logit_bias")
            out[t] = float(_number({"logit_bias": v}, "logit_bias", 0, -100, 100))
        return out


def error_for(e: BaseException) -> APIError:
    """The APIError a failure inside generation becomes."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):
        return APIError(503, str(e), type="server_error", code="queue_full")
    if isinstance(e, Cancelled):
        return APIError(503, str(e), type="server_error", code="cancelled")
    if isinstance(e, (PromptError, ConfigError, DataError)):
        return bad(str(e))
    return APIError(500, str(e) or type(e).__name__, type="server_error", code="internal_error")


# ---- responses -------------------------------------------------------------------------------------------

class Responses:
    """Builds the response objects of one request (same id and `created` on every chunk)."""

    def __init__(self, parsed: Parsed, id: str, created: int, model: str, tokenizer):
        self.p, self.id, self.created, self.model, self.tok = parsed, id, created, model, tokenizer
        self.chat = parsed.kind == "chat"
        self._offsets: dict[int, int] = {}       # text_offset so far per choice (completions logprobs)

    def _base(self, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(result: Result) -> dict:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens}

    def _token(self, t: int) -> tuple[str, list[int]]:
        b = self.tok.decode_bytes([t])
        return b.decode("utf-8", errors="replace"), list(b)

    def logprobs(self, entries: list[TokenLogprob] | None, choice: int = 0, start_text: str = "") -> dict | None:
        if not self.p.logprobs or entries is None:
            return None
        if self.chat:
            content = []
            for e in entries:
                text, raw = self._token(e.token)
                tops = []
                for t, lp in e.top:
                    s, b = self._token(t)
                    tops.append({"token": s, "logprob": lp, "bytes": b})
                content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": tops})
            return {"content": content}
        offset = self._offsets.get(choice, len(start_text))
        tokens, lps, tops, offs = [], [], [], []
        for e in entries:
            text, _ = self._token(e.token)
            tokens.append(text)
            lps.append(e.logprob)
            tops.append({self._token(t)[0]: lp for t, lp in e.top})
            offs.append(offset)
            offset += len(text)
        self._offsets[choice] = offset
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def _echo(self, index: int) -> str:
        if not self.p.echo:
            return ""
        return self.p.echo[index // self.p.gen.params.n]

    def tool_reply(self, tokens: list[int], text: str, finish_reason: str) -> tuple[str | None, list[dict], str]:
        """(content, tool_calls, finish_reason) of a reply to a request with tools: the calls read from its
        tokens (only complete, parsable ones: the grammar makes every finished call so), "tool_calls" when
        there are any. Without tools: the text, no calls, the finish reason as it is."""
        if not self.p.tools:
            return text, [], finish_reason
        from ..infer.agent import parse_tool_calls

        content, calls, problems = parse_tool_calls(self.tok, tokens)
        calls = [c for c, why in zip(calls, problems) if why is None]
        if not calls:
            return text, [], finish_reason
        return content or None, calls, "tool_calls" if finish_reason == "stop" else finish_reason

    def full(self, result: Result) -> dict:
        choices = []
        for c in result.choices:
            if self.chat:
                content, calls, finish = self.tool_reply(c.tokens, c.text, c.finish_reason)
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                choices.append({"index": c.index, "message": message,
                                "logprobs": self.logprobs(c.logprobs), "finish_reason": finish})
            else:
                echo = self._echo(c.index)
                choices.append({"index": c.index, "text": echo + c.text,
                                "logprobs": self.logprobs(c.logprobs, c.index, echo),
                                "finish_reason": c.finish_reason})
        return {**self._base(False), "choices": choices, "usage": self.usage(result)}

    def chunk(self, choice: int, text: str | None = None, role: bool = False, logprobs=None,
              finish_reason: str | None = None, tool_calls: list[dict] | None = None) -> dict:
        if self.chat:
            delta = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if tool_calls:   # streamed whole, one entry per call with its index, as OpenAI's deltas allow
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(tool_calls)]
            c = {"index": choice, "delta": delta, "logprobs": self.logprobs(logprobs, choice) if logprobs else None,
                 "finish_reason": finish_reason}
        else:
            c = {"index": choice, "text": text or "",
                 "logprobs": self.logprobs(logprobs, choice, self._echo(choice)) if logprobs else None,
                 "finish_reason": finish_reason}
        out = {**self._base(True), "choices": [c]}
        if self.p.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, result: Result) -> dict:
        return {**self._base(True), "choices": [], "usage": self.usage(result)}
