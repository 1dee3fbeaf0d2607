"""A multi-turn conversation over one engine `Session`: what `gptstack chat` (or a server) talks through.

    chat = ChatSession(engine, SamplingParams(temperature=0.7, max_tokens=200), system="Be brief.")
    reply = chat.turn("Hello", on_delta=print_delta)      # streams, returns the Completion
    result = chat.command("/temp 0")                       # /reset, /system TEXT, /temp T, /quit

The conversation is kept as tokens in the session's KV cache, so each turn prefills only the new user message:

    <|bos|> [<|system_start|> system <|system_end|>]
    (<|user_start|> message <|user_end|> <|assistant_start|> reply <|assistant_end|>)*

An imported model's tokenizer (hub.HFTokenizer) has its own chat template instead of these tokens: each turn
renders the whole conversation with it, and the session keeps the longest prefix it already holds (the prefix
is usually everything but the new message, so the cost is the same).

A reply that stopped early (a stop string, the token budget) is closed with <|assistant_end|> so the next turn
follows a complete one. When the next message and room for a reply (`reserve`: the reply budget, at most a
quarter of the context) do not fit, the oldest turns are dropped and the history re-prefilled, with a notice;
a message that would not fit even with no history is a PromptError. Notices (turns dropped) go to `on_notice`;
commands return their message in a `CommandResult` instead, for the caller to show.

With `tools` (infer.agent.Tool), each turn runs the agent loop (infer.agent.run_agent) instead: the model may
call tools, their results are appended and it goes on, up to `max_steps` turns; calls and results go to
`on_tool(message)` as they happen and the final answer to `on_delta` (whole, not token by token: the loop
generates each step constrained and parses it before anything is shown). Such turns re-render the
conversation each step rather than keeping its KV cache; the oldest turns are dropped when it no longer fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from ..errors import ConfigError, GptstackError, PromptError
from .engine import Completion, Engine, LogitsHook
from .sampling import SamplingParams

COMMANDS = "/reset, /system TEXT, /temp T, /quit"


@dataclass
class CommandResult:
    command: str           # "/reset", "/system", "/temp", "/quit", or the unknown word as typed
    message: str = ""      # what to tell the user ("" for /quit)
    ok: bool = True        # False: nothing changed (a bad argument, an unknown command)
    quit: bool = False     # /quit: the caller should end the conversation


@dataclass
class _Turn:
    user: str              # the message as given (before any retrieval augmentation)
    reply: str
    ids: list[int]         # user segment + reply + <|assistant_end|>
    agent: list[dict] | None = None   # a tool turn: every message after the user's (calls, results, answer)


class ChatSession:
    """System prompt, turns and sampling settings of one conversation, over one engine session.

    `hooks` are logits hooks applied to every reply (e.g. base-model mixing); `index` (a retrieval Index)
    augments each message with its top `passages` passages; `on_notice(text)` hears about dropped turns."""

    def __init__(self, engine: Engine, params: SamplingParams | None = None, system: str = "",
                 hooks: Sequence[LogitsHook] = (), index=None, passages: int = 3,
                 on_notice: Callable[[str], None] | None = None, tools: Sequence = (), tool_choice="auto",
                 max_steps: int = 4, on_tool: Callable[[dict], None] | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.params = replace(params or SamplingParams(temperature=0.7, top_k=50, max_tokens=200), n=1)
        self.params.validate()
        self.hooks = list(hooks)
        self.index = index
        self.passages = passages
        self.on_notice = on_notice
        self.tools, self.tool_choice, self.max_steps, self.on_tool = list(tools), tool_choice, max_steps, on_tool
        if self.tools:   # checked now: a bad choice should not wait for the first message
            from .constrained import tool_choice_of

            tool_choice_of(tool_choice, [t.schema for t in self.tools])
            if max_steps < 1:
                raise ConfigError(f"max_steps must be at least 1, got {max_steps}")
        self.system = system or ""
        self._turns: list[_Turn] = []
        self.session = engine.session()
        if len(self._head()) + self.reserve > engine.max_context:
            raise PromptError(self._system_too_long())

    # ---- state ------------------------------------------------------------------------------------------
    @property
    def reserve(self) -> int:
        """Tokens kept free for a reply when deciding what history fits."""
        return min(self.params.max_tokens, self.engine.max_context // 4)

    @property
    def messages(self) -> list[dict]:
        """The conversation as chat messages (system first, when set), user messages as given."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for t in self._turns:
            out.append({"role": "user", "content": t.user})
            out += t.agent if t.agent is not None else [{"role": "assistant", "content": t.reply}]
        return out

    @property
    def turns(self) -> int:
        return len(self._turns)

    def _notice(self, text: str) -> None:
        if self.on_notice is not None:
            self.on_notice(text)

    @property
    def _templated(self) -> bool:
        return "<|user_start|>" not in self.tokenizer.special_ids

    def _head(self, system: str | None = None) -> list[int]:
        system = self.system if system is None else system
        if self._templated:
            tok = self.tokenizer
            return tok.encode(tok.render_text([{"role": "system", "content": system}] if system else []))
        S = self.tokenizer.special_ids
        ids = [self.tokenizer.bos_id]
        if system:
            ids += [S["<|system_start|>"]] + self.tokenizer.encode(system) + [S["<|system_end|>"]]
        return ids

    def _system_too_long(self) -> str:
        return f"that system prompt leaves no room for a reply in the {self.engine.max_context}-token context"

    def _rebuild(self, extra: list[int]) -> None:
        """Re-prefill (only on a new system prompt and when the context is full), first dropping the oldest
        turns until the history, `extra` and room for a reply fit (a longer system prompt can overflow it too)."""
        if self._templated:   # the next turn renders the conversation anew
            self.session.reset()
            return
        dropped = 0
        head = self._head()
        while self._turns and (len(head) + sum(len(t.ids) for t in self._turns) + len(extra) + self.reserve
                               > self.engine.max_context):
            self._turns.pop(0)
            dropped += 1
        if dropped:
            self._notice(f"context full: dropped the {dropped} oldest turn(s)")
        self.session.reset()
        self.session.append(head + [t for turn in self._turns for t in turn.ids] + extra)

    # ---- the conversation -------------------------------------------------------------------------------
    def turn(self, text: str, on_delta: Callable[[str], None] | None = None) -> Completion:
        """Answer one user message, streaming the reply's text to `on_delta`; returns the reply.

        If generation is interrupted (an exception from `on_delta`, Ctrl-C), the message and partial reply are
        rolled back, so the conversation is as it was before this turn."""
        if not text.strip():
            raise PromptError("the message is empty")
        content = text
        if self.index is not None:
            from .retrieval import augment

            content = augment(text, self.index.search(text, self.passages))
        if self.tools:
            return self._agent_turn(text, content, on_delta)
        if self._templated:
            return self._templated_turn(text, content, on_delta)
        S = self.tokenizer.special_ids
        seg = ([S["<|user_start|>"]] + self.tokenizer.encode(content)
               + [S["<|user_end|>"], S["<|assistant_start|>"]])
        max_context = self.engine.max_context
        if len(self._head()) + len(seg) + self.reserve > max_context:
            raise PromptError(f"the message ({len(seg)} tokens) does not fit the {max_context}-token "
                              "context with room for a reply; shorten it")
        session = self.session
        if not session.tokens:
            session.append(self._head())
        if session.free < len(seg) + self.reserve:
            self._rebuild(seg)
        else:
            session.append(seg)
        start = len(session.tokens)
        try:
            reply = session.generate(self.params, on_delta=on_delta, hooks=self.hooks)
        except BaseException:
            session.truncate(start - len(seg))
            raise
        if session.tokens[-1] != self.tokenizer.assistant_end_id:
            # stopped by a string, the budget or another stop token: close the turn
            session.truncate(start + len(reply.tokens))
            session.append([self.tokenizer.assistant_end_id])
        self._turns.append(_Turn(text, reply.text, seg + session.tokens[start:]))
        return reply

    def _templated_turn(self, text: str, content: str, on_delta) -> Completion:
        max_context = self.engine.max_context
        message = {"role": "user", "content": content}
        dropped = 0
        while True:
            ids = self.tokenizer.render_prompt(self.messages + [message])
            if len(ids) + self.reserve <= max_context:
                break
            if not self._turns:
                raise PromptError(f"the message ({len(ids)} tokens with the template) does not fit the "
                                  f"{max_context}-token context with room for a reply; shorten it")
            self._turns.pop(0)
            dropped += 1
        if dropped:
            self._notice(f"context full: dropped the {dropped} oldest turn(s)")
        session = self.session
        held = session.tokens
        keep = 0
        while keep < min(len(held), len(ids) - 1) and held[keep] == ids[keep]:
            keep += 1
        session.truncate(keep)
        session.append(ids[keep:])
        try:
            reply = session.generate(self.params, on_delta=on_delta, hooks=self.hooks)
        except BaseException:
            session.reset()   # the next turn re-renders; nothing half-done is kept
            raise
        self._turns.append(_Turn(text, reply.text, []))
        return reply

    def _agent_turn(self, text: str, content: str, on_delta) -> Completion:
        from .agent import run_agent

        schemas = [t.schema for t in self.tools]
        message = {"role": "user", "content": content}
        dropped = 0
        while len(self.tokenizer.render_prompt(self.messages + [message], tools=schemas)) + self.reserve \
                > self.engine.max_context:
            if not self._turns:
                raise PromptError(f"the message with the tool list does not fit the {self.engine.max_context}-"
                                  "token context with room for a reply; shorten it")
            self._turns.pop(0)
            dropped += 1
        if dropped:
            self._notice(f"context full: dropped the {dropped} oldest turn(s)")
        before = self.messages + [message]

        def show(m: dict) -> None:
            if m["role"] == "assistant" and m["content"] and on_delta and not m.get("tool_calls"):
                on_delta(m["content"])
            elif self.on_tool is not None:
                self.on_tool(m)

        result = run_agent(self.engine, before, self.tools, self.params, max_steps=self.max_steps,
                           tool_choice=self.tool_choice, on_message=show)
        added = result.messages[len(before):]
        if added and added[-1]["role"] == "tool":   # the step limit left results unanswered: close the turn
            added.append({"role": "assistant", "content": ""})
            self._notice(f"stopped after {result.steps} step(s) ({result.stop_reason}) without an answer")
        reply = added[-1]["content"] if added else ""
        self._turns.append(_Turn(text, reply, [], added))
        self.session.reset()   # a later plain turn re-prefills from the messages
        return Completion(0, 0, text=reply, finish_reason="stop" if result.stop_reason == "answer" else "length")

    def reset(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self._turns.clear()
        self.session.reset()

    def set_system(self, text: str) -> None:
        """A new system prompt ("" clears it) for the conversation so far and after; the oldest turns are dropped
        if it no longer fits. One that leaves no room for a reply is a PromptError and changes nothing."""
        text = (text or "").strip()
        if len(self._head(text)) + self.reserve > self.engine.max_context:
            raise PromptError(self._system_too_long() + "; kept the previous one")
        self.system = text
        self._rebuild([])

    def set_temperature(self, temperature: float) -> None:
        """Sampling temperature for the next replies (0: greedy); a ConfigError unless a finite number >= 0."""
        try:
            t = float(temperature)
        except (TypeError, ValueError):
            raise ConfigError(f"temperature must be a number >= 0, got {temperature!r}") from None
        if not math.isfinite(t):
            raise ConfigError(f"temperature must be a finite number >= 0, got {temperature!r}")
        params = replace(self.params, temperature=t)
        params.validate()
        self.params = params

    # ---- commands ---------------------------------------------------------------------------------------
    @staticmethod
    def is_command(line: str) -> bool:
        return line.startswith("/")

    def command(self, line: str) -> CommandResult:
        """Run one of /reset, /system TEXT, /temp T, /quit; anything else starting with "/" is unknown."""
        cmd, _, rest = line.strip().partition(" ")
        if cmd == "/quit":
            return CommandResult(cmd, quit=True)
        if cmd == "/reset":
            self.reset()
            return CommandResult(cmd, "conversation reset")
        if cmd == "/system":
            try:
                self.set_system(rest)
            except PromptError as e:
                return CommandResult(cmd, f"error: {e}", ok=False)
            return CommandResult(cmd, f"system prompt {'set' if self.system else 'cleared'}")
        if cmd == "/temp":
            try:
                self.set_temperature(rest)
            except GptstackError:
                return CommandResult(cmd, "usage: /temp T with T >= 0", ok=False)
            return CommandResult(cmd, f"temperature {self.params.temperature}")
        return CommandResult(cmd, f"unknown command {cmd}; commands: /reset /system TEXT /temp T /quit", ok=False)
