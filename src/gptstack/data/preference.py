"""Preference pairs (prompt, chosen, rejected) for reward modelling and DPO.

JSONL, one pair per line, in the TRL conventions: `prompt` a string or a message list, `chosen`/`rejected`
strings or a list holding one assistant message; or, without `prompt`, `chosen` and `rejected` as whole
conversations that share everything but the final assistant reply.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError
from ..tokenizer import validate_messages


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[dict]  # messages ending in a user turn
    chosen: str         # the preferred assistant reply
    rejected: str

    def chosen_messages(self) -> list[dict]:
        return [*self.prompt, {"role": "assistant", "content": self.chosen}]

    def rejected_messages(self) -> list[dict]:
        return [*self.prompt, {"role": "assistant", "content": self.rejected}]


def _prompt(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise DataError("'prompt' must be a string or a list of messages")
    validate_messages(value, need_assistant=False)
    if value[-1]["role"] != "user":
        raise DataError("the prompt must end with a user message (the replies answer it)")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _reply(value, name: str) -> str:
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise DataError(f"'{name}' must be a string or a list with one assistant message")


def _split_implicit(chosen, rejected) -> tuple[list[dict], str, str]:
    """TRL's implicit-prompt form: two full conversations, identical up to their last (assistant) turn."""
    for conv, name in ((chosen, "chosen"), (rejected, "rejected")):
        if not isinstance(conv, list) or len(conv) < 2:
            raise DataError(f"without a 'prompt', '{name}' must be a whole conversation (a message list)")
        validate_messages(conv)
        if conv[-1]["role"] != "assistant":
            raise DataError(f"'{name}' must end with the assistant reply")
    if chosen[:-1] != rejected[:-1]:
        raise DataError("without a 'prompt', 'chosen' and 'rejected' must share every message but the last")
    return _prompt(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"]


def parse_pair(obj) -> PreferencePair:
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        raise DataError("expected an object with 'chosen' and 'rejected' (and usually 'prompt')")
    if "prompt" in obj:
        return PreferencePair(_prompt(obj["prompt"]), _reply(obj["chosen"], "chosen"), _reply(obj["rejected"], "rejected"))
    return PreferencePair(*_split_implicit(obj["chosen"], obj["rejected"]))


def load_preferences(path) -> list[PreferencePair]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"preference file '{path}' does not exist")
    from .jsonl import iter_jsonl

    pairs = []
    for lineno, obj in iter_jsonl(path):
        try:
            pairs.append(parse_pair(obj))
        except DataError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
    if not pairs:
        raise DataError(f"preference file '{path}' has no pairs")
    return pairs


def save_preferences(pairs, path) -> None:
    """JSONL with the prompt as messages and the replies as strings; written to a temp file, fsynced and
    renamed, so an interrupted save never leaves half a file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for p in pairs:
                f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected},
                                   ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _PromptTooLong(DataError):
    """A prompt that leaves no room for a reply: skippable, unlike malformed data."""


def _encode_reply(tokenizer, prompt: list[dict], reply: str, max_len: int) -> tuple[list[int], list[int], bool]:
    ids, mask = tokenizer.render_conversation([*prompt, {"role": "assistant", "content": reply}])
    # render_conversation trains every assistant turn; a preference concerns only the final reply
    n_prompt = len(tokenizer.render_prompt(prompt))
    mask = [0] * n_prompt + mask[n_prompt:]
    if n_prompt >= max_len:
        raise _PromptTooLong(f"the prompt is {n_prompt} tokens, leaving no room for a reply within max_len={max_len}")
    truncated = len(ids) > max_len
    return ids[:max_len], mask[:max_len], truncated


def encode_pair(tokenizer, pair: PreferencePair, max_len: int):
    """(chosen_ids, chosen_mask, rejected_ids, rejected_mask); masks cover the final reply and its
    <|assistant_end|>. Replies running past max_len are cut at max_len; a prompt that leaves no room for a
    reply is a DataError (the caller decides whether to skip it: see encode_pairs)."""
    return _encode_pair(tokenizer, pair, max_len)[0]


def _encode_pair(tokenizer, pair: PreferencePair, max_len: int):
    if max_len < 2:
        raise ConfigError(f"max_len must be at least 2 tokens, got {max_len}")
    c_ids, c_mask, c_cut = _encode_reply(tokenizer, pair.prompt, pair.chosen, max_len)
    r_ids, r_mask, r_cut = _encode_reply(tokenizer, pair.prompt, pair.rejected, max_len)
    return (c_ids, c_mask, r_ids, r_mask), c_cut or r_cut


def encode_pairs(tokenizer, pairs, max_len: int):
    """encode_pair over a list, skipping pairs whose prompt does not fit and counting them and the truncated
    ones in the returned stats, for the caller to report."""
    out, stats = [], {"pairs": 0, "kept": 0, "truncated": 0, "skipped": 0}
    for pair in pairs:
        stats["pairs"] += 1
        try:
            encoded, truncated = _encode_pair(tokenizer, pair, max_len)
        except _PromptTooLong:
            stats["skipped"] += 1
            continue
        stats["truncated"] += truncated
        stats["kept"] += 1
        out.append(encoded)
    return out, stats
