"""The agent loop: the model calls tools, the tools run, their results are appended, the model goes on.

    tools = tools_from_spec("calculator,search:runs/notes_index")
    result = run_agent(engine, [{"role": "user", "content": "What is 48213 * 739?"}], tools,
                       SamplingParams(temperature=0, max_tokens=128), max_steps=4)
    result.messages[-1]["content"], result.stop_reason          # "answer" | "max_steps" | "length" | "context"

Messages stay in OpenAI's convention throughout: each model turn is an assistant message (its text, and
`tool_calls` with ids `call_...` and arguments as JSON text), each result a `tool` message with the call's
`tool_call_id`. A step is one model turn; the loop ends when a turn makes no call (its answer), when
`max_steps` turns have been taken (the last results are then unanswered), when a reply runs out of tokens
before finishing, or when the conversation no longer fits the context.

With `constrained` (the default) every call's text is held to the tool-call grammar
(infer.constrained.tool_call_grammar), so it names one of the tools and its arguments validate against that
tool's parameters. `tool_choice` is OpenAI's: "auto", "none" (no call can start), "required" or a named
function; it applies to the first turn, as it does to a single API request, and later turns are "auto"
("none" stays "none"), since forcing a call every turn would never let the model answer.

A tool never crashes the loop: its ToolError, an unknown tool name or arguments that do not parse become
the result text ("error: ..."), which the model reads like any other result. The built-in tools compute
or look up only: the calculator parses arithmetic itself (never `eval`); search reads the retrieval index
named on the command line, loaded once; neither runs code, touches other files or the network.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from ..errors import ConfigError, PromptError, ToolError
from .sampling import SamplingParams

STOP_REASONS = ("answer", "max_steps", "length", "context")


@dataclass
class Tool:
    """A tool the model may call: its OpenAI function schema and what runs it (arguments dict -> text)."""
    name: str
    schema: dict
    run: Callable[[dict], str]


@dataclass
class AgentResult:
    messages: list[dict]                 # the conversation given, then every turn and result the loop added
    steps: int                           # model turns taken
    stop_reason: str                     # one of STOP_REASONS
    calls: list[dict] = field(default_factory=list)   # every call made, in order (OpenAI tool_calls entries)


# ---- the built-in tools -----------------------------------------------------------------------------------

def calculator_tool() -> Tool:
    from .tools import CALCULATOR_SCHEMA, calculator_call

    return Tool("calculator", CALCULATOR_SCHEMA, calculator_call)


def search_tool(index_dir: str, k: int = 1) -> Tool:
    """Search over a saved retrieval index (`gptstack index` / retrieval.Index.save): the top `k` passages,
    each as "[source] text" on its own line (the form the tool_facts training conversations show)."""
    from ..data.tasks.tool_facts import search_result, search_schema
    from .retrieval import Index

    index = Index.load(index_dir)

    def run(arguments: dict) -> str:
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ToolError("search: arguments must be an object with a non-empty string 'query'")
        hits = index.search(query, k)
        if not hits:
            return "no results"
        return "\n".join(search_result(chunk.source, chunk.text) for _, chunk in hits)

    return Tool("search", search_schema(), run)


def tools_from_spec(spec: str) -> list[Tool]:
    """Tools from a comma-separated spec: `calculator`, `search:INDEX_DIR` (e.g. "calculator,search:idx")."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("give tools as a comma-separated list: calculator, search:INDEX_DIR")
    tools: list[Tool] = []
    for item in (part.strip() for part in spec.split(",")):
        name, _, arg = item.partition(":")
        if name == "calculator" and not arg:
            tools.append(calculator_tool())
        elif name == "search" and arg:
            tools.append(search_tool(arg))
        elif name == "search":
            raise ConfigError("the search tool needs an index: search:INDEX_DIR")
        else:
            raise ConfigError(f"unknown tool {item!r}: the tools are calculator and search:INDEX_DIR")
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ConfigError(f"a tool is named twice in {spec!r}")
    return tools


# ---- reading calls out of a reply -------------------------------------------------------------------------

def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _call_entry(name: str, arguments) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def _read_call(text: str) -> tuple[dict, str | None]:
    """One call's text -> (OpenAI call, None) or (a call holding the raw text, why it is not a valid call)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return _call_entry("", text), f"the call is not valid JSON ({e.msg})"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return _call_entry("", text), 'the call must be a JSON object {"name": ..., "arguments": {...}}'
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        return _call_entry(obj["name"], json.dumps(args)), "the call's arguments must be a JSON object"
    return _call_entry(obj["name"], args), None


def parse_tool_calls(tokenizer, tokens: Sequence[int]) -> tuple[str, list[dict], list[str | None]]:
    """A reply's tokens -> (its text, its tool calls, for each call None or why it is not valid).

    Ours: the text before the first <|python_start|>, then one call per <|python_start|>...<|python_end|>
    (a call cut off by the token budget is reported as incomplete). An imported model: calls between the
    template's markers (HFTokenizer.tool_format), text before the first."""
    S = tokenizer.special_ids
    if "<|python_start|>" not in S:
        return _parse_template_calls(tokenizer, tokenizer.decode(list(tokens)))
    start, end = S["<|python_start|>"], S["<|python_end|>"]
    text_ids, calls, problems = [], [], []
    current: list[int] | None = None
    for t in tokens:
        if current is None:
            if t == start:
                current = []
            elif not calls and t != end:
                text_ids.append(t)
        elif t == end:
            call, why = _read_call(tokenizer.decode(current))
            calls.append(call)
            problems.append(why)
            current = None
        else:
            current.append(t)
    if current is not None:
        calls.append(_call_entry("", tokenizer.decode(current)))
        problems.append("the call was cut off before <|python_end|> (raise max_tokens)")
    return tokenizer.decode(text_ids), calls, problems


def _parse_template_calls(tokenizer, text: str) -> tuple[str, list[dict], list[str | None]]:
    fmt = tokenizer.tool_format() if hasattr(tokenizer, "tool_format") else {"ok": False}
    if not fmt["ok"] or not fmt["open"]:
        return text, [], []
    open_, close = fmt["open"], fmt["close"] or ""
    first = text.find(open_)
    if first < 0:
        return text, [], []
    content, calls, problems = text[:first].rstrip("\n"), [], []
    at = first
    while (at := text.find(open_, at)) >= 0:
        at += len(open_)
        stop = text.find(close, at) if close else len(text)
        body = text[at:stop if stop >= 0 else len(text)].strip()
        call, why = _read_call(body)
        if stop < 0:
            why = f"the call was cut off before {close!r} (raise max_tokens)"
        if why is None and fmt["name_key"] != "name":   # a template that names its keys otherwise
            obj = json.loads(body)
            call, why = _call_entry(str(obj.get(fmt["name_key"])), obj.get(fmt["arguments_key"], {})), None
        calls.append(call)
        problems.append(why)
        if stop < 0:
            break
        at = stop + len(close)
    return content, calls, problems


# ---- generation of one turn -------------------------------------------------------------------------------

class BanTokens:
    """A logits hook that makes some tokens impossible (tool_choice "none": the call-start token)."""

    def __init__(self, ids: Sequence[int]):
        self.ids = list(ids)

    def start(self, n_rows: int) -> None:
        pass

    def process(self, logits, rows):
        logits = logits.clone()
        logits[:, self.ids] = float("-inf")
        return logits

    def accept(self, rows, tokens) -> None:
        pass

    def finished(self, row: int) -> bool:
        return False


def turn_setup(engine, schemas: Sequence[dict], params: SamplingParams, tool_choice="auto",
               constrained: bool = True) -> tuple[list, SamplingParams]:
    """The hooks and sampling parameters of one assistant turn that may call `schemas`: the tool-call grammar
    (when constrained), or for tool_choice "none" a ban on starting a call."""
    from .constrained import GrammarHook, grammar_params, tool_call_grammar, tool_choice_of

    tok = engine.tokenizer
    mode, _ = tool_choice_of(tool_choice, schemas)
    if not schemas:
        return [], params
    if mode == "none":
        if "<|python_start|>" in tok.special_ids:
            return [BanTokens([tok.special("<|python_start|>")])], params
        fmt = tok.tool_format()
        return [], replace(params, stop=[*params.stop, fmt["open"]]) if fmt.get("open") else params
    if not constrained:
        return [], params
    grammar = tool_call_grammar(tok, schemas, tool_choice)
    if grammar is None:
        return [], params
    return [GrammarHook(tok, grammar, engine.config.vocab_size)], grammar_params(params, tok)


def run_agent(engine, messages: Sequence[dict], tools: Sequence[Tool], params: SamplingParams | None = None,
              max_steps: int = 4, tool_choice="auto", constrained: bool = True,
              on_message: Callable[[dict], None] | None = None) -> AgentResult:
    """Run the loop from `messages` (ending with a user message or tool results); see the module docstring.
    `on_message(message)` hears each assistant turn and tool result as it is added (to show them)."""
    if max_steps < 1:
        raise ConfigError(f"max_steps must be at least 1, got {max_steps}")
    params = replace(params or SamplingParams(temperature=0.0, max_tokens=256), n=1)
    params.validate()
    tok = engine.tokenizer
    by_name = {t.name: t for t in tools}
    if len(by_name) != len(tools):
        raise ConfigError("two tools have the same name")
    schemas = [t.schema for t in tools]
    msgs = [dict(m) for m in messages]
    made: list[dict] = []
    stop_reason, steps = "max_steps", 0
    for step in range(max_steps):
        choice = tool_choice if step == 0 or tool_choice == "none" else "auto"
        try:
            prompt = tok.render_prompt(msgs, tools=schemas)
            engine.check_prompts([prompt])
        except PromptError:
            stop_reason = "context"
            break
        hooks, turn_params = turn_setup(engine, schemas, params, choice, constrained)
        reply = engine.generate([prompt], turn_params, hooks=hooks)[0][0]
        steps += 1
        content, calls, problems = parse_tool_calls(tok, reply.tokens) if schemas else (reply.text, [], [])
        message = {"role": "assistant", "content": content if calls else reply.text}
        if calls:
            message["tool_calls"] = calls
        msgs.append(message)
        made += calls
        if on_message:
            on_message(message)
        if not calls:
            stop_reason = "answer" if reply.finish_reason == "stop" else "length"
            break
        for call, problem in zip(calls, problems):
            result = {"role": "tool", "tool_call_id": call["id"], "content": _run(by_name, call, problem)}
            msgs.append(result)
            if on_message:
                on_message(result)
        if reply.finish_reason != "stop" and problems[-1] is not None:
            stop_reason = "length"   # the reply ran out of tokens inside a call
            break
    return AgentResult(msgs, steps, stop_reason, made)


def _run(by_name: dict[str, Tool], call: dict, problem: str | None) -> str:
    """A call's result text; every failure is a result the model reads, never an exception."""
    if problem is not None:
        return f"error: {problem}"
    name = call["function"]["name"]
    tool = by_name.get(name)
    if tool is None:
        return f"error: there is no tool named {name!r} (tools: {', '.join(by_name) or 'none'})"
    try:
        return tool.run(json.loads(call["function"]["arguments"]))
    except ToolError as e:
        return f"error: {e}"
