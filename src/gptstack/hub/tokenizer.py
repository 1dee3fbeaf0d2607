"""An imported model's own tokenizer behind the interface of ours (tokenizer.Tokenizer).

The vocabulary is the model's tokenizer.json, run by HF `tokenizers`; chat is the model's own `chat_template`,
rendered in a sandboxed Jinja environment the way transformers' `apply_chat_template` renders it (same
options, filters and variables), so an imported instruct model is prompted exactly as it was trained.

The SFT loss mask is derived from the template, not guessed from strings: for assistant turn i the template
renders the conversation up to the turn with the generation prompt (P) and up to and including the turn (F);
F[len(P):] is what the model must write, up to and including the end-of-turn token, and the tokens of the full
rendering whose text starts inside those spans are trained. A template for which P is not a prefix of F (or F
of the whole) cannot give an exact mask and is refused.

Differences from ours, as in transformers: special-token text inside message content is parsed as the special
token, and `encode(bos=True)` adds a BOS only where the model has one (Qwen has none).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Sequence

from ..errors import CheckpointError, DataError
from ..tokenizer import _atomic_write, _bytes_to_unicode, call_arguments, check_tools, validate_messages

# a plain-text format for models that ship without a chat template (base models)
FALLBACK_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
                     "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise DataError(f"the chat template refused the conversation: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise CheckpointError(f"the model's chat_template does not compile ({type(e).__name__}: {e})") from None


class HFTokenizer:
    kind = "hf"

    def __init__(self, tokenizer_json: str, config: dict | None = None, stop_ids: Sequence[int] = (),
                 chat_template: str | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        self.json_text = tokenizer_json
        try:
            self.tk = RustTokenizer.from_str(tokenizer_json)
        except Exception as e:
            raise CheckpointError(f"tokenizer.json is not a readable HF tokenizer ({str(e).splitlines()[0]})") from None
        self.config = dict(config or {})
        self.chat_template = chat_template or FALLBACK_TEMPLATE
        self.has_chat_template = chat_template is not None
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self.n_tokens = max(vocab.values()) + 1
        self._vocab_size = self.n_tokens
        self.special_ids = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        self.token_strings = {i: s for s, i in vocab.items()}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_token_id = vocab.get(self.bos_token) if self.bos_token else None
        self.eos_token_id = vocab.get(self.eos_token) if self.eos_token else None
        if self.eos_token_id is None and stop_ids:
            self.eos_token_id = int(stop_ids[0])
            self.eos_token = self.token_strings.get(self.eos_token_id)
        if self.eos_token_id is None:
            raise CheckpointError("the tokenizer names no eos_token (tokenizer_config.json) and the model no "
                                  "eos_token_id (generation_config.json): generation could never stop")
        # the document boundary (pretraining rows, raw generation's stop, padding): BOS where the model has one
        self.bos_id = self.bos_token_id if self.bos_token_id is not None else self.eos_token_id
        self.assistant_end_id = self._end_of_turn()
        self.stop_ids = list(dict.fromkeys([self.assistant_end_id, self.eos_token_id, *map(int, stop_ids)]))
        self._bytes = self._byte_table()

    # ---- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_model_dir(cls, directory: str | os.PathLike) -> "HFTokenizer":
        """The tokenizer of an HF model directory: tokenizer.json, tokenizer_config.json (special tokens,
        chat_template; or chat_template.jinja), and the stop ids of generation_config.json / config.json."""
        d = Path(directory)
        if not (d / "tokenizer.json").exists():
            extra = " (it has only a slow tokenizer.model; save it with a fast tokenizer)" \
                if (d / "tokenizer.model").exists() else ""
            raise CheckpointError(f"'{d}' has no tokenizer.json{extra}")
        config = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").exists() else {}
        template = config.get("chat_template")
        if isinstance(template, list):   # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if (d / "chat_template.jinja").exists():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        elif (d / "chat_template.json").exists():
            template = _read_json(d / "chat_template.json").get("chat_template", template)
        stops: list[int] = []
        for name in ("generation_config.json", "config.json"):
            if (d / name).exists():
                eos = _read_json(d / name).get("eos_token_id")
                stops += [eos] if isinstance(eos, int) else [int(e) for e in (eos or []) if isinstance(e, int)]
        return cls((d / "tokenizer.json").read_text(encoding="utf-8"), config, stops, template)

    def _end_of_turn(self) -> int:
        """The token the template closes an assistant turn with (<|im_end|>, <|eot_id|>, ...): rendered once
        with a probe reply and read off what follows it; the EOS when the template closes with plain text."""
        probe = "PROBE-REPLY-7f3a"
        try:
            text = self.render_text([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
        except DataError:
            return self.eos_token_id
        rest = text[text.find(probe) + len(probe):].lstrip() if probe in text else ""
        best = None
        for content, i in self.special_ids.items():
            if rest.startswith(content) and (best is None or len(content) > len(best[0])):
                best = (content, i)
        return best[1] if best else self.eos_token_id

    def _byte_table(self) -> list[bytes]:
        """Each id's bytes: byte-level BPE through GPT-2's byte map, SentencePiece-style vocabularies through
        ▁ -> space and <0xHH> byte tokens; added tokens as their text."""
        spec = json.loads(self.json_text)
        byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
        inverse = {c: b for b, c in _bytes_to_unicode().items()}
        added = {t.content for t in self.tk.get_added_tokens_decoder().values()}
        table = []
        for i in range(self.n_tokens):
            s = self.token_strings.get(i)
            if s is None:
                table.append(b"")
            elif s in added:
                table.append(s.encode("utf-8"))
            elif byte_level:
                table.append(bytes(inverse[c] for c in s) if all(c in inverse for c in s) else s.encode("utf-8"))
            elif len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
                table.append(bytes([int(s[3:5], 16)]))
            else:
                table.append(s.replace("\u2581", " ").encode("utf-8"))
        return table

    # ---- the tokenizer interface ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def pad_to(self, model_vocab: int) -> None:
        """Models often pad their embedding past the tokenizer (Qwen2: 151936 rows for 151665 tokens); the
        extra ids exist for the model and decode to nothing."""
        if model_vocab < self.n_tokens:
            raise CheckpointError(f"the tokenizer has {self.n_tokens} tokens but the model's embedding only "
                                  f"{model_vocab} rows: they do not belong together")
        self._vocab_size = model_vocab
        self._bytes += [b""] * (model_vocab - len(self._bytes))

    def special(self, name: str) -> int:
        return self.special_ids[name]

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id] + ids if bos and self.bos_token_id is not None else ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self._bytes[i] for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> list[int]:
        specials = set(self.special_ids.values())
        return [0 if i in specials else len(b) for i, b in enumerate(self._bytes)]

    def bytes_per_token(self, text: str) -> float:
        return len(text.encode("utf-8")) / max(1, len(self.encode(text)))

    # ---- chat -------------------------------------------------------------------------------------------
    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = False, tools=None) -> str:
        variables = {k: _token_text(v) for k, v in self.config.items()
                     if k.endswith("_token") and _token_text(v) is not None}
        variables.update(bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        try:
            return _compile_template(self.chat_template).render(
                messages=[_for_template(m) for m in messages], add_generation_prompt=add_generation_prompt,
                tools=list(tools) if tools else None, **variables)
        except DataError:
            raise
        except Exception as e:   # a template error on this conversation, not a bug of ours
            raise DataError(f"the chat template failed on this conversation ({type(e).__name__}: {e})") from None

    def _check_tool_use(self, messages: Sequence[dict], tools) -> None:
        """Tools, tool calls or tool results for a template without a tool format are an error, not dropped."""
        uses = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if uses and not self.tool_format()["ok"]:
            raise DataError(f"this model's chat template has no tool format ({self.tool_format()['why']}); "
                            "tools, tool calls and tool results cannot be rendered for it")

    def tool_format(self) -> dict:
        """How the template writes tools, read off probe renderings: {"ok", "why", "open", "close", "name_key",
        "arguments_key"}: a call is `open` + JSON object {name_key: name, arguments_key: {...}} + `close` in the
        assistant's reply (Qwen2/Qwen3: "<tool_call>\n", "\n</tool_call>", "name", "arguments")."""
        if "_tool_format" in self.__dict__:
            return self.__dict__["_tool_format"]
        fmt = {"ok": False, "why": "", "open": None, "close": None, "name_key": None, "arguments_key": None}
        name, value = "probe_tool_7f3a", "probe-value-7f3a"
        tool = {"type": "function", "function": {"name": name, "description": "probe",
                                                 "parameters": {"type": "object",
                                                                "properties": {"q": {"type": "string"}}}}}
        call = {"id": "call_probe", "type": "function",
                "function": {"name": name, "arguments": json.dumps({"q": value})}}
        user = {"role": "user", "content": "hi"}
        assistant = {"role": "assistant", "content": "", "tool_calls": [call]}
        result = {"role": "tool", "tool_call_id": "call_probe", "content": "probe-result-7f3a"}
        try:
            before = self.render_text([user], add_generation_prompt=True, tools=[tool])
            upto = self.render_text([user, assistant], tools=[tool])
            answered = self.render_text([user, assistant, result], add_generation_prompt=True, tools=[tool])
        except DataError as e:
            fmt["why"] = str(e)
        else:
            reply = upto[len(before):] if upto.startswith(before) else ""
            at = reply.find(f'"{name}"')
            brace = reply.rfind("{", 0, at) if at >= 0 else -1
            try:
                obj, end = json.JSONDecoder().raw_decode(reply, brace) if brace >= 0 else (None, 0)
            except json.JSONDecodeError:
                obj = None
            keys = {k: v for k, v in obj.items()} if isinstance(obj, dict) else {}
            name_key = next((k for k, v in keys.items() if v == name), None)
            args_key = next((k for k, v in keys.items() if v == {"q": value} or v == json.dumps({"q": value})), None)
            if name not in before:
                fmt["why"] = "it ignores the tools list"
            elif name_key is None or args_key is None:
                fmt["why"] = "it does not write an assistant's tool calls as a JSON object"
            elif "probe-result-7f3a" not in answered:
                fmt["why"] = "it drops tool results"
            else:
                end_text = self.token_strings.get(self.assistant_end_id, "")
                tail = reply[end:]
                close = tail[:tail.find(end_text)] if end_text and end_text in tail else tail
                fmt.update(ok=True, open=reply[:brace].lstrip("\n") or None, close=close.rstrip() or None,
                           name_key=name_key, arguments_key=args_key)
        self.__dict__["_tool_format"] = fmt
        return fmt

    def render_prompt(self, messages: Sequence[dict], tools=None) -> list[int]:
        validate_messages(messages, need_assistant=False)
        tools = check_tools(tools)
        self._check_tool_use(messages, tools)
        return self.encode(self.render_text(messages, add_generation_prompt=True, tools=tools))

    def render_conversation(self, messages: Sequence[dict], tools=None) -> tuple[list[int], list[int]]:
        """ids and the assistant-only loss mask (see the module docstring); with tools, the template's own tool
        format renders the tool list, the calls (trained: they are the assistant's reply) and the tool
        results (not trained: they are outside every assistant span)."""
        validate_messages(messages)
        tools = check_tools(tools)
        self._check_tool_use(messages, tools)
        full = self.render_text(messages, tools=tools)
        end_text = self.token_strings.get(self.assistant_end_id, "")
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render_text(messages[:i], add_generation_prompt=True, tools=tools)
            upto = self.render_text(messages[:i + 1], tools=tools)
            if not upto.startswith(before) or not full.startswith(upto):
                raise DataError("this chat template renders earlier turns differently once later ones follow, so "
                                "the assistant-only loss mask cannot be derived exactly (turn "
                                f"{i} of {len(messages)})")
            reply = upto[len(before):]
            content = m["content"].strip()
            at = reply.find(content) + len(content) if content and content in reply else 0
            if m.get("tool_calls"):   # the calls follow the text: the turn ends after the last of them
                last = m["tool_calls"][-1]["function"]["name"]
                at = max(at, reply.rfind(f'"{last}"'))
            close = reply.find(end_text, at) if end_text else -1
            end = close + len(end_text) if close >= 0 else len(reply.rstrip())
            spans.append((len(before), len(before) + end))
        enc = self.tk.encode(full, add_special_tokens=False)
        mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc.offsets]
        return list(enc.ids), mask

    # ---- identity and persistence -----------------------------------------------------------------------
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.json_text.encode("utf-8"))
        h.update(b"\0" + self.chat_template.encode("utf-8"))
        return h.hexdigest()[:16]

    def to_hf_json(self) -> dict:
        return json.loads(self.json_text)

    def to_llguidance(self):
        from llguidance import LLTokenizer

        return LLTokenizer(self.json_text, n_vocab=self.vocab_size, eos_token=self.assistant_end_id)

    def tokenizer_config(self) -> dict:
        """tokenizer_config.json as transformers reads it (AutoTokenizer loads the fast tokenizer from it)."""
        cfg = {k: v for k, v in self.config.items() if k not in ("chat_template", "added_tokens_decoder")}
        cfg.update(tokenizer_class="PreTrainedTokenizerFast", bos_token=self.bos_token, eos_token=self.eos_token)
        if self.has_chat_template:
            cfg["chat_template"] = self.chat_template
        return cfg

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write(d / "tokenizer.json", self.json_text)
        _atomic_write(d / "tokenizer_config.json", json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False))
        meta = {"kind": "hf", "vocab_size": self.n_tokens, "stop_ids": self.stop_ids,
                "fingerprint": self.fingerprint()}
        _atomic_write(d / "meta.json", json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HFTokenizer":
        d = Path(directory)
        meta = _read_json(d / "meta.json")
        tok = cls((d / "tokenizer.json").read_text(encoding="utf-8"), _read_json(d / "tokenizer_config.json"),
                  meta.get("stop_ids") or (), _read_json(d / "tokenizer_config.json").get("chat_template"))
        if meta.get("fingerprint") not in (None, tok.fingerprint()):
            raise CheckpointError(f"tokenizer '{d}' is corrupt: it does not match the fingerprint in meta.json")
        return tok


def _for_template(message: dict) -> dict:
    """A message as chat templates expect it (transformers' convention): tool-call arguments as a dict."""
    m = dict(message)
    if m.get("tool_calls"):
        m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": call_arguments(c)}}
                           for c in m["tool_calls"]]
    return m


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{path}' is not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' must hold a JSON object")
    return data
