"""Byte-level BPE: trained with rustbpe, encoded with tiktoken, exported to a Hugging Face tokenizer.json.

The vocabulary is [BPE ranks..., special tokens...]; `vocab_size` counts both. Ordinary text never produces a
special token, even if it contains the literal string "<|bos|>": specials enter only through the chat renderer.

Split pattern: GPT-4's, except that numbers split into single digits (`\\p{N}`), as Llama and DeepSeek do:
a small model learns carrying in arithmetic far more easily when every digit is its own token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from .errors import CheckpointError, ConfigError, DataError

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|system_start|>", "<|system_end|>",
    # room for tools: a python call and its output
    "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
]

ROLE_TOKENS = {
    "system": ("<|system_start|>", "<|system_end|>"),
    "user": ("<|user_start|>", "<|user_end|>"),
    "assistant": ("<|assistant_start|>", "<|assistant_end|>"),
}
MESSAGE_ROLES = (*ROLE_TOKENS, "tool")

# The tool format of our chat (render_conversation / render_prompt with tools=):
#
#   <|bos|><|system_start|>[system prompt\n\n]Tools:\n{function schema}\n{function schema}<|system_end|>
#   <|user_start|>question<|user_end|>
#   <|assistant_start|>[text]<|python_start|>{"name": "calculator", "arguments": {...}}<|python_end|>
#                            [<|python_start|>...<|python_end|> for each further call]<|assistant_end|>
#   <|output_start|>result of the first call<|output_end|><|output_start|>...<|output_end|>
#   <|assistant_start|>the answer (or more calls)<|assistant_end|>
#
# Each tool is its OpenAI `function` object as one line of JSON. A call is one JSON object, name first, then
# arguments as an object (not the JSON-in-a-string OpenAI sends), with json.dumps' default separators, which
# is exactly what the tool-call grammar lets a constrained model write. The assistant's turn ends after its
# calls, so <|assistant_end|> is where generation stops and the tools run; every tool message is an output
# block (in the order the calls were answered; ids are not shown: the model matches results to calls by
# position); the assistant then gets a new turn. Trained (mask 1): the assistant's text, its calls with their
# <|python_*|> tokens, and <|assistant_end|>; never the tool list or the outputs.
TOOLS_HEADER = "Tools:\n"

# our chat format as a Hugging Face / llama.cpp chat template: it renders what render_prompt and
# render_conversation produce (tests compare it with apply_chat_template and llama.cpp)
OUR_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system_start|>' + message['content'] + '<|system_end|>' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user_start|>' + message['content'] + '<|user_end|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant_start|>' + message['content'] + '<|assistant_end|>' }}"
    "{% else %}{{ raise_exception('roles are system, user and assistant') }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}")


class Tokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        import tiktoken

        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        n = len(mergeable_ranks)
        self.special_ids = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="gptstack", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_ids)
        self.bos_id = self.special_ids["<|bos|>"]
        self.assistant_end_id = self.special_ids["<|assistant_end|>"]

    # ---- training ---------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        import rustbpe

        n_merges_vocab = vocab_size - len(SPECIAL_TOKENS)
        if n_merges_vocab < 256:
            raise ConfigError(f"vocab size {vocab_size} is too small: it needs 256 byte tokens + "
                              f"{len(SPECIAL_TOKENS)} specials at least")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), n_merges_vocab, pattern=SPLIT_PATTERN)
        ranks = {bytes(b): r for b, r in bpe.get_mergeable_ranks()}
        return cls(ranks, SPLIT_PATTERN)

    # ---- encode / decode --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.mergeable_ranks) + len(SPECIAL_TOKENS)

    def special(self, name: str) -> int:
        return self.special_ids[name]

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.enc.encode_ordinary(text)
        return [self.bos_id] + ids if bos else ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads or (os.cpu_count() or 1))

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 byte length of every token (0 for specials): the denominator of bits per byte."""
        lengths = [0] * self.vocab_size
        for tok, rank in self.mergeable_ranks.items():
            lengths[rank] = len(tok)
        return lengths

    def bytes_per_token(self, text: str) -> float:
        ids = self.encode(text)
        return len(text.encode("utf-8")) / max(1, len(ids))

    # ---- chat rendering ---------------------------------------------------------------------------
    def render_conversation(self, messages: Sequence[dict], tools: Sequence[dict] | None = None
                            ) -> tuple[list[int], list[int]]:
        """ids and a loss mask (1 = train on this token) covering exactly the assistant content, its tool
        calls and its <|assistant_end|>, so the model learns to answer, to call and to stop; the tool list
        and the tool results are context, never trained (see the tool format in `render_tools`)."""
        validate_messages(messages)
        return self._render(messages, tools, prompt=False)

    def render_prompt(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        """ids of a conversation ending in <|assistant_start|>, ready for the model to write the next reply
        (or, after tool results, to go on from them)."""
        validate_messages(messages, need_assistant=False)
        ids, _ = self._render(messages, tools, prompt=True)
        return ids

    def _render(self, messages, tools, prompt: bool) -> tuple[list[int], list[int]]:
        S = self.special_ids
        tools = check_tools(tools)
        ids, mask = [self.bos_id], [0]
        if tools and messages[0]["role"] != "system":   # the tool list needs a system turn to live in
            messages = [{"role": "system", "content": ""}, *messages]
        for m in messages:
            role = m["role"]
            if role == "tool":
                body = self.encode(m["content"])
                ids += [S["<|output_start|>"]] + body + [S["<|output_end|>"]]
                mask += [0] * (len(body) + 2)
                continue
            start, end = ROLE_TOKENS[role]
            if role == "system":
                body = self.encode(system_with_tools(m["content"], tools))
            else:
                body = self.encode(m["content"])
                for call in m.get("tool_calls") or ():
                    body += [S["<|python_start|>"]] + self.encode(call_text(call)) + [S["<|python_end|>"]]
            train = 1 if role == "assistant" else 0
            ids += [S[start]] + body + [S[end]]
            mask += [0] + [train] * len(body) + [train]
        if prompt:
            ids.append(S["<|assistant_start|>"])
            mask.append(0)
        return ids, mask

    # ---- persistence ------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.pattern.encode())
        for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(tok + b"\0")
        h.update(json.dumps(SPECIAL_TOKENS).encode())
        return h.hexdigest()[:16]

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])]
        _atomic_write(d / "ranks.tiktoken", "\n".join(lines) + "\n")
        meta = {"pattern": self.pattern, "special_tokens": self.special_ids, "vocab_size": self.vocab_size,
                "fingerprint": self.fingerprint()}
        _atomic_write(d / "meta.json", json.dumps(meta, indent=2))
        _atomic_write(d / "tokenizer.json", json.dumps(self.to_hf_json(), ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        d = Path(directory)
        try:
            meta = json.loads((d / "meta.json").read_text())
            ranks = {}
            for line in (d / "ranks.tiktoken").read_text().splitlines():
                if line:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok)] = int(rank)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(f"'{d}' is not a readable gptstack tokenizer ({type(e).__name__}: {e})") from None
        if meta.get("special_tokens") != {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}:
            raise CheckpointError(f"tokenizer '{d}' has different special tokens than this gptstack version")
        tok = cls(ranks, meta["pattern"])
        if meta.get("fingerprint") not in (None, tok.fingerprint()):
            raise CheckpointError(f"tokenizer '{d}' is corrupt: its ranks do not match the fingerprint in meta.json")
        return tok

    # ---- Hugging Face export ----------------------------------------------------------------------
    def to_hf_json(self) -> dict:
        """A `tokenizers` tokenizer.json with the same split pattern, byte-level alphabet and merges, so HF
        tools encode exactly as we do (tested)."""
        byte_to_unicode = _bytes_to_unicode()

        def to_str(b: bytes) -> str:
            return "".join(byte_to_unicode[x] for x in b)

        vocab = {to_str(t): r for t, r in self.mergeable_ranks.items()}
        merges = []
        for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            if len(tok) == 1:
                continue
            left, right = _split_by_lower_ranks(self.mergeable_ranks, tok, rank)
            merges.append([to_str(left), to_str(right)])
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for t, i in self.special_ids.items()]
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": merges},
        }


def validate_messages(messages: Sequence[dict], need_assistant: bool = True) -> None:
    """Conversations in OpenAI's convention: optional system first, then user/assistant alternating, starting
    with user. An assistant message may carry `tool_calls` ([{"id", "type": "function", "function": {"name",
    "arguments": JSON text}}]); each call is answered, right after that message and in any order, by a
    `tool` message (`tool_call_id` naming it; without one, calls are answered in order), and the assistant
    then goes on (more calls, or its answer)."""
    if not messages:
        raise DataError("conversation has no messages")
    roles = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in MESSAGE_ROLES \
                or not isinstance(m.get("content"), str):
            raise DataError(f"message {i} must be an object with role system|user|assistant|tool and string content")
        if m.get("tool_calls") is not None:
            if m["role"] != "assistant":
                raise DataError(f"message {i}: only assistant messages carry tool_calls (this one is {m['role']})")
            check_tool_calls(m["tool_calls"], f"message {i}")
        if m["role"] == "tool" and not isinstance(m.get("tool_call_id", ""), str):
            raise DataError(f"message {i}: tool_call_id must be a string")
        roles.append(m["role"])
    first = 1 if roles[0] == "system" else 0
    if "system" in roles[first:]:
        raise DataError("a system message may only come first")
    expected, pending = "user", []   # pending: ids of the calls still waiting for their results
    for i in range(first, len(messages)):
        m, role = messages[i], roles[i]
        if pending:
            if role != "tool":
                raise DataError(f"message {i}: {len(pending)} tool call(s) of the assistant have no result (a 'tool' "
                                "message must answer each call before the conversation goes on)")
            call_id = m.get("tool_call_id")
            if call_id:
                if call_id not in pending:
                    raise DataError(f"message {i}: tool_call_id {call_id!r} names no pending call of the assistant "
                                    f"(pending: {', '.join(repr(p) for p in pending)})")
                pending.remove(call_id)
            else:
                pending.pop(0)
            continue
        if role == "tool":
            raise DataError(f"message {i}: a tool result without a preceding assistant tool call")
        if role != expected:
            raise DataError(f"roles out of order: expected user/assistant alternating from a user turn, got {roles}")
        if role == "assistant" and m.get("tool_calls"):
            pending = [c.get("id") or f"#{j}" for j, c in enumerate(m["tool_calls"])]
            expected = "assistant"   # after the results, the assistant goes on
        else:
            expected = "assistant" if role == "user" else "user"
    if pending:
        raise DataError(f"the conversation ends with {len(pending)} tool call(s) that have no result")
    if need_assistant and "assistant" not in roles:
        raise DataError("conversation has no assistant turn: nothing to train on")


def check_tool_calls(calls, where: str) -> None:
    """An assistant message's `tool_calls` in OpenAI's shape, with arguments that parse as a JSON object."""
    if not isinstance(calls, list):
        raise DataError(f"{where}: tool_calls must be a list")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{where}: tool_calls[{j}] must be {{\"type\": \"function\", \"function\": "
                            "{\"name\": ..., \"arguments\": ...}}")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: tool_calls[{j}] ({fn['name']}) arguments are not JSON ({e.msg} at "
                                f"column {e.colno})") from None
        if not isinstance(args, dict):
            raise DataError(f"{where}: tool_calls[{j}] ({fn['name']}) arguments must be a JSON object")


def call_arguments(call: dict) -> dict:
    """A (checked) tool call's arguments as a dict: OpenAI sends them as JSON text."""
    args = call["function"].get("arguments", "{}")
    return json.loads(args) if isinstance(args, str) else dict(args)


def call_text(call: dict) -> str:
    """What the model writes between <|python_start|> and <|python_end|> for one call: the JSON the tool-call
    grammar (infer.constrained.tool_call_grammar) produces, with the same separators."""
    return json.dumps({"name": call["function"]["name"], "arguments": call_arguments(call)}, ensure_ascii=False)


def check_tools(tools) -> list[dict]:
    """A request's `tools` (OpenAI function schemas) checked: [] when there are none."""
    if not tools:
        return []
    if not isinstance(tools, (list, tuple)):
        raise DataError("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    names = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                            "\"parameters\": {...}}}")
        if not isinstance(fn.get("parameters", {}), dict):
            raise DataError(f"tools[{i}] ({fn['name']}): parameters must be a JSON schema object")
        if fn["name"] in names:
            raise DataError(f"tools[{i}]: two tools are named {fn['name']!r}")
        names.add(fn["name"])
    return list(tools)


def system_with_tools(system: str, tools: Sequence[dict]) -> str:
    """The system turn's text: the system prompt, then (when tools are offered) the tool list."""
    if not tools:
        return system
    listing = TOOLS_HEADER + "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return system + "\n\n" + listing if system else listing


def _split_by_lower_ranks(ranks: dict[bytes, int], token: bytes, max_rank: int) -> tuple[bytes, bytes]:
    """Run BPE on `token` using only merges ranked below its own; what is left is the final merge pair."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts = parts[:best] + [parts[best] + parts[best + 1]] + parts[best + 2:]
    if len(parts) != 2:
        raise CheckpointError("tokenizer ranks are not a valid BPE merge table")
    return parts[0], parts[1]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map, which HF ByteLevel uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
