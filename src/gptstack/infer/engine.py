"""The inference engine: prefill + decode with a preallocated KV cache, many prompts at once.

    engine = Engine(model, tokenizer)
    results = engine.generate([ids_a, ids_b], SamplingParams(n=4, temperature=0.8))   # results[prompt][sample]
    for delta in engine.stream(ids, SamplingParams()): print(delta, end="")

How a batch runs: prompts are left-padded to a common length and prefilled in one forward pass (padding is
masked out and every row's positions start at 0); the cache is then repeated n times so n samples of a
prompt share its prefill; each decode step feeds one token per *unfinished* row — finished rows are dropped
from the cache, so no work is spent on them. Rows stop on their own: a stop token, a stop string, max tokens,
the end of the context, or a hook (e.g. a grammar) that says the output is complete. When a grammar forces
the next tokens (no choice left, like the keys of a JSON object), they are taken without masks or sampling
and fed to the model together in the next step (rows of different chunk lengths are right-aligned and
padded, like a prefill).

Text is detokenized incrementally (an incremental UTF-8 decoder per row, so a character split across tokens
is never shown half, and each step costs O(1) rather than re-decoding the whole completion). Streamed text
holds back a tail that could still become a stop string, so the deltas always concatenate to the final text.

Hooks (`LogitsHook`) see and may change each step's logits and learn which token each row took: constrained
decoding, base-model mixing and similar ideas plug in here without touching the loop. A hook may also define
`begin(prompts, n)` to see the prompt ids first (a hook that runs a model of its own prefills from them), and
`prefetch(rows)`, called before each decode forward pass with the rows it will process, to start work that
needs only the tokens so far (a grammar's next masks) while the model runs.
`Session` keeps one sequence's cache across calls, so a chat never re-prefills its history.

The context is the model's trained `seq_len` unless `context=` asks for more (up to the 4x its RoPE tables
cover): a prompt that does not fit is a PromptError, and generation stops with finish_reason "length" when
the context is full.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol, Sequence

import torch

from ..devices import autocast, resolve_dtype
from ..errors import ConfigError, PromptError
from ..model.gpt import KVCache, core_gpt
from .batch import Batcher, Completion, Event, PrefixCache, Request, _Detok  # noqa: F401 (re-exported)
from .sampling import SamplingParams


class LogitsHook(Protocol):
    """`rows` are the generation rows (prompt_index * n + sample_index) of the logits' rows, in order."""
    def start(self, n_rows: int) -> None: ...
    def process(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor: ...
    def accept(self, rows: torch.Tensor, tokens: torch.Tensor) -> None: ...
    def finished(self, row: int) -> bool: ...


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device | str | None = None,
                 dtype: str = "auto", context: int | None = None, compile: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.amp_dtype = resolve_dtype(dtype, self.device)
        self.config = core_gpt(model).config
        self.cache_dtype = self.amp_dtype or next(model.parameters()).dtype
        if self.cache_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            self.cache_dtype = torch.float32   # quantized weights still keep a float cache
        limit = 4 * self.config.seq_len        # RoPE tables cover 4x the training context
        if context is not None and not 1 < context <= limit:
            raise ConfigError(f"context must be in 2..{limit} (4x the trained {self.config.seq_len}), got {context}")
        self.max_context = context or self.config.seq_len
        # torch.compile of the decode step (one token per row; dynamic shapes as the cache grows). Worth it on
        # GPUs, where per-op launch overhead dominates small models; prefill stays eager.
        self._decode_model = torch.compile(self.model, dynamic=True) if compile else self.model
        self._token_bytes: list[bytes] | None = None
        self.fast_forward = True   # take grammar-forced tokens without sampling (see events())
        # Greedy single-sequence decoding can draft up to this many tokens by prompt lookup (the text that
        # followed the latest earlier occurrence of the last few tokens) and verify them in one forward pass.
        # Off by default: measured on the tiny SFT model's task replies only 14% of drafts survive and it is
        # ~4% slower; on text that repeats or copies it is 1.6-1.8x faster (bench/decode.py).
        self.speculate = 0
        self.spec_stats = {"forwards": 0, "drafted": 0, "accepted": 0}

    def default_stop_ids(self) -> list[int]:
        # an HF tokenizer knows its model's stop ids (end of turn, EOS, generation_config's eos_token_id)
        extra = getattr(self.tokenizer, "stop_ids", None) or []
        return list(dict.fromkeys([self.tokenizer.assistant_end_id, self.tokenizer.bos_id, *extra]))

    def token_bytes(self, tok: int) -> bytes:
        if self._token_bytes is None:  # one table, built once: decode is then a list lookup per token
            self._token_bytes = [self.tokenizer.decode_bytes([i]) for i in range(self.config.vocab_size)]
        return self._token_bytes[tok]

    # ---- the core loop ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, ids, cache, position_ids, new_valid=None, decode: bool = False):
        model = self._decode_model if decode else self.model
        with autocast(self.device, self.amp_dtype):
            return model(ids, kv_cache=cache, position_ids=position_ids, new_valid=new_valid,
                         last_only=True)[:, -1].float()

    @torch.no_grad()
    def _forward_all(self, ids, cache, position_ids):
        with autocast(self.device, self.amp_dtype):
            return self.model(ids, kv_cache=cache, position_ids=position_ids).float()

    def check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        if not prompts:
            raise PromptError("no prompts given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise PromptError(f"prompt {i} is empty: give some text to continue")
            if len(p) >= self.max_context:
                raise PromptError(f"prompt {i} has {len(p)} tokens, which leaves no room in the model's "
                                  f"{self.max_context}-token context; shorten it")
            if min(p) < 0 or max(p) >= self.config.vocab_size:
                raise PromptError(f"prompt {i} has token ids outside the vocabulary (0..{self.config.vocab_size - 1})")

    @torch.no_grad()
    def events(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
               hooks: Sequence[LogitsHook] = (), out: list[list[Completion]] | None = None) -> Iterator[Event]:
        """Run generation, yielding an Event per generated token; fills `out[prompt][sample]`.

        One request in a batch of its own (infer/batch.py holds the loop, which the server shares)."""
        req = Request(self, prompts, params, hooks)
        if out is not None:
            out[:] = req.completions
        batcher = Batcher(self)
        if (self.speculate > 0 and req.rows == 1 and not hooks and params.temperature == 0
                and not params.logprobs and not params.uses_penalties()):
            batcher._begin_prefill(req)
            batcher._prefill_chunk(req, float("inf"))
            pf = req._pf
            req.start_hooks()
            yield from self._speculative(list(prompts[0]), pf["logits"], pf["cache"], int(pf["lens"][0]),
                                         req.max_new, req.take)
            for c, d in zip(req.flat, req.detok):
                c.text = d.text
            return
        batcher.add(req)
        while batcher.busy:
            for _, ev in batcher.step():
                yield ev

    def _speculative(self, history: list[int], logits, cache, pos: int, max_new: int, take) -> Iterator[Event]:
        """Greedy decoding of one sequence with prompt-lookup drafts. The output is plain greedy decoding's
        (a draft token is kept only where it is the model's argmax; a chunked forward pass rounds differently
        from a one-token pass, so only a near-tie, equal to float rounding, could go the other way).

        Each step feeds the pending token plus up to `speculate` drafted tokens in one forward pass; the draft
        is kept up to its first disagreement with the model's own argmax, and the argmax at that point is the
        next pending token, so every pass yields at least one token and at best speculate + 1. The keys and
        values of rejected drafts are dropped by rolling the cache back. Memory-bound small models read
        their weights once per pass, which is where the speed comes from. Text that does not repeat itself
        makes drafts fail; after a wholly rejected draft the lookup pauses (1, 2, 4 ... 16 steps), so such
        text costs little more than plain decoding."""
        pending = int(logits[0].argmax())
        n_out = 0
        skip, backoff = 0, 1   # after a wholly rejected draft, stop drafting for a while (doubling, up to 16 steps)
        while True:
            events: list[Event] = []
            if not take(0, pending, None, events):
                yield from events
                return
            history.append(pending)
            n_out += 1
            if skip:
                skip -= 1
                draft = []
            else:
                draft = _prompt_lookup(history, min(self.speculate, max_new - n_out))
            chunk = [pending] + draft
            start = cache.pos
            if start + len(chunk) > cache.max_len:
                cache.grow(max(start + len(chunk) - cache.max_len, 32))
            ids = torch.tensor([chunk], device=self.device)
            positions = torch.arange(pos, pos + len(chunk), device=self.device)[None]
            greedy = self._forward_all(ids, cache, positions)[0].argmax(-1).tolist()
            accepted = 0
            while accepted < len(draft) and greedy[accepted] == draft[accepted]:
                accepted += 1
            if draft:
                skip, backoff = (backoff, min(2 * backoff, 16)) if accepted == 0 else (0, 1)
            self.spec_stats["forwards"] += 1
            self.spec_stats["drafted"] += len(draft)
            self.spec_stats["accepted"] += accepted
            for t in draft[:accepted]:
                if not take(0, t, None, events):
                    yield from events
                    return
                history.append(t)
                n_out += 1
            yield from events
            keep = start + 1 + accepted              # the pending token and the accepted drafts stay cached
            cache.pos = keep
            cache.valid[:, keep:] = False
            pos += 1 + accepted
            pending = greedy[accepted]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
                 hooks: Sequence[LogitsHook] = ()) -> list[list[Completion]]:
        out: list[list[Completion]] = []
        for _ in self.events(prompts, params or SamplingParams(), hooks, out):
            pass
        return out

    def stream(self, prompt: Sequence[int], params: SamplingParams | None = None,
               hooks: Sequence[LogitsHook] = ()) -> Iterator[str]:
        """Text deltas of one sample of one prompt, as they are generated; they concatenate to the final text."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ConfigError("stream() makes one sample; use generate() for n > 1")
        for ev in self.events([prompt], params, hooks):
            if ev.delta:
                yield ev.delta

    def complete_text(self, text: str, params: SamplingParams | None = None) -> str:
        """Continue raw text (base models): prompt is <|bos|> + text."""
        ids = self.tokenizer.encode(text, bos=True)
        return self.generate([ids], params or SamplingParams())[0][0].text

    def session(self, max_len: int | None = None) -> "Session":
        return Session(self, max_len or self.max_context)


class Session:
    """One growing sequence with its KV cache kept between calls: `append` new tokens (prefilled in one
    chunk), `generate` a reply that is itself kept in the cache. Chat uses this so each turn only prefills
    the new user message. `truncate(n)` rolls the sequence back to its first n tokens (the cache beyond is
    simply overwritten later), which is how an interrupted or trimmed turn is undone without a re-prefill."""

    def __init__(self, engine: Engine, max_len: int):
        self.engine = engine
        self.max_len = max_len
        self.cache = KVCache(engine.config, 1, max_len, engine.device, engine.cache_dtype)
        self.tokens: list[int] = []
        self._logits: torch.Tensor | None = None

    @property
    def free(self) -> int:
        return self.max_len - len(self.tokens)

    @torch.no_grad()
    def append(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        if len(ids) > self.free:
            raise PromptError(f"{len(ids)} new tokens do not fit in the {self.free} left of the context")
        x = torch.tensor([list(ids)], device=self.engine.device)
        pos = torch.arange(len(self.tokens), len(self.tokens) + len(ids), device=self.engine.device)[None]
        self._logits = self.engine._forward(x, self.cache, pos, decode=len(ids) == 1)
        self.tokens.extend(ids)

    @torch.no_grad()
    def generate(self, params: SamplingParams, on_delta: Callable[[str], None] | None = None,
                 hooks: Sequence[LogitsHook] = ()) -> Completion:
        """Sample a reply after the current tokens; its tokens (and the stop token) join the sequence.
        Hooks see the whole sequence so far as their prompt. The reply runs through the engine's one decode
        loop (infer/batch.py) as a request that starts from this session's cache."""
        params.validate()
        if params.n != 1:
            raise ConfigError("a session generates one sample at a time (n=1)")
        if self._logits is None:
            raise PromptError("append a prompt before generating")
        budget = min(params.max_tokens, self.free - 1)
        if budget < 1:
            c = Completion(0, 0, logprobs=[] if params.logprobs else None, finish_reason="length")
            return c
        req = Request(self.engine, [self.tokens], params, hooks, max_new=budget, keep_kv=True)
        batcher = Batcher(self.engine)
        batcher.add_started(req, self.cache, self._logits, len(self.tokens))
        while batcher.busy:
            for _, ev in batcher.step():
                if on_delta and ev.delta:
                    on_delta(ev.delta)
        # the cache now holds the fed tokens (written in place); the last step's tokens, the stop token
        # among them, are appended so that the next turn follows them
        k, v = req.kv[0]
        fed = req.fed[0]
        start = len(self.tokens)
        self.cache.k[:, 0, :, start:start + fed] = k[:, :, start:start + fed]
        self.cache.v[:, 0, :, start:start + fed] = v[:, :, start:start + fed]
        self.cache.pos = start + fed
        self.cache.valid[:, :start + fed] = True
        self.cache.valid[:, start + fed:] = False
        self.tokens.extend(req.taken[0][:fed])
        self.append(req.taken[0][fed:])
        return req.flat[0]

    def truncate(self, n: int) -> None:
        """Keep only the first n tokens (n >= 1); the next append recomputes the logits from there."""
        if not 0 <= n <= len(self.tokens):
            raise ValueError(f"cannot truncate a {len(self.tokens)}-token session to {n}")
        self.cache.pos = n
        self.cache.valid[:, n:] = False
        del self.tokens[n:]
        self._logits = None

    def reset(self) -> None:
        self.truncate(0)


def _prompt_lookup(history: list[int], k: int, max_ngram: int = 3, min_ngram: int = 2) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens (n from
    max_ngram down to min_ngram), or [] — the draft of prompt-lookup decoding. Replies that copy from their
    prompt (names, JSON keys, quoted lines) or repeat themselves get long drafts accepted."""
    if k <= 0:
        return []
    size = len(history)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        tail = history[-n:]
        last = tail[-1]
        for start in range(size - n - 1, -1, -1):
            if history[start + n - 1] == last and history[start:start + n] == tail:
                return history[start + n:start + n + k]
    return []
