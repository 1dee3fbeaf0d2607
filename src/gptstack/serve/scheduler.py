"""The scheduler between HTTP requests and the one engine: a bounded queue, one worker thread, and the
engine's continuous batch (infer/batch.py).

    scheduler = Scheduler(engine, max_batch=8, max_queue=32)
    scheduler.start()
    handle = scheduler.submit(GenRequest(prompts=[ids], params=SamplingParams(...)))   # QueueFull when full
    async for item in handle:        # Delta per piece of text (per choice), then one Result
        ...
    handle.cancel()                  # the client went away: its rows leave the batch at the next step
    scheduler.close()

That interface (submit a request, get an async iterator of deltas, cancel) is the contract the HTTP layer
relies on. Behind it one worker thread owns the engine and steps one `Batcher`: a submitted request joins the
running batch between two decode steps (up to `max_batch` requests at once; the rest wait in arrival order),
its prompt is prefilled `prefill_chunk` tokens per step so that running streams keep going, and it leaves the
batch when its last row finishes, or at the next step after `cancel()`. Every request keeps its own sampling
parameters, seed (its own generator, so its text does not depend on its neighbours), stops, grammar, logit
bias and logprobs. A prefix cache keeps the KV of finished requests, so a chat resending its history
prefills only the new turn.

Events reach the request's asyncio loop through `loop.call_soon_threadsafe`, so the worker never blocks on a
slow client. A cancelled request is dropped from the queue at once or, when running, at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import astuple, dataclass, field

from ..errors import GptstackError
from ..infer.batch import Batcher, PrefixCache, Request
from ..infer.sampling import SamplingParams
from .hooks import LogitBiasHook, LogprobHook, TokenLogprob

log = logging.getLogger("gptstack.serve")


@dataclass
class GenRequest:
    """What to generate: `prompts` (token ids; a chat request has one), `params.n` samples of each."""
    prompts: list[list[int]]
    params: SamplingParams
    grammar: str | None = None              # an llguidance grammar (compile_grammar), for every choice
    top_logprobs: int | None = None         # None: no logprobs; k: each token's logprob and the k most likely
    logit_bias: dict[int, float] | None = None


@dataclass
class Delta:
    """Text released for one choice (`choice` = prompt index * n + sample index), with the logprobs of the
    tokens it covers when asked for; `finish_reason` is set on a choice's last delta, exactly once."""
    choice: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Choice:
    index: int
    text: str
    tokens: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Result:
    """The last item of a request: every choice whole, and the token counts for `usage`."""
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int


class QueueFull(GptstackError):
    """More requests are waiting or running than the server accepts."""


class Cancelled(GptstackError):
    """The request was cancelled (client gone, or the server is shutting down)."""


_END = object()


class Handle:
    """One submitted request. Iterate it (once) from the loop that submitted it."""

    def __init__(self, scheduler: "Scheduler", request: GenRequest, loop: asyncio.AbstractEventLoop):
        self.scheduler = scheduler
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.done = False
        self.request_state = None   # (infer.batch.Request, its LogprobHook, logprobs sent per row) once admitted

    # worker side
    def _push(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:   # the loop is closed: nobody is listening any more
            self.cancelled = True

    def _finish(self, error: BaseException | None = None) -> None:
        if error is not None:
            self._push(error)
        self._push(_END)

    def _put_all(self, items: list) -> None:   # on the loop
        for item in items:
            self.queue.put_nowait(item)

    # client side
    def cancel(self) -> None:
        if not self.done and not self.cancelled:
            self.cancelled = True
            self.scheduler._cancel(self)

    def __aiter__(self):
        return self._items()

    async def _items(self):
        async for items in self.batches():
            for item in items:
                yield item

    async def batches(self):
        """The items as lists: everything that has arrived since the last one (a stream that fell behind
        the engine catches up in one write instead of one per token)."""
        while True:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            for i, item in enumerate(items):
                if item is _END or isinstance(item, BaseException):
                    self.done = True
                    if items[:i]:
                        yield items[:i]
                    if item is _END:
                        return
                    raise item
            yield items

    async def result(self) -> Result:
        async for item in self:
            if isinstance(item, Result):
                self.done = True
                return item
        raise Cancelled("the request ended without a result")


class Scheduler:
    """One worker thread that owns the engine and steps its continuous batch; a bounded queue of handles
    (submit from the event loop; a full queue is QueueFull -> 503); cancelling; closing."""

    def __init__(self, engine, max_batch: int = 8, max_queue: int = 32, prefill_chunk: int = 64,
                 prefix_cache_tokens: int | None = None):
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._waiting: collections.deque[Handle] = collections.deque()   # submitted, not yet admitted
        self._running: list[Handle] = []                                 # in the batcher (or its line)
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0            # busy periods (the batch went from empty to non-empty), and requests
        self.batched_requests = 0   # served (for /health and tests)
        self.prefix_cache = PrefixCache(prefix_cache_tokens if prefix_cache_tokens is not None
                                        else 16 * engine.max_context)
        self.batcher = self._new_batcher()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="gptstack-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            for h in self._running:
                h.cancelled = True
            self._cv.notify_all()
        for h in waiting:
            h._finish(Cancelled("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenRequest) -> Handle:
        """Queue a request; call it from the event loop that will iterate the handle."""
        handle = Handle(self, request, asyncio.get_running_loop())
        with self._cv:
            if self._closed:
                raise Cancelled("the server is shutting down")
            if len(self._waiting) + len(self._running) >= self.max_queue:
                raise QueueFull(f"the server is busy: {self.max_queue} requests are already waiting or running; "
                                "retry shortly")
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    def _cancel(self, handle: Handle) -> None:
        with self._cv:
            try:
                self._waiting.remove(handle)
            except ValueError:
                return     # running: the worker ends its rows at the next step and finishes the handle
        handle._finish()

    def _warm_up(self) -> None:
        """Build llguidance's view of the vocabulary now (about a second), not in the first JSON request."""
        try:
            from ..infer.constrained import ll_tokenizer

            ll_tokenizer(self.engine.tokenizer)
        except Exception:   # constrained requests will report it themselves
            log.debug("llguidance warm-up failed", exc_info=True)

    def _new_batcher(self) -> Batcher:
        b = Batcher(self.engine, max_requests=self.max_batch, chunk=self.prefill_chunk,
                    prefix_cache=self.prefix_cache)
        b.on_events = self._emit   # each token goes out before the forward pass that feeds it back
        return b

    def stats(self) -> dict:
        with self._cv:
            queued = [h for h in self._running if h.request_state is None or not h.request_state[0].started]
            return {"waiting": len(self._waiting) + len(queued), "running": len(self._running) - len(queued),
                    "batches": self.batches, "batched_requests": self.batched_requests,
                    "steps": self.batcher.steps, "prefilled_tokens": self.batcher.prefilled_tokens,
                    "prefix_cache_tokens": self.prefix_cache.tokens,
                    "prefix_reused_tokens": self.prefix_cache.reused_tokens}

    # ---- worker thread -----------------------------------------------------------------------------------
    def _work(self) -> None:
        self._warm_up()
        while True:
            with self._cv:
                while not self._waiting and not self._running and not self._closed:
                    self._cv.wait()
                if self._closed:
                    running, self._running = self._running, []
                    for h in running:
                        h._finish(Cancelled("the server is shutting down"))
                    return
                new = list(self._waiting)
                self._waiting.clear()
                if new and not self._running:
                    self.batches += 1
                self._running.extend(new)
                self.batched_requests += len(new)
            for h in new:
                self._admit(h)
            try:
                self._step()
            except Exception as e:   # a bug: the running requests fail, the server keeps serving
                log.exception("generation failed")
                err = e if isinstance(e, GptstackError) else RuntimeError(
                    f"internal error during generation: {type(e).__name__}: {e}")
                with self._cv:
                    running, self._running = self._running, []
                for h in running:
                    h._finish(err)
                self.batcher = self._new_batcher()

    def _admit(self, h: Handle) -> None:
        """The handle's request joins the batch (its rows start at a coming step), or fails at once."""
        engine, tok = self.engine, self.engine.tokenizer
        r = h.request
        params = r.params
        hooks: list = []
        lp_hook = None
        try:
            if r.top_logprobs is not None:
                lp_hook = LogprobHook(r.top_logprobs, tok.vocab_size)
                hooks.append(lp_hook)    # first: it must see the model's own logits
            if r.logit_bias:
                hooks.append(LogitBiasHook(r.logit_bias))
            if r.grammar is not None:
                from ..infer.constrained import GrammarHook, grammar_params

                hooks.append(GrammarHook(tok, r.grammar, engine.config.vocab_size))
                params = grammar_params(params, tok)
            req = Request(engine, r.prompts, params, hooks, tag=h)
        except Exception as e:
            with self._cv:
                self._running.remove(h)
            if not isinstance(e, GptstackError):
                log.exception("request set-up failed")
                e = RuntimeError(f"internal error during generation: {type(e).__name__}: {e}")
            h._finish(e)
            return
        h.request_state = (req, lp_hook, [0] * req.rows)
        self.batcher.add(req)

    def _emit(self, events) -> None:
        """A step's tokens, as Deltas, to their handles: one call into the event loop for all of them."""
        outbox: dict[Handle, list] = {}
        for req, ev in events:
            h = req.tag
            if h.cancelled:
                continue
            _, lp_hook, sent = h.request_state
            lps: list[TokenLogprob] = []
            if lp_hook is not None:
                upto = len(req.flat[ev.row].tokens)   # the stop token that ended a row is not output
                lps = lp_hook.rows[ev.row][sent[ev.row]:upto]
                sent[ev.row] = upto
            outbox.setdefault(h, []).append(Delta(ev.row, ev.delta, lps, ev.finish_reason or None))
        _deliver(outbox)

    def _step(self) -> None:
        for h in list(self._running):     # cancelled (client gone, or shutting down): leave at this step
            if h.cancelled and h.request_state is not None:
                self.batcher.cancel(h.request_state[0])
        self.batcher.step()
        outbox: dict[Handle, list] = {}
        for h in list(self._running):
            if h.request_state is None:
                continue
            req, lp_hook, _ = h.request_state
            if not req.done:
                continue
            with self._cv:
                self._running.remove(h)
            if not h.cancelled:
                choices = []
                for local, c in enumerate(req.flat):
                    lps = lp_hook.rows[local][:len(c.tokens)] if lp_hook is not None else None
                    choices.append(Choice(local, c.text, list(c.tokens), c.finish_reason, lps))
                outbox.setdefault(h, []).append(Result(choices, sum(len(p) for p in h.request.prompts),
                                                       sum(len(c.tokens) for c in choices)))
            outbox.setdefault(h, []).append(_END)
        _deliver(outbox)


def _deliver(outbox: dict[Handle, list]) -> None:
    """One call into each event loop per step (not one per token: each call wakes the loop's selector)."""
    by_loop: dict = {}
    for h, items in outbox.items():
        by_loop.setdefault(h.loop, []).append((h, items))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_batch, batch)
        except RuntimeError:   # the loop is closed: nobody is listening any more
            for h, _ in batch:
                h.cancelled = True


def _put_batch(batch) -> None:
    for h, items in batch:
        h._put_all(items)
