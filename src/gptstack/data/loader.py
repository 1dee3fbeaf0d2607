"""(B, T) batches from a token stream, sharded by rank, resumable.

The stream is cut into non-overlapping windows of T+1 tokens (input = first T, target = last T, so windows
overlap by one token and every token but the first is a target exactly once per epoch). Documents longer
than T are split across windows; windows may start mid-document and span a `<|bos|>` boundary, which is how
the model learns what a document start means. Each epoch visits the windows in a fresh seeded permutation;
the stream of epochs is continuous, so every window is seen once per epoch even when the batch size does not
divide the window count. Rank r of `world` takes rows [r·B, (r+1)·B) of every global batch.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError


class TokenBatches:
    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world: int = 1, device="cpu"):
        self.tokens = tokens
        self.B, self.T = batch_size, seq_len
        self.seed, self.rank, self.world = seed, rank, world
        self.device = device
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"the training split has {len(tokens)} tokens, fewer than one sequence of "
                            f"{seq_len + 1}: use a larger corpus or a smaller --seq-len")
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def _next_windows(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            take = min(n, self.n_windows - self.cursor)
            out.append(self._perm[self.cursor:self.cursor + take])
            self.cursor += take
            n -= take
            if self.cursor == self.n_windows:
                self.epoch += 1
                self.cursor = 0
                self._perm = self._permutation(self.epoch)
        return np.concatenate(out)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        windows = self._next_windows(self.B * self.world)[self.rank * self.B:(self.rank + 1) * self.B]
        starts = windows * self.T
        rows = np.stack([np.asarray(self.tokens[s:s + self.T + 1], dtype=np.int64) for s in starts])
        rows = torch.from_numpy(rows)
        return {"input_ids": rows[:, :-1].to(self.device), "targets": rows[:, 1:].to(self.device)}

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.cursor / self.n_windows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state.get("seed", self.seed)
        self._perm = self._permutation(self.epoch)


def sequential_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int = 0,
                       rank: int = 0, world: int = 1, device="cpu"):
    """Validation: the split in order, each rank a disjoint slice, up to `max_tokens` targets in all."""
    n_windows = (len(tokens) - 1) // seq_len
    if max_tokens:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    mine = list(range(rank, n_windows, world))
    for i in range(0, len(mine), batch_size):
        starts = [w * seq_len for w in mine[i:i + batch_size]]
        rows = torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts]))
        yield {"input_ids": rows[:, :-1].to(device), "targets": rows[:, 1:].to(device)}
