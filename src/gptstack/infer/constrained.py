"""Constrained decoding: JSON Schema, regex and Lark grammars turned into per-step token masks by llguidance.

    grammar = compile_grammar(json_schema={"type": "object", ...})     # ConfigError if invalid/unsupported
    hook = GrammarHook(tokenizer, grammar)
    out = engine.generate(prompts, grammar_params(params, tokenizer), hooks=[hook])

llguidance walks the grammar against our BPE vocabulary (through its tiktoken adapter) and answers, for each
row and step, the set of tokens that keep the output a prefix of something the grammar accepts; everything
else gets -inf before sampling. `<|assistant_end|>` is the grammar's end-of-sequence token, so it is allowed
exactly when the output is complete, and a row also stops as soon as the grammar admits nothing more. A row
that finishes with reason "stop" therefore always parses (and validates, for a schema); one that runs out of
tokens ("length") may not, and `check_complete` says so with an actionable message.

JSON is compiled without flexible whitespace (compact separators): otherwise an untrained or unsure model can
spend its whole budget on spaces between tokens the grammar would accept.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, DependencyError, GptstackError
from .sampling import SamplingParams

_NAMES = {"json_schema": "JSON schema", "regex": "regex", "lark": "Lark grammar"}
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llg():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - llguidance is a core dependency
        raise DependencyError(f"constrained decoding needs llguidance ({e}); pip install llguidance") from None
    return llguidance


@functools.lru_cache(maxsize=8)
def _ll_tokenizer_cached(key, tokenizer):
    if hasattr(tokenizer, "to_llguidance"):   # an imported model's HF tokenizer: from its tokenizer.json
        return tokenizer.to_llguidance()
    from llguidance.tiktoken import lltokenizer_from_encoding

    return lltokenizer_from_encoding(tokenizer.enc, n_vocab=tokenizer.vocab_size, eos_token=tokenizer.assistant_end_id)


def ll_tokenizer(tokenizer):
    """llguidance's view of our vocabulary (about a second to build, cached per tokenizer)."""
    return _ll_tokenizer_cached((tokenizer.fingerprint(), id(tokenizer), tokenizer.vocab_size), tokenizer)


def compile_grammar(*, json_schema: dict | str | None = None, regex: str | None = None, lark: str | None = None,
                    tokenizer=None) -> str:
    """An llguidance grammar from exactly one of a JSON schema, a regex or a Lark grammar; checked now, so a
    bad one is a ConfigError before any generation starts."""
    llg = _llg()
    given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("lark", lark)) if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of a JSON schema, a regex or a Lark grammar")
    try:
        if json_schema is not None:
            schema = json.loads(json_schema) if isinstance(json_schema, str) else json_schema
            if not isinstance(schema, (dict, bool)):
                raise ConfigError("a JSON schema must be a JSON object")
            _check_schema_itself(schema)
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        elif regex is not None:
            if not regex:
                raise ConfigError("the regex is empty")
            grammar = llg.LLMatcher.grammar_from_regex(regex)
        else:
            if not lark.strip():
                raise ConfigError("the grammar is empty")
            grammar = llg.LLMatcher.grammar_from_lark(lark)
    except json.JSONDecodeError as e:
        raise ConfigError(f"the JSON schema is not valid JSON ({e.msg} at line {e.lineno})") from None
    except ValueError as e:
        raise ConfigError(f"cannot compile the {_NAMES[given[0]]}: {e}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(
        grammar, ll_tokenizer(tokenizer) if tokenizer is not None else None)
    if is_error:
        what = _NAMES[given[0]]
        raise ConfigError(f"unsupported or invalid {what}: {messages[0].splitlines()[0] if messages else 'rejected'}")
    return grammar


def _check_schema_itself(schema) -> None:
    """Reject schemas that are not valid JSON Schema (llguidance is lenient about some of these)."""
    try:
        import jsonschema
    except ImportError:
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ConfigError(f"invalid JSON schema: {e.message}") from None


def grammar_params(params: SamplingParams, tokenizer) -> SamplingParams:
    """`params` with <|assistant_end|> among the stop tokens (the grammar's end of sequence)."""
    from dataclasses import replace

    stops = list(params.stop_token_ids) if params.stop_token_ids is not None else [tokenizer.assistant_end_id,
                                                                                   tokenizer.bos_id]
    if tokenizer.assistant_end_id not in stops:
        stops.append(tokenizer.assistant_end_id)
    return replace(params, stop_token_ids=stops)


class GrammarHook:
    """A LogitsHook: one llguidance matcher per generation row, masks computed for the active rows each step
    (in parallel across rows when there are several), applied as -inf on the logits.

    The mask for the next step depends only on the tokens taken so far, not on the logits, so the engine calls
    `prefetch(rows)` just before each forward pass: the mask is computed on a worker thread (llguidance drops
    the GIL) while the model runs, and `process` only waits for it and applies it. `mask_seconds` is the
    compute time, `exposed_seconds` the part of it (plus applying the mask) that the decode loop waited for."""

    def __init__(self, tokenizer, grammar: str, vocab_size: int | None = None, overlap: bool = True):
        llg = _llg()
        self.llg = llg
        self.tokenizer = tokenizer
        self.grammar = grammar
        self.lltok = ll_tokenizer(tokenizer)
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.words = (self.vocab_size + 31) // 32
        self.matchers: list = []
        self.executor = None
        self.overlap = overlap
        self._pending = None          # (rows, Future) of a mask being computed during the forward pass
        self.mask_seconds = 0.0       # time spent computing masks (for the benchmark)
        self.exposed_seconds = 0.0    # time the decode loop spent waiting for and applying masks
        self.mask_calls = 0

    def start(self, n_rows: int) -> None:
        self._drain()
        proto = self.llg.LLMatcher(self.lltok, self.grammar, log_level=0)
        if proto.is_error():
            raise ConfigError(f"grammar rejected: {proto.get_error()}")
        self.matchers = [proto] + [proto.deep_copy() for _ in range(n_rows - 1)]
        self.bitmask = np.full((n_rows, self.words), -1, dtype=np.int32)
        if n_rows > 1 and self.executor is None:
            self.executor = self.llg.LLExecutor()

    def _compute(self, row_list: list[int]) -> torch.Tensor:
        """The rows' masks, as a (rows, vocab) bool tensor that is True where a token is NOT allowed."""
        t0 = time.perf_counter()
        mask = self.bitmask[:len(row_list)]
        if len(row_list) == 1:
            self.matchers[row_list[0]].unsafe_compute_mask_ptr(mask.ctypes.data, self.words * 4)
        else:
            self.executor.unsafe_compute_mask_ptr([(self.matchers[r], i) for i, r in enumerate(row_list)],
                                                  mask.ctypes.data, self.words * 4, len(row_list))
        self.mask_seconds += time.perf_counter() - t0
        # unpacking is part of the work done off the decode loop's path (measured: ~45 of ~80 us per step
        # when done after the forward pass, with the caches cold)
        bits = np.unpackbits(~mask.view(np.uint8), axis=1, bitorder="little")[:, :self.vocab_size]
        return torch.from_numpy(bits).view(torch.bool)

    def prefetch(self, rows: torch.Tensor) -> None:
        """Start computing the masks of `rows` for the next step (called before the forward pass)."""
        if not self.overlap:
            return
        self._drain()
        row_list = rows.tolist()
        self._pending = (row_list, _mask_thread().submit(self._compute, row_list))

    def _drain(self) -> None:
        """Wait for a mask in flight (its matchers must not be touched meanwhile); errors surface in process."""
        if self._pending is not None:
            self._pending[1].exception()
            self._pending = None

    def process(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        row_list = rows.tolist()
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == row_list:
            disallowed = pending[1].result()
        else:
            if pending is not None:
                pending[1].exception()
            disallowed = self._compute(row_list)
        for i, r in enumerate(row_list):
            if self.matchers[r].is_error():
                raise GptstackError(f"constrained decoding failed: {self.matchers[r].get_error()}")
        width = logits.size(-1)
        if width != disallowed.size(-1):   # the model's vocabulary is padded past the tokenizer's
            disallowed = torch.nn.functional.pad(disallowed, (0, width - disallowed.size(-1)), value=True) \
                if width > disallowed.size(-1) else disallowed[:, :width]
        logits = logits.masked_fill(disallowed.to(logits.device), float("-inf"))
        self.exposed_seconds += time.perf_counter() - t0
        self.mask_calls += len(row_list)
        return logits

    def accept(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        self._drain()
        for r, t in zip(rows.tolist(), tokens.tolist()):
            if not self.matchers[r].consume_token(t):
                raise GptstackError(f"constrained decoding failed: token {t} rejected "
                                    f"({self.matchers[r].get_error()})")

    def finished(self, row: int) -> bool:
        self._drain()
        return self.matchers[row].is_stopped()

    def forced_tokens(self, row: int) -> list[int]:
        """Tokens the grammar forces next (no choice left), for fast-forwarding."""
        self._drain()
        return self.matchers[row].compute_ff_tokens()

    def accepting(self, row: int) -> bool:
        self._drain()
        return self.matchers[row].is_accepting()


@functools.lru_cache(maxsize=1)
def _mask_thread():
    """One worker thread for masks computed while the model runs (the executor parallelises across rows)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptstack-mask")


def check_complete(completion, what: str = "output") -> None:
    """A ConfigError if a constrained completion ran out of tokens before its grammar completed."""
    if completion.finish_reason != "stop":
        raise ConfigError(f"the {what} hit --max-new-tokens ({len(completion.tokens)} tokens) before the grammar "
                          "completed, so it may not parse; raise --max-new-tokens")


def generate_constrained(engine, prompts: Sequence[Sequence[int]], params: SamplingParams, grammar: str):
    """Generate with a grammar; returns engine.generate's results (rows ending 'stop' are complete)."""
    hook = GrammarHook(engine.tokenizer, grammar, engine.config.vocab_size)
    return engine.generate(prompts, grammar_params(params, engine.tokenizer), hooks=[hook])


# ---- tool calls ---------------------------------------------------------------------------------------------

def tool_choice_of(tool_choice, tools: Sequence[dict]) -> tuple[str, str | None]:
    """OpenAI's `tool_choice` -> (mode, name): "auto" / "none" / "required" with name None, or ("required",
    X) for {"type": "function", "function": {"name": X}}. A ConfigError for anything else or an unknown X."""
    names = [t["function"]["name"] for t in tools]
    if tool_choice is None:
        tool_choice = "auto"
    if tool_choice in ("auto", "none", "required"):
        if tool_choice == "required" and not names:
            raise ConfigError("tool_choice 'required' needs at least one tool")
        return tool_choice, None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or tool_choice.get("type", "function") != "function":
        raise ConfigError('tool_choice must be "auto", "none", "required" or {"type": "function", '
                          '"function": {"name": ...}}')
    if name not in names:
        raise ConfigError(f"tool_choice names the function {name!r}, which is not among the tools "
                          f"({', '.join(names) or 'none given'})")
    return "required", name


def call_schema(tools: Sequence[dict], only: str | None = None) -> dict:
    """The JSON schema of one call's body: {"name": one of the tools, "arguments": that tool's parameters}
    (the parameters alone decide what the arguments may be, so a call always validates against its tool)."""
    options = []
    for t in tools:
        fn = t["function"]
        if only is not None and fn["name"] != only:
            continue
        options.append({"type": "object",
                        "properties": {"name": {"const": fn["name"]},
                                       "arguments": fn.get("parameters") or {"type": "object"}},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_OPTIONS}   # the separators our renderer writes calls with


def tool_call_grammar(tokenizer, tools: Sequence[dict], tool_choice="auto") -> str | None:
    """The grammar of an assistant turn that may call `tools` (None: nothing to constrain).

    Ours: auto = optional text, then zero or more calls <|python_start|>{call}<|python_end|>; required = one
    or more calls and no text; a named function = exactly one call of it; none = None (the caller bans the
    call-start token instead). Text cannot contain a special token, so the grammar itself sees where a call
    starts. An imported model's calls are plain text markers of its template (<tool_call>...</tool_call>):
    required / named calls are constrained the same way, but under auto the start of a call cannot be told
    from text by the grammar, so auto turns are not constrained (None) and are parsed afterwards."""
    mode, name = tool_choice_of(tool_choice, tools)
    if mode == "none" or not tools:
        return None
    for t in tools:   # each tool's parameters must be a schema llguidance accepts: say which one is not
        try:
            compile_grammar(json_schema=call_schema([t]), tokenizer=None)
        except ConfigError as e:
            raise ConfigError(f"tool {t['function']['name']!r}: {e}") from None
    body = json.dumps(call_schema(tools, name))
    if "<|python_start|>" in tokenizer.special_ids:
        call = "call: <|python_start|> body <|python_end|>"
        start = {"auto": "start: TEXT? call*", "required": "start: call+"}[mode] if name is None else "start: call"
        lark = f"{start}\n{call}\nbody: %json {body}\nTEXT: /(?s:.+)/\n"
    else:
        fmt = tokenizer.tool_format()
        if not fmt["ok"] or fmt["name_key"] != "name" or fmt["arguments_key"] != "arguments":
            raise ConfigError("this model's chat template has no tool-call format gptstack can constrain"
                              + (f" ({fmt['why']})" if fmt["why"] else ""))
        if mode == "auto":
            return None
        call = f"call: {json.dumps(fmt['open'] or '')} body {json.dumps(fmt['close'] or '')}"
        start = "start: call" if name is not None else 'start: call ("\\n" call)*'
        lark = f"{start}\n{call}\nbody: %json {body}\n"
    return compile_grammar(lark=lark, tokenizer=tokenizer)
