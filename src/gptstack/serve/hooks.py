"""Logits hooks the server adds to a request: log-probabilities with the top alternatives, and OpenAI's
`logit_bias`. (A cancelled request needs no hook: the batcher drops its rows at the next step.)

They follow infer/engine.py's LogitsHook protocol, so the engine's loop is untouched."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # most likely first


class LogprobHook:
    """Records, for every sampled token of every row, the model's log-probability of it (log-softmax of the
    logits as the model produced them: put this hook first, before any mask or bias) and the `k` most likely
    tokens with theirs. No `forced_tokens`: with this hook present the engine samples every token, so none
    goes without logits."""

    def __init__(self, k: int, vocab: int):
        self.k = k
        self.vocab = vocab              # the tokenizer's vocabulary (the model's may be padded past it)
        self.rows: list[list[TokenLogprob]] = []
        self._step = None

    def start(self, n_rows: int) -> None:
        self.rows = [[] for _ in range(n_rows)]
        self._step = None

    def process(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        lsm = torch.log_softmax(logits.float(), dim=-1)
        top = None
        if self.k:
            vals, idx = torch.topk(lsm[:, :self.vocab], min(self.k, self.vocab), dim=-1)
            top = (idx.tolist(), vals.tolist())
        self._step = (rows.tolist(), lsm, top)
        return logits

    def accept(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        if self._step is None:
            return
        row_list, lsm, top = self._step
        self._step = None
        chosen = lsm.gather(1, tokens.to(lsm.device)[:, None].long()).squeeze(1).tolist()
        for i, (r, t) in enumerate(zip(row_list, tokens.tolist())):
            alts = list(zip(top[0][i], top[1][i])) if top is not None else []
            self.rows[r].append(TokenLogprob(int(t), float(chosen[i]), alts))

    def finished(self, row: int) -> bool:
        return False


class LogitBiasHook:
    """OpenAI's `logit_bias`: a fixed value added to some tokens' logits (-100 bans, +100 all but forces)."""

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def start(self, n_rows: int) -> None:
        pass

    def process(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[:, self.ids.to(logits.device)] += self.values.to(logits.device, logits.dtype)
        return logits

    def accept(self, rows, tokens) -> None:
        pass

    def finished(self, row: int) -> bool:
        return False
