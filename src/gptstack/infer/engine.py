"""The inference engine: prefill + decode with a preallocated KV cache, many prompts at once.

    engine = Engine(model, tokenizer)
    results = engine.generate([ids_a, ids_b], SamplingParams(n=4, temperature=0.8))   # results[prompt][sample]
    for delta in engine.stream(ids, SamplingParams()): print(delta, end="")

How a batch runs: prompts are left-padded to a common length and prefilled in one forward pass (padding is
masked out and every row's positions start at 0); the cache is then repeated n times so n samples of a
prompt share its prefill; each decode step feeds one token per *unfinished* row — finished rows are dropped
from the cache, so no work is spent on them. Rows stop on their own: a stop token, a stop string, max tokens,
or a hook (e.g. a grammar) that says the output is complete.

Hooks (`LogitsHook`) see and may change each step's logits and learn which token each row took: constrained
decoding, base-model mixing and similar ideas plug in here without touching the loop. `Session` keeps one
sequence's cache across calls, so a chat never re-prefills its history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import torch

from ..config import autocast, resolve_dtype
from ..errors import PromptError
from ..model.gpt import KVCache
from .sampling import SamplingParams, sample_next


class LogitsHook(Protocol):
    def start(self, n_rows: int) -> None: ...
    def process(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor: ...
    def accept(self, rows: torch.Tensor, tokens: torch.Tensor) -> None: ...
    def finished(self, row: int) -> bool: ...


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""          # "stop" (stop token/string or hook), "length"
    logprobs: list[float] | None = None


@dataclass
class Event:
    """One generated token: which row, the token, and the new text it added (for streaming)."""
    row: int
    token: int
    delta: str


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device | str | None = None,
                 dtype: str = "auto"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.amp_dtype = resolve_dtype(dtype, self.device)
        self.config = _base_config(model)
        self.cache_dtype = self.amp_dtype or next(model.parameters()).dtype
        if self.cache_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            self.cache_dtype = torch.float32   # quantized weights still keep a float cache

    @property
    def max_context(self) -> int:
        return self.config.seq_len * 4  # RoPE tables cover 4x the training context

    def default_stop_ids(self) -> list[int]:
        return [self.tokenizer.assistant_end_id, self.tokenizer.bos_id]

    # ---- the core loop ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, ids, cache, position_ids, new_valid=None):
        with autocast(self.device, self.amp_dtype):
            return self.model(ids, kv_cache=cache, position_ids=position_ids, new_valid=new_valid,
                              last_only=True)[:, -1].float()

    def _check_prompts(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> None:
        if not prompts:
            raise PromptError("no prompts given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise PromptError(f"prompt {i} is empty")
            if len(p) + 1 > self.max_context:
                raise PromptError(f"prompt {i} has {len(p)} tokens, longer than the model's context "
                                  f"({self.max_context}); shorten it")

    @torch.no_grad()
    def events(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
               hooks: Sequence[LogitsHook] = (), out: list[list[Completion]] | None = None) -> Iterator[Event]:
        """Run generation, yielding an Event per generated token; fills `out[prompt][sample]`."""
        params.validate()
        self._check_prompts(prompts, params.max_tokens)
        n_prompts, n = len(prompts), params.n
        longest = max(len(p) for p in prompts)
        max_new = min(params.max_tokens, self.max_context - longest)
        cache = KVCache(self.config, n_prompts, longest + max_new, self.device, self.cache_dtype)
        ids = torch.zeros(n_prompts, longest, dtype=torch.long, device=self.device)
        valid = torch.zeros(n_prompts, longest, dtype=torch.bool, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(list(p), device=self.device)
            valid[i, longest - len(p):] = True
        pad = (~valid).sum(dim=1)
        positions = (torch.arange(longest, device=self.device)[None, :] - pad[:, None]).clamp(min=0)
        logits = self._forward(ids, cache, positions, new_valid=valid)
        cache.expand(n)
        logits = logits.repeat_interleave(n, dim=0)
        next_pos = (longest - pad).repeat_interleave(n)

        rows = n_prompts * n
        completions = [[Completion(i, j) for j in range(n)] for i in range(n_prompts)]
        if out is not None:
            out[:] = completions
        flat = [completions[r // n][r % n] for r in range(rows)]
        if params.logprobs:
            for c in flat:
                c.logprobs = []
        stop_ids = torch.tensor(params.stop_token_ids if params.stop_token_ids is not None else self.default_stop_ids(),
                                device=self.device)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        penalties = params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty
        counts = torch.zeros(rows, logits.size(-1), device=self.device) if penalties else None
        for h in hooks:
            h.start(rows)
        active = torch.arange(rows, device=self.device)   # row ids still generating, in cache order
        texts = [""] * rows
        for step in range(max_new):
            for h in hooks:
                logits = h.process(logits, active)
            tok = sample_next(logits, params, gen, counts[active] if counts is not None else None)
            if params.logprobs:
                lp = torch.log_softmax(logits, dim=-1).gather(1, tok[:, None]).squeeze(1)
            for h in hooks:
                h.accept(active, tok)
            keep = []
            tok_list, active_list = tok.tolist(), active.tolist()
            stop_hit = torch.isin(tok, stop_ids).tolist()
            for k, (r, t) in enumerate(zip(active_list, tok_list)):
                c = flat[r]
                if stop_hit[k]:
                    c.finish_reason = "stop"
                    continue
                c.tokens.append(t)
                if params.logprobs:
                    c.logprobs.append(float(lp[k]))
                if counts is not None:
                    counts[r, t] += 1
                text = _safe_decode(self.tokenizer, c.tokens)
                delta = text[len(texts[r]):] if text.startswith(texts[r]) else text
                texts[r] = text
                hit = _find_stop(text, params.stop)
                if hit is not None:
                    texts[r] = text[:hit]
                    c.finish_reason = "stop"
                    yield Event(r, t, delta[:max(0, len(delta) - (len(text) - hit))])
                    continue
                yield Event(r, t, delta)
                if any(h.finished(r) for h in hooks):
                    c.finish_reason = "stop"
                    continue
                keep.append(k)
            if not keep:
                break
            if len(keep) < len(active_list):
                sel = torch.tensor(keep, device=self.device)
                cache.select(sel)
                active, tok, next_pos = active[sel], tok[sel], next_pos[sel]
            logits = self._forward(tok[:, None], cache, next_pos[:, None])
            next_pos = next_pos + 1
        for r, c in enumerate(flat):
            if not c.finish_reason:
                c.finish_reason = "length"
            c.text = texts[r]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
                 hooks: Sequence[LogitsHook] = ()) -> list[list[Completion]]:
        out: list[list[Completion]] = []
        for _ in self.events(prompts, params or SamplingParams(), hooks, out):
            pass
        return out

    def stream(self, prompt: Sequence[int], params: SamplingParams | None = None,
               hooks: Sequence[LogitsHook] = ()) -> Iterator[str]:
        """Text deltas of one sample of one prompt, as they are generated."""
        params = params or SamplingParams()
        if params.n != 1:
            raise PromptError("stream() makes one sample; use generate() for n > 1")
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
    the new user message."""

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
        self._logits = self.engine._forward(x, self.cache, pos)
        self.tokens.extend(ids)

    @torch.no_grad()
    def generate(self, params: SamplingParams, on_delta: Callable[[str], None] | None = None) -> Completion:
        """Sample a reply after the current tokens; its tokens (and the stop token) join the sequence."""
        params.validate()
        if self._logits is None:
            raise PromptError("append a prompt before generating")
        stop_ids = set(params.stop_token_ids if params.stop_token_ids is not None else self.engine.default_stop_ids())
        gen = torch.Generator(device=self.engine.device).manual_seed(params.seed) if params.seed is not None else None
        c = Completion(0, 0)
        text = ""
        for _ in range(min(params.max_tokens, self.free - 1)):
            tok = int(sample_next(self._logits, params, gen)[0])
            self.append([tok])
            if tok in stop_ids:
                c.finish_reason = "stop"
                break
            c.tokens.append(tok)
            new = _safe_decode(self.engine.tokenizer, c.tokens)
            if on_delta and new.startswith(text) and len(new) > len(text):
                on_delta(new[len(text):])
            text = new
            hit = _find_stop(text, params.stop)
            if hit is not None:
                text, c.finish_reason = text[:hit], "stop"
                break
        c.finish_reason = c.finish_reason or "length"
        c.text = text
        return c

    def reset(self) -> None:
        self.cache.pos = 0
        self.cache.valid.zero_()
        self.tokens.clear()
        self._logits = None


def _base_config(model):
    """The GPTConfig under PEFT / reward wrappers."""
    m = model
    for _ in range(6):
        if hasattr(m, "config") and hasattr(m.config, "n_layer"):
            return m.config
        m = getattr(m, "base_model", None) or getattr(m, "model", None) or getattr(m, "module", None)
        if m is None:
            break
    raise TypeError("Engine needs a gptstack GPT (or a wrapper around one)")


def _safe_decode(tokenizer, tokens: list[int]) -> str:
    """Decode, holding back a trailing partial UTF-8 character so streamed text never shows U+FFFD."""
    text = tokenizer.decode(tokens)
    if text.endswith("\ufffd"):
        data = tokenizer.decode_bytes(tokens)
        for cut in range(1, 4):
            try:
                return data[:-cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
    return text


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None
