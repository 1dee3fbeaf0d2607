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
    def render_conversation(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """ids and a loss mask (1 = train on this token) covering exactly the assistant content and its
        <|assistant_end|>, so the model learns both to answer and to stop."""
        validate_messages(messages)
        ids, mask = [self.bos_id], [0]
        for m in messages:
            start, end = ROLE_TOKENS[m["role"]]
            body = self.encode(m["content"])
            train = 1 if m["role"] == "assistant" else 0
            ids += [self.special_ids[start]] + body + [self.special_ids[end]]
            mask += [0] + [train] * len(body) + [train]
        return ids, mask

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        """ids of a conversation ending in <|assistant_start|>, ready for the model to write the next reply."""
        validate_messages(messages, need_assistant=False)
        ids = [self.bos_id]
        for m in messages:
            start, end = ROLE_TOKENS[m["role"]]
            ids += [self.special_ids[start]] + self.encode(m["content"]) + [self.special_ids[end]]
        return ids + [self.special_ids["<|assistant_start|>"]]

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
    """Conversations: optional system first, then user/assistant alternating, starting with user."""
    if not messages:
        raise DataError("conversation has no messages")
    roles = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLE_TOKENS \
                or not isinstance(m.get("content"), str):
            raise DataError(f"message {i} must be an object with role system|user|assistant and string content")
        roles.append(m["role"])
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        raise DataError("a system message may only come first")
    for i, r in enumerate(body):
        if r != ("user" if i % 2 == 0 else "assistant"):
            raise DataError(f"roles out of order: expected user/assistant alternating from a user turn, got {roles}")
    if need_assistant and "assistant" not in body:
        raise DataError("conversation has no assistant turn: nothing to train on")


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
