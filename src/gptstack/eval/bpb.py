"""Bits per byte: the tokenizer-independent language-modeling score.

    bpb = (sum of -log2 p(token) over target tokens) / (UTF-8 bytes those tokens decode to)

Special tokens (e.g. <|bos|>) carry no bytes and are left out of both sums, so models with different
vocabularies compare fairly on the same text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..errors import DataError


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable[dict], token_bytes: torch.Tensor) -> dict:
    """Mean loss (nats/token) and bits per byte over batches of {"input_ids", "targets"}."""
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.float64, device=device)
    n_tok = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        x, y = batch["input_ids"].to(device), batch["targets"].to(device)
        loss = model(x, y, reduction="none").double()
        b = token_bytes[y.clamp(min=0)] * (y >= 0)
        counted = b > 0
        nats += (loss * counted).sum()
        n_bytes += b.sum()
        n_tok += counted.sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in (nats, n_bytes, n_tok):
            torch.distributed.all_reduce(t)
    if n_bytes.item() == 0:
        raise DataError("nothing to score: the evaluation text has no bytes")
    return {"val_loss": nats.item() / n_tok.item(), "val_bpb": nats.item() / (math.log(2) * n_bytes.item())}


def token_bytes_tensor(tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.float64)


def bpb_of_texts(model, tokenizer, texts: list[str], batch_size: int = 8) -> dict:
    """Score whole texts: each is <|bos|> + its tokens, cut into context-length windows."""
    from ..data.loader import sequential_batches

    seq_len = model.config.seq_len
    stream = []
    for t in texts:
        stream += tokenizer.encode(t, bos=True)
    if len(stream) < 2:
        raise DataError("the text is empty")
    tokens = np.asarray(stream, dtype=np.int64)
    if len(tokens) <= seq_len:
        seq_len = len(tokens) - 1
    result = evaluate_bpb(model, sequential_batches(tokens, batch_size, seq_len), token_bytes_tensor(tokenizer))
    result["tokens"] = int(len(tokens))
    result["bytes"] = int(sum(len(t.encode("utf-8")) for t in texts))
    return result


def read_texts(paths: list[str]) -> list[str]:
    texts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataError(f"'{p}' is not a readable file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"'{p}' is not UTF-8 text") from None
        if not text.strip():
            raise DataError(f"'{p}' is empty")
        texts.append(text)
    if not texts:
        raise DataError("give at least one text file to score")
    return texts
