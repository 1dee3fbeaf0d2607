"""Conversations for SFT: loading (messages JSONL, alpaca, Hugging Face), encoding with an assistant-only loss
mask, and packed, resumable, rank-sharded batches.

Tool use is read in OpenAI's convention: a record's `tools` (function schemas), `tool_calls` on assistant
messages (`function.name`, `function.arguments` as JSON text) and `role: tool` results with `tool_call_id`.
A loaded conversation is a `Conversation`: its messages, and the tools it offers in `.tools`, which the
tokenizer renders into the system turn (the loss covers the calls, never the tool list or the results).

Packing puts several conversations in one row. They must not see each other, so every batch carries
`doc_ids` (which conversation each position belongs to, -1 for padding) and `position_ids` (restarting at 0
per conversation); `block_causal_mask(doc_ids)` turns them into the attention mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..tokenizer import check_tools, validate_messages

# Role names other conventions use (ShareGPT "human"/"gpt", Gemini "model").
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
CANONICAL_FIELDS = ("messages", "role", "content", "instruction", "input", "output")


# ---- loading ----------------------------------------------------------------------------------------------
class Conversation(list):
    """A conversation's messages (it is the list) and the tools it offers (`tools`, [] for none)."""

    def __init__(self, messages=(), tools=None):
        super().__init__(messages)
        self.tools = list(tools or [])


def _content(value, tool_calls: bool = False) -> str:
    """OpenAI content may be a list of parts; text parts are joined, anything else is an error. An assistant
    message that only calls tools may have null content."""
    if isinstance(value, str):
        return value
    if value is None and tool_calls:
        return ""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise DataError("message content must be a string (or a list of text parts)")


def _to_messages(row: dict, fm: dict) -> list[dict]:
    """One record (messages or alpaca form) -> validated OpenAI-style messages."""
    if not isinstance(row, dict):
        raise DataError("expected a JSON object")
    roles = {**ROLE_ALIASES, **fm.get("roles", {})}
    if fm["messages"] in row:
        raw = row[fm["messages"]]
        if not isinstance(raw, list):
            raise DataError(f"'{fm['messages']}' must be a list of messages")
        messages = []
        for i, m in enumerate(raw):
            calls = m.get("tool_calls") if isinstance(m, dict) else None
            if not isinstance(m, dict) or fm["role"] not in m or (fm["content"] not in m and not calls):
                raise DataError(f"message {i} needs '{fm['role']}' and '{fm['content']}' fields")
            role = m[fm["role"]]
            if not isinstance(role, str):
                raise DataError(f"message {i} has a non-string role {role!r}")
            role = roles.get(role, role)
            try:
                message = {"role": role, "content": _content(m.get(fm["content"]), bool(calls))}
            except DataError as e:
                raise DataError(f"message {i}: {e}") from None
            if calls:
                message["tool_calls"] = calls
            if role == "tool" and "tool_call_id" in m:
                message["tool_call_id"] = m["tool_call_id"]
            messages.append(message)
    elif fm["instruction"] in row and fm["output"] in row:
        instruction, extra = row[fm["instruction"]], row.get(fm["input"]) or ""
        if not isinstance(instruction, str) or not isinstance(extra, str) or not isinstance(row[fm["output"]], str):
            raise DataError("alpaca fields instruction, input and output must be strings")
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row[fm["output"]]}]
    else:
        raise DataError(f"expected a '{fm['messages']}' list or alpaca '{fm['instruction']}'/'{fm['output']}' "
                        f"fields, got keys {sorted(row)[:8]}")
    validate_messages(messages)  # raises DataError: no assistant turn, roles out of order, a tool result without a call, ...
    return Conversation(messages, check_tools(row.get("tools")))


def _field_map(field_map: dict | None) -> dict:
    fm = {k: k for k in CANONICAL_FIELDS}
    for k, v in (field_map or {}).items():
        if k != "roles" and k not in fm:
            raise ConfigError(f"unknown field_map key '{k}'; use {', '.join(CANONICAL_FIELDS)} or 'roles'")
        fm[k] = v
    return fm


def load_conversations(spec: str, field_map: dict | None = None, max_examples: int | None = None) -> list[Conversation]:
    """Conversations from a `.jsonl` file (OpenAI `messages` or alpaca rows; a `.json` array of them also
    works) or `hf:NAME[:SPLIT]`.

    `field_map` renames fields for other schemas, e.g. ShareGPT: {"messages": "conversations", "role": "from",
    "content": "value"} (roles human/gpt are understood), plus an optional {"roles": {theirs: ours}}.
    Every malformed record is a DataError naming its file and line (or dataset row)."""
    fm = _field_map(field_map)
    convs: list[list[dict]] = []
    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"max_examples must be positive, got {max_examples}")
    for where, row in _records(spec):
        try:
            convs.append(_to_messages(row, fm))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if len(convs) == max_examples:
            break  # before reading further: lines past the limit are not our concern
    if not convs:
        raise DataError(f"'{spec}' has no conversations")
    return convs


def _records(spec: str):
    """(where, record) pairs; `where` is what an error message names: FILE:LINE, FILE[i] or NAME[i]."""
    if spec.startswith("hf:"):
        yield from _hf_rows(spec[3:])
        return
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"conversation file '{spec}' does not exist (give a .jsonl file or hf:NAME[:SPLIT])")
    if path.suffix == ".json":  # a whole-file JSON array, as some datasets ship
        yield from _json_array_rows(path)
        return
    from .jsonl import iter_jsonl

    for lineno, row in iter_jsonl(path):
        yield f"{path}:{lineno}", row


def _json_array_rows(path: Path):
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: a .json conversation file must hold a list of records (or use .jsonl)")
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row


def _hf_rows(spec: str):
    from .corpus import load_hf_dataset

    name, ds = load_hf_dataset(spec, "conversations")
    for i, row in enumerate(ds):
        yield f"{name}[{i}]", row


# ---- encoding ---------------------------------------------------------------------------------------------
def encode_conversations(tokenizer, conversations, max_len: int, kept: list | None = None):
    """Render each conversation to (ids, mask) with the assistant-only loss mask.

    Conversations longer than `max_len` tokens are cut at the end of the last complete assistant turn that
    fits (or hard at `max_len` when even the first reply does not fit), and kept if any trained token
    survives; otherwise skipped. The returned stats count both, for the caller to report.
    For ChatBatches with seq_len T use max_len = T + 1 (inputs and targets are shifted by one).
    `kept`, when given, receives the index of each kept conversation (what per-conversation records key on)."""
    if max_len < 2:
        raise ConfigError(f"max_len must be at least 2 tokens, got {max_len}")
    end_id = tokenizer.assistant_end_id
    out, stats = [], {"conversations": 0, "kept": 0, "truncated": 0, "skipped": 0, "tokens": 0, "trained_tokens": 0}
    for index, conv in enumerate(conversations):
        stats["conversations"] += 1
        tools = getattr(conv, "tools", None)
        ids, mask = tokenizer.render_conversation(conv, tools=tools) if tools else tokenizer.render_conversation(conv)
        if len(ids) > max_len:
            ends = [i for i in range(max_len) if ids[i] == end_id and mask[i]]
            cut = ends[-1] + 1 if ends else max_len
            ids, mask = ids[:cut], mask[:cut]
            if not any(mask):
                stats["skipped"] += 1
                continue
            stats["truncated"] += 1
        out.append((ids, mask))
        if kept is not None:
            kept.append(index)
        stats["kept"] += 1
        stats["tokens"] += len(ids)
        stats["trained_tokens"] += sum(mask)
    return out, stats


# ---- batches ----------------------------------------------------------------------------------------------
class ChatBatches:
    """Endless iterator of SFT batches: (B, T) input_ids / targets (-1 = no loss) / position_ids / doc_ids /
    example_ids (the index into `encoded` at each position, -1 for padding: per-conversation records read it).

    Each epoch visits every conversation once in a seeded order; rank r of `world` takes every world-th one,
    so ranks see disjoint data. With `pack`, rows are filled first-fit from a look-ahead buffer of the next
    `window` conversations (plain in-order filling wastes a third of a row whenever the next conversation is
    long); the oldest buffered conversation always fits an empty row, so none waits forever. The state is
    (epoch, cursor, buffer): `load_state_dict` resumes exactly. `epoch` counts the stream read into the
    buffer, up to `window` conversations ahead of what has been batched; `epochs_done` is exact. State is per
    rank: save each one's.
    """

    def __init__(self, encoded, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1,
                 pack: bool = True, pad_id: int = 0, window: int = 64, device="cpu", order: list[int] | None = None):
        if batch_size < 1 or seq_len < 1 or window < 1:
            raise ConfigError(f"batch_size, seq_len and window must be positive, got {batch_size}, {seq_len}, {window}")
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is not in [0, {world})")
        if len(encoded) < world:
            raise DataError(f"{len(encoded)} conversations cannot be shared among {world} ranks")
        too_long = sum(len(ids) > seq_len + 1 for ids, _ in encoded)
        if too_long:
            raise ConfigError(f"{too_long} conversations are longer than seq_len + 1 = {seq_len + 1} tokens; "
                              f"encode them with max_len={seq_len + 1}")
        self.encoded, self.batch_size, self.seq_len = encoded, batch_size, seq_len
        self.seed, self.rank, self.world, self.pack, self.pad_id = seed, rank, world, pack, pad_id
        self.device = device
        if order is not None and sorted(order) != list(range(len(encoded))):
            raise ConfigError("a curriculum order must be a permutation of the conversations")
        self.fixed_order = list(order) if order is not None else None   # a curriculum: the same order every epoch
        self.window = window if pack else 1  # one per row needs no look-ahead; keeps `epoch` exact
        self.epoch, self.cursor, self.buffer = 0, 0, []
        self._order = self._epoch_order(0)
        # input positions this rank trains on per epoch, for reporting epochs and tokens seen
        self.epoch_tokens = sum(len(encoded[i][0]) - 1 for i in self._order)

    def _epoch_order(self, epoch: int) -> list[int]:
        if self.fixed_order is not None:
            return self.fixed_order[self.rank::self.world]
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.encoded))
        return perm[self.rank::self.world].tolist()

    def _refill(self) -> None:
        while len(self.buffer) < self.window:
            self.buffer.append(self._order[self.cursor])
            self.cursor += 1
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)

    def _take(self, room: int) -> tuple[int, tuple[list[int], list[int]]] | None:
        """Remove and return (index, conversation) of the first buffered one that fits in `room` positions."""
        self._refill()
        for j, idx in enumerate(self.buffer):
            if len(self.encoded[idx][0]) - 1 <= room:
                del self.buffer[j]
                return idx, self.encoded[idx]
        return None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        inputs = torch.full((B, T), self.pad_id, dtype=torch.long)
        targets = torch.full((B, T), -1, dtype=torch.long)
        positions = torch.zeros((B, T), dtype=torch.long)
        docs = torch.full((B, T), -1, dtype=torch.long)
        examples = torch.full((B, T), -1, dtype=torch.long)
        for row in range(B):
            used, doc = 0, 0
            while (item := self._take(T - used)) is not None:
                idx, (ids, mask) = item
                n = len(ids) - 1  # positions a conversation occupies: inputs ids[:-1] predict ids[1:]
                inputs[row, used:used + n] = torch.tensor(ids[:-1])
                targets[row, used:used + n] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
                positions[row, used:used + n] = torch.arange(n)
                docs[row, used:used + n] = doc
                examples[row, used:used + n] = idx
                used, doc = used + n, doc + 1
                if not self.pack:
                    break
        batch = {"input_ids": inputs, "targets": targets, "position_ids": positions, "doc_ids": docs,
                 "example_ids": examples}
        return {k: v.to(self.device) for k, v in batch.items()}

    @property
    def epochs_done(self) -> float:
        """Epochs of this rank's conversations handed out in batches (the look-ahead buffer not counted)."""
        return self.epoch + (self.cursor - len(self.buffer)) / len(self._order)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "buffer": list(self.buffer), "seed": self.seed,
                "rank": self.rank, "world": self.world, "n_conversations": len(self.encoded)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("seed", "world", "n_conversations"):
            if state.get(k) != mine[k]:
                raise ConfigError(f"cannot resume chat batches: {k} was {state.get(k)} and is now {mine[k]} "
                                  "(resume with the same data, seed and number of ranks)")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.buffer = [int(i) for i in state.get("buffer", [])]
        self._order = self._epoch_order(self.epoch)
        if not 0 <= self.cursor < len(self._order) or any(not 0 <= i < len(self.encoded) for i in self.buffer):
            raise ConfigError("cannot resume chat batches: the saved position is outside this rank's data")


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) doc ids -> (B, 1, T, T) bool, True where query t may attend to key s: same conversation
    (doc id >= 0) and s <= t. Padding positions attend to themselves only, so no softmax row is empty (NaN)."""
    T = doc_ids.shape[-1]
    same = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] >= 0)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=doc_ids.device)
    return ((same & causal) | eye)[:, None]
