"""The one decode loop: a continuous batch that requests join between decode steps and leave when done.

    batcher = Batcher(engine, max_rows=64, chunk=64, prefix_cache=PrefixCache(8192))
    req = batcher.add(Request(engine, [ids], SamplingParams(temperature=0.7, seed=1)))
    while batcher.busy:
        for request, event in batcher.step(): ...      # Event.row is the row *within* its request

`Engine.events` / `generate` / `stream`, `Session.generate`, and the server's scheduler all run through it;
a one-off engine call is a batch with one request in it.

KV layout: one `KVCache` (n_layer, rows, kv_heads, columns, head_dim) holds every running row. All rows
write their next tokens at the same column (`cache.pos`), while each row keeps its own RoPE position
(`next_pos`) and its own valid mask (`cache.valid`), so a row only ever attends to its own tokens. A joining
request is prefilled in a cache of its own (left-padded when it has several prompts), at most `chunk` prompt
tokens per step, interleaved with the decode steps of the running rows; when its prefill is done its cache is
merged in, rows of one request contiguous. A finished (or cancelled) row stays in the cache as a free slot
(all its columns invalid; it is fed a dummy token), and a request that joins later is copied into free slots
in place (its used columns end at the batch's column), so only its own keys and values move. That spares the
two whole-cache copies a merge and a drop would cost (measured: 35-40% of the step time with 32 clients that
each send a new request as soon as one ends). Only when no free slots can take it is it merged by
concatenation (the shorter side left-padded with invalid columns), and then free slots are added for the
requests about to join after it (a burst of arrivals costs one rebuild, not one per request). Free slots are
dropped (one copy) once they are as many as the live rows, and columns no live row uses any more are trimmed
from the left when the cache must grow (one copy either way).

Each request keeps everything of its own: SamplingParams (and a torch.Generator from its seed, drawn only for
its own rows, so its text does not depend on its neighbours), penalties' counts, stop ids and strings, max
tokens and hooks. Hooks see the request's own logits rows and row numbers (prompt_index * n + sample_index),
exactly as `Engine.events` always gave them.

Prefix cache: when a single-prompt request finishes, the keys and values of each of its rows (prompt plus the
generated tokens that were fed back) are kept under their token ids; a later prompt that starts with the same
tokens (a chat resending its history) copies the longest shared prefix's KV and prefills only the rest.
Entries are evicted least-recently-used first once their tokens exceed the budget.
"""

from __future__ import annotations

import codecs
import collections
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..model.gpt import KVCache
from .sampling import SamplingParams, sample_next


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""          # "stop" (stop token/string or hook), "length" (max tokens or context)
    logprobs: list[float] | None = None


@dataclass
class Event:
    """One generated token of one row and the text it released (`delta`, possibly empty). The last event of a
    row has `finish_reason` set; when a stop token ended the row, `token` is that stop token (it is not part
    of the completion) and `delta` flushes any text held back."""
    row: int
    token: int
    delta: str
    finish_reason: str = ""


class _Detok:
    """Incremental detokenizer with stop strings for one row."""

    __slots__ = ("decoder", "text", "emitted", "stops", "max_stop")

    def __init__(self, stops: Sequence[str]):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0
        self.stops = list(stops)
        self.max_stop = max((len(s) for s in stops), default=0)

    def push(self, data: bytes) -> tuple[str, bool]:
        """Add a token's bytes; returns (text released for streaming, stop string hit)."""
        new = self.decoder.decode(data)
        if not new:
            return "", False
        old_len = len(self.text)
        self.text += new
        if self.stops:
            start = max(0, old_len - self.max_stop + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return self.flush(), True
            safe = len(self.text) - self._held_back()
        else:
            safe = len(self.text)
        delta = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return delta, False

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        for k in range(min(self.max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta

    def finish(self) -> str:
        """End of the row: a dangling partial character becomes U+FFFD; returns what was not yet released."""
        self.text += self.decoder.decode(b"", final=True)
        return self.flush()


# ---- prefix cache ---------------------------------------------------------------------------------------------

class PrefixCache:
    """Keys/values of earlier sequences by token ids; LRU eviction by a token budget."""

    def __init__(self, budget_tokens: int = 16384):
        self.budget = budget_tokens
        self.entries: collections.OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = \
            collections.OrderedDict()
        self.tokens = 0
        self.hits = 0
        self.reused_tokens = 0

    def lookup(self, ids: Sequence[int]) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """(m, k, v): the longest prefix of `ids` with cached KV, at most len(ids) - 1 tokens (the last prompt
        token is always computed, for its logits); k/v are (n_layer, kv_heads, >= m, head_dim)."""
        best, best_key = 0, None
        limit = len(ids) - 1
        for key in self.entries:
            m, top = 0, min(len(key), limit)
            while m < top and key[m] == ids[m]:
                m += 1
            if m > best:
                best, best_key = m, key
        if best_key is None:
            return 0, None, None
        self.entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        k, v = self.entries[best_key]
        return best, k, v

    def insert(self, ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        key = tuple(ids)
        if not key or len(key) > self.budget:
            return
        for old in [o for o in self.entries if len(o) <= len(key) and key[:len(o)] == o]:
            self.tokens -= len(old)          # an entry this one extends adds nothing
            del self.entries[old]
        if any(len(o) > len(key) and o[:len(key)] == key for o in self.entries):
            return                           # already covered by a longer entry
        self.entries[key] = (k, v)
        self.tokens += len(key)
        while self.tokens > self.budget:
            old, _ = self.entries.popitem(last=False)
            self.tokens -= len(old)


# ---- requests -------------------------------------------------------------------------------------------------

class Request:
    """One engine call's worth of generation: prompts x n rows with their own params, stops and hooks."""

    def __init__(self, engine, prompts: Sequence[Sequence[int]], params: SamplingParams, hooks=(),
                 max_new: int | None = None, keep_kv: bool = False, tag=None):
        params.validate()
        engine.check_prompts(prompts)
        self.engine = engine
        self.prompts = [list(p) for p in prompts]
        self.params, self.hooks, self.n, self.tag = params, list(hooks), params.n, tag
        self.rows = len(self.prompts) * self.n
        self.completions = [[Completion(i, j) for j in range(self.n)] for i in range(len(self.prompts))]
        self.flat = [self.completions[r // self.n][r % self.n] for r in range(self.rows)]
        if params.logprobs:
            for c in self.flat:
                c.logprobs = []
        longest = max(len(p) for p in self.prompts)
        self.max_new = max_new if max_new is not None else min(params.max_tokens, engine.max_context - longest)
        self.stop_ids = set(params.stop_token_ids if params.stop_token_ids is not None
                            else engine.default_stop_ids())
        self.gen = (torch.Generator(device=engine.device).manual_seed(params.seed)
                    if params.seed is not None else None)
        self.counts: torch.Tensor | None = None          # (rows, V) when penalties are used; made at join
        self.detok = [_Detok(params.stop) for _ in range(self.rows)]
        self.taken: list[list[int]] = [[] for _ in range(self.rows)]   # every token taken, stop tokens too
        self.fed = [0] * self.rows                        # of which fed back to the model
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}     # finished rows' KV, with keep_kv
        self.keep_kv = keep_kv
        # Forced-token fast-forward: when a grammar leaves only one way to go on (the keys and punctuation of
        # a JSON object), those tokens are taken without computing masks or sampling, and fed to the model in
        # one chunk with the sampled token. Only with hooks that all know about forcing (a mixing hook runs
        # a model of its own one token at a time) and without logprobs (forced tokens get no logits).
        self.ff_hooks = [h for h in self.hooks if hasattr(h, "forced_tokens")]
        self.fast_forward = (engine.fast_forward and bool(self.hooks) and len(self.ff_hooks) == len(self.hooks)
                             and not params.logprobs)
        self.prefetch_hooks = [h for h in self.hooks if hasattr(h, "prefetch")]
        self.cancelled = False
        self.started = False       # its prefill began (it left the batcher's waiting line)
        self.finished_rows = 0
        self.prefilled = 0         # prompt tokens actually computed (the rest came from the prefix cache)
        self.reused = 0
        self._pf = None            # prefill state

    @property
    def done(self) -> bool:
        return self.finished_rows == self.rows or self.cancelled

    def start_hooks(self) -> None:
        for h in self.hooks:
            if hasattr(h, "begin"):
                h.begin([list(p) for p in self.prompts], self.n)
            h.start(self.rows)

    def take(self, r: int, t: int, lp: float | None, events: list) -> bool:
        """Add token t to row r; False when the row is finished by it (its last event is queued)."""
        c, d = self.flat[r], self.detok[r]
        self.taken[r].append(t)
        if t in self.stop_ids:
            c.finish_reason = "stop"
            events.append(Event(r, t, d.finish(), "stop"))
            return False
        c.tokens.append(t)
        if lp is not None:
            c.logprobs.append(lp)
        delta, hit = d.push(self.engine.token_bytes(t))
        if hit or any(h.finished(r) for h in self.hooks):
            c.finish_reason = "stop"
        elif len(c.tokens) >= self.max_new:
            c.finish_reason = "length"
        else:
            if delta:
                events.append(Event(r, t, delta))
            return True
        events.append(Event(r, t, delta + d.finish(), c.finish_reason))
        return False


def _cache(k, v, valid, pos) -> KVCache:
    c = KVCache.__new__(KVCache)
    c.k, c.v, c.valid, c.pos, c.max_len = k, v, valid, pos, k.shape[3]
    return c


def _with_columns(c: KVCache, left: int, right: int) -> KVCache:
    """The cache's used columns with `left` invalid columns before them and `right` free ones after."""
    L, B, H, _, D = c.k.shape
    parts_k, parts_v, parts_m = [], [], []
    if left:
        parts_k.append(c.k.new_zeros(L, B, H, left, D))
        parts_v.append(c.v.new_zeros(L, B, H, left, D))
        parts_m.append(c.valid.new_zeros(B, left))
    parts_k.append(c.k[:, :, :, :c.pos])
    parts_v.append(c.v[:, :, :, :c.pos])
    parts_m.append(c.valid[:, :c.pos])
    if right:
        parts_k.append(c.k.new_zeros(L, B, H, right, D))
        parts_v.append(c.v.new_zeros(L, B, H, right, D))
        parts_m.append(c.valid.new_zeros(B, right))
    return _cache(torch.cat(parts_k, 3), torch.cat(parts_v, 3), torch.cat(parts_m, 1), left + c.pos)


HEADROOM = 64     # free columns kept after a merge or growth (a copy of the cache every 64 steps at most)


class Batcher:
    """Runs requests together; `step()` does at most `chunk` prompt tokens of prefill and one decode step."""

    def __init__(self, engine, max_rows: int | None = None, chunk: int | None = None,
                 prefix_cache: PrefixCache | None = None, max_requests: int | None = None):
        self.engine = engine
        self.max_rows = max_rows
        self.max_requests = max_requests
        self.chunk = chunk                 # None: a prompt is prefilled in one forward pass
        self.prefix_cache = prefix_cache
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None      # (R, V) next-token logits of each running row
        self.next_pos: torch.Tensor | None = None    # (R,) RoPE position of each running row's next token
        self.row_req: list[Request | None] = []      # per batch row: its request and its row in it (None,
        self.row_local: list[int] = []               # -1: a free slot)
        self.prefilled_tokens = 0                    # prompt tokens computed (tests count prefix-cache reuse)
        self.steps = 0
        # Called with a step's events as soon as its tokens are sampled, before the forward pass that feeds
        # them back (step() then returns none): a server streams each token one forward pass sooner.
        self.on_events = None

    # ---- bookkeeping ----------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.row_req)

    @property
    def live_rows(self) -> int:
        return sum(r is not None for r in self.row_req)

    def running_requests(self) -> list[Request]:
        seen: dict[int, Request] = {}
        for r in self.prefilling + self.row_req:
            if r is not None:
                seen.setdefault(id(r), r)
        return list(seen.values())

    def add(self, req: Request) -> Request:
        self.waiting.append(req)
        return req

    def add_started(self, req: Request, cache: KVCache, logits: torch.Tensor, next_pos: int) -> Request:
        """A request whose one prompt is already in `cache` (a chat session's), with its last logits."""
        view = _cache(cache.k, cache.v, cache.valid, cache.pos)
        view.max_len = cache.max_len
        pos = torch.tensor([next_pos], device=self.engine.device)
        self._join(req, view, logits, pos)
        return req

    def cancel(self, req: Request) -> None:
        """The request's rows leave the batch at the next step (a waiting one never starts)."""
        req.cancelled = True

    # ---- one step -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[tuple[Request, Event]]:
        self.steps += 1
        self._drop_cancelled()
        self._prefill_step()
        return self._decode_step() if self.row_req else []

    def _drop_cancelled(self) -> None:
        self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
        self.prefilling = [r for r in self.prefilling if not r.cancelled]
        if any(r is not None and r.cancelled for r in self.row_req):
            self._free([i for i, r in enumerate(self.row_req) if r is not None and r.cancelled])

    def _room(self, req: Request) -> bool:
        running = self.running_requests()
        if self.max_requests is not None and running and len(running) >= self.max_requests:
            return False
        rows = self.live_rows + sum(r.rows for r in self.prefilling)
        return self.max_rows is None or not rows or rows + req.rows <= self.max_rows

    def _prefill_step(self) -> None:
        budget = self.chunk if self.chunk is not None else float("inf")
        while budget > 0:
            if not self.prefilling:
                if not self.waiting or not self._room(self.waiting[0]):
                    return
                req = self.waiting.popleft()
                self._begin_prefill(req)
                self.prefilling.append(req)
            req = self.prefilling[0]
            budget -= self._prefill_chunk(req, budget)
            if req._pf["done"] < req._pf["ids"].shape[1]:
                return
            pf = req._pf
            req._pf = None
            self.prefilling.pop(0)
            cache, logits = pf["cache"], pf["logits"]
            cache.expand(req.n)
            if req.n > 1:
                logits = logits.repeat_interleave(req.n, dim=0)
            self._join(req, cache, logits, pf["lens"].repeat_interleave(req.n))

    def _begin_prefill(self, req: Request) -> None:
        req.started = True
        e = self.engine
        longest = max(len(p) for p in req.prompts)
        ids = torch.zeros(len(req.prompts), longest, dtype=torch.long)
        valid = torch.zeros(len(req.prompts), longest, dtype=torch.bool)
        for i, p in enumerate(req.prompts):
            ids[i, longest - len(p):] = torch.as_tensor(p)
            valid[i, longest - len(p):] = True
        cache = KVCache(e.config, len(req.prompts), longest, e.device, e.cache_dtype)
        done = 0
        if self.prefix_cache is not None and len(req.prompts) == 1:
            m, k, v = self.prefix_cache.lookup(req.prompts[0])
            if m:
                cache.k[:, 0, :, :m] = k[:, :, :m]
                cache.v[:, 0, :, :m] = v[:, :, :m]
                cache.valid[:, :m] = True
                cache.pos = done = req.reused = m
        pad = (~valid).sum(dim=1)
        req._pf = {"ids": ids.to(e.device), "valid": valid.to(e.device), "padded": not bool(valid.all()),
                   "pad": pad.to(e.device), "cache": cache, "done": done, "logits": None,
                   "lens": (longest - pad).to(e.device)}

    def _prefill_chunk(self, req: Request, budget) -> int:
        pf = req._pf
        total = pf["ids"].shape[1]
        a = pf["done"]
        b = total if budget == float("inf") else min(total, a + int(budget))
        cols = torch.arange(a, b, device=self.engine.device)
        positions = (cols[None, :] - pf["pad"][:, None]).clamp(min=0)
        new_valid = pf["valid"][:, a:b]
        pf["logits"] = self.engine._forward(pf["ids"][:, a:b], pf["cache"], positions,
                                            new_valid=new_valid if pf["padded"] else None)
        pf["done"] = b
        n_tokens = int(new_valid.sum())
        req.prefilled += n_tokens
        self.prefilled_tokens += n_tokens
        return b - a

    def _join(self, req: Request, cache: KVCache, logits: torch.Tensor, next_pos: torch.Tensor) -> None:
        req.started = True
        req.start_hooks()
        if req.params.uses_penalties():
            req.counts = torch.zeros(req.rows, logits.size(-1), device=self.engine.device)
        if not self.row_req:
            self.cache, self.logits, self.next_pos = cache, logits, next_pos
            self.row_req, self.row_local = [req] * req.rows, list(range(req.rows))
            if (spare := self._coming_rows(req)):
                self._add_free_slots(_with_columns(cache, 0, HEADROOM), spare)
            return
        elif (slot := self._free_run(req.rows)) is not None:
            # into free slots, in place: its used columns end where the batch's do
            if cache.pos > self.cache.pos:   # a prompt longer than the batch's columns: add some (one copy)
                self.cache = _with_columns(self.cache, cache.pos - self.cache.pos, HEADROOM)
            P, p, rows = self.cache.pos, cache.pos, slice(slot, slot + req.rows)
            self.cache.valid[rows] = False
            self.cache.k[:, rows, :, P - p:P] = cache.k[:, :, :, :p]
            self.cache.v[:, rows, :, P - p:P] = cache.v[:, :, :, :p]
            self.cache.valid[rows, P - p:P] = cache.valid[:, :p]
            self.logits[rows] = logits
            self.next_pos[rows] = next_pos
            self.row_req[rows] = [req] * req.rows
            self.row_local[rows] = list(range(req.rows))
            return
        else:
            P, p = self.cache.pos, cache.pos
            width = max(P, p)
            old = _with_columns(self.cache, width - P, HEADROOM)
            new = _with_columns(cache, width - p, HEADROOM)
            self.cache = _cache(torch.cat([old.k, new.k], 1), torch.cat([old.v, new.v], 1),
                                torch.cat([old.valid, new.valid], 0), width)
            self.logits = torch.cat([self.logits, logits], 0)
            self.next_pos = torch.cat([self.next_pos, next_pos], 0)
            self.row_req += [req] * req.rows
            self.row_local += list(range(req.rows))
            if (spare := self._coming_rows(req)):
                self._add_free_slots(self.cache, spare)

    def _coming_rows(self, req: Request) -> int:
        """Rows of the requests that join next (prefilling now, or next in line with room for them): free
        slots made ready for them while the cache is being rebuilt anyway, so that they are copied in place
        instead of each rebuilding it again (a burst of arrivals would otherwise copy it once per request)."""
        live = self.live_rows + req.rows
        n_req = len({id(r) for r in self.row_req if r is not None} | {id(req)})
        rows = 0
        for r in list(self.prefilling) + list(self.waiting):
            if r.cancelled:
                continue
            if self.max_requests is not None and n_req >= self.max_requests:
                break
            if self.max_rows is not None and live + rows + r.rows > self.max_rows:
                break
            rows, n_req = rows + r.rows, n_req + 1
        return rows

    def _add_free_slots(self, c: KVCache, n: int) -> None:
        """`c` (the batch's cache, possibly with more columns) with n free rows after its rows."""
        L, _, H, T, D = c.k.shape
        self.cache = _cache(torch.cat([c.k, c.k.new_zeros(L, n, H, T, D)], 1),
                            torch.cat([c.v, c.v.new_zeros(L, n, H, T, D)], 1),
                            torch.cat([c.valid, c.valid.new_zeros(n, T)], 0), c.pos)
        self.logits = torch.cat([self.logits, self.logits.new_zeros(n, self.logits.shape[1])], 0)
        self.next_pos = torch.cat([self.next_pos, self.next_pos.new_zeros(n)], 0)
        self.row_req += [None] * n
        self.row_local += [-1] * n

    def _free_run(self, n: int) -> int | None:
        """The first batch row of n contiguous free slots, or None."""
        run = 0
        for i, r in enumerate(self.row_req):
            run = run + 1 if r is None else 0
            if run == n:
                return i - n + 1
        return None

    def _free(self, rows: list[int]) -> None:
        """These batch rows' requests are done with them: they become free slots (or leave, see _compact)."""
        reqs = {id(self.row_req[i]): self.row_req[i] for i in rows}.values()
        for i in rows:
            self.row_req[i], self.row_local[i] = None, -1
        self.cache.valid[rows] = False
        # a request whose other rows go on must keep them contiguous (one sampling call per request and step:
        # its seeded draws must not depend on the batch): then the slots leave at once
        self._compact(force=any(not r.done for r in reqs))

    def _compact(self, force: bool = False) -> None:
        """Drop the free slots once they are as many as the live rows (or `force`); none live: empty."""
        live = [i for i, r in enumerate(self.row_req) if r is not None]
        if not live:
            self.cache = self.logits = self.next_pos = None
            self.row_req, self.row_local = [], []
        elif len(live) < len(self.row_req) and (force or len(self.row_req) - len(live) >= len(live)):
            self._select(live)

    def _select(self, keep: list[int]) -> None:
        sel = torch.tensor(keep, device=self.engine.device)
        self.cache.select(sel)
        self.logits, self.next_pos = self.logits[sel], self.next_pos[sel]
        self.row_req = [self.row_req[i] for i in keep]
        self.row_local = [self.row_local[i] for i in keep]
        self._trim(HEADROOM)

    def _trim(self, at_least: int, right: int = 0) -> bool:
        """Drop the columns before the first one a live row uses, if there are `at_least` of them, and keep
        `right` free columns after the used ones (one copy); False when there was nothing to drop."""
        c = self.cache
        live = torch.tensor([r is not None for r in self.row_req], device=c.valid.device)
        used = c.valid[live, :c.pos].any(0)
        first = int(used.to(torch.int8).argmax()) if bool(used.any()) else c.pos
        if first < max(at_least, 1):
            return False
        if right:
            self.cache = _with_columns(_cache(c.k[:, :, :, first:], c.v[:, :, :, first:], c.valid[:, first:],
                                              c.pos - first), 0, right)
        else:
            self.cache = _cache(c.k[:, :, :, first:], c.v[:, :, :, first:], c.valid[:, first:], c.pos - first)
        return True

    def _finish_row(self, req: Request, r: int, i: int) -> None:
        """Row r of req (batch row i) is done: keep its KV where asked, then its text."""
        req.finished_rows += 1
        c = req.flat[r]
        c.text = req.detok[r].text
        want_prefix = self.prefix_cache is not None and len(req.prompts) == 1
        if req.keep_kv or want_prefix:
            cols = self.cache.valid[i, :self.cache.pos]
            pos = self.cache.pos
            k, v = self.cache.k[:, i, :, :pos][:, :, cols], self.cache.v[:, i, :, :pos][:, :, cols]
            if req.keep_kv:
                req.kv[r] = (k, v)
            if want_prefix:
                seq = (req.prompts[0] + req.taken[r])[:k.shape[2]]
                self.prefix_cache.insert(seq, k, v)

    def _decode_step(self) -> list[tuple[Request, Event]]:
        out: list[tuple[Request, Event]] = []
        R = len(self.row_req)
        chunks: list[list[int]] = [[0]] * R    # free slots are fed a dummy token
        done: list[int] = []
        # greedy rows of plain requests (no hooks, penalties or logprobs): one argmax for all of them, not one
        # per request (per-request sampling calls were ~20% of a 32-request step)
        plain = [i for i, r in enumerate(self.row_req) if r is not None and r.params.temperature == 0
                 and not r.hooks and r.counts is None and not r.params.logprobs]
        greedy = dict(zip(plain, self.logits[plain].argmax(dim=-1).tolist())) if len(plain) > 1 else {}
        i = 0
        while i < R:                      # each request's rows are contiguous
            req = self.row_req[i]
            j = i
            while j < R and self.row_req[j] is req:
                j += 1
            if req is None:
                i = j
                continue
            events: list[Event] = []
            kept_local = self._sample(req, i, j, events, done, chunks, greedy)
            out.extend((req, ev) for ev in events)
            if kept_local and req.prefetch_hooks:
                act = torch.tensor(kept_local, device=self.engine.device)
                for h in req.prefetch_hooks:   # e.g. a grammar's next masks, computed while the model runs
                    h.prefetch(act)
            i = j
        if self.on_events is not None and out:
            self.on_events(out)
            out = []
        if done:
            gone = set(done)
            alive = [k for k, r in enumerate(self.row_req) if r is not None and k not in gone]
            self._free(done)
            if self.row_req and len(self.row_req) < R:     # the free slots left the batch
                chunks = [chunks[k] for k in alive]
        if self.row_req:
            self._feed(chunks)
        return out

    def _sample(self, req: Request, a: int, b: int, events: list, done: list, chunks: list,
                greedy: dict[int, int]) -> list[int]:
        """Take the next token(s) of req's rows (batch rows a..b-1); returns the rows that go on."""
        local = self.row_local[a:b]
        if a in greedy:
            toks, lp = [greedy[i] for i in range(a, b)], None
        else:
            toks, lp = self._draw(req, a, b, local)
        kept_local = []
        for k, (r, t) in enumerate(zip(local, toks)):
            alive = req.take(r, t, lp[k] if lp is not None else None, events)
            chunk = [t]
            if alive and req.fast_forward:
                for f in req.ff_hooks[0].forced_tokens(r):
                    one_row, one_tok = torch.tensor([r]), torch.tensor([f])
                    for h in req.hooks:
                        h.accept(one_row, one_tok)
                    if req.counts is not None:
                        req.counts[r, f] += 1
                    alive = req.take(r, f, None, events)
                    if not alive:
                        break
                    chunk.append(f)
            if not alive:
                self._finish_row(req, r, a + k)
                done.append(a + k)
                continue
            req.fed[r] += len(chunk)
            chunks[a + k] = chunk
            kept_local.append(r)
        return kept_local

    def _draw(self, req: Request, a: int, b: int, local: list[int]) -> tuple[list[int], list[float] | None]:
        """The request's own sampling: hooks, its params and generator, penalties, logprobs."""
        p = req.params
        active = torch.tensor(local, device=self.engine.device)
        raw = logits = self.logits[a:b]
        if req.hooks and p.logprobs:
            logits = logits.clone()
        for h in req.hooks:
            logits = h.process(logits, active)
        tok = sample_next(logits, p, req.gen, req.counts[active] if req.counts is not None else None)
        lp = None
        if p.logprobs:
            lp = (raw.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(raw, dim=-1)).tolist()
        for h in req.hooks:
            h.accept(active, tok)
        if req.counts is not None:
            req.counts[active, tok] += 1
        return tok.tolist(), lp

    def _feed(self, chunks: list[list[int]]) -> None:
        e = self.engine
        width = max(len(ch) for ch in chunks)
        if self.cache.pos + width > self.cache.max_len:
            # out of columns: drop those no live row uses (if any) and add free ones, in one copy
            if not self._trim(1, right=max(width, HEADROOM)):
                self.cache.grow(max(self.cache.pos + width - self.cache.max_len, HEADROOM))
        cache = self.cache
        if width == 1:
            ids = torch.tensor(chunks, device=e.device)
            self.logits = e._forward(ids, cache, self.next_pos[:, None], decode=True)
            self.next_pos = self.next_pos + 1
            return
        # rows fed different numbers of tokens: right-align each row's chunk (so the last column is every
        # row's newest token) and mark the left padding invalid, as in a padded prefill
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        new_valid = torch.zeros(len(chunks), width, dtype=torch.bool)
        for i, ch in enumerate(chunks):
            ids[i, width - len(ch):] = torch.tensor(ch)
            new_valid[i, width - len(ch):] = True
        lens = new_valid.sum(dim=1).to(e.device)
        positions = (self.next_pos[:, None] + torch.arange(width, device=e.device)[None, :]
                     - (width - lens)[:, None]).clamp(min=0)
        self.logits = e._forward(ids.to(e.device), cache, positions, new_valid=new_valid.to(e.device))
        self.next_pos = self.next_pos + lens
