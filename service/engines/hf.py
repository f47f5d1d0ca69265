"""transformers engine: continuous batching of requests for different users in one pass.

A scheduler thread owns the model and a `RunningBatch`. Between two decoding steps it
admits waiting requests (up to `max_batch_size` rows in all): each request's adapter
version is put in a slot of the multi-LoRA bank (from the host-RAM adapter cache, or the
store on a miss), the newcomers are prefilled together and join the running rows; rows
that finish (end of sequence, max_tokens, or a caller that went away) leave at once. Every
row reads its own adapter through the per-row slot index, so a batch mixing many users
costs one forward per step. Tokens reach the caller's asyncio loop as they are produced.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from loraloop.core.model_loading import LoadedModel, load_model
from loraloop.core.multi_lora import BASE_SLOT
from loraloop.core.sampling import sampling_log_softmax
from loraloop.core.settings import Settings
from loraloop.service.adapters.host_cache import HostAdapterCache
from loraloop.service.adapters.slots import AdapterSlots, SlotsPinned
from loraloop.service.engines.batching import RunningBatch
from loraloop.service.engines.protocol import (
    AdapterLoadError,
    Engine,
    GenerationRequest,
    TokenChunk,
    adapter_load_error,
    encode_with,
)

log = logging.getLogger(__name__)
_DONE = object()
# Sampling temperatures below this are sampled at this one: logits divided by a
# (valid, float32) temperature of 1e-38 overflow to inf, and the softmax of inf is NaN.
# At 1e-4 the distribution is already one-hot for any logit gap a model produces.
MIN_SAMPLING_TEMPERATURE = 1e-4


@dataclass
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[object]
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued: float = field(default_factory=time.monotonic)  # for time to first token

    def emit(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


@dataclass
class _Row:
    """A request in the running batch."""

    job: _Job
    slot: int
    generator: torch.Generator | None
    produced: list[int] = field(default_factory=list)
    text: str = ""


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return (tokens, log-probs under the distribution sampled).

    Rows with temperature 0 are greedy and report the model's own (temperature 1)
    log-probability of the chosen token, since a greedy choice has no proper distribution.
    Everything runs on the logits' device: `temperature` and `top_p` are moved there, and
    each generator must be on it (a CUDA generator for logits on a GPU).
    """
    logits = logits.float()
    temperature, top_p = temperature.to(logits.device), top_p.to(logits.device)
    greedy = temperature <= 0
    sampled = (~greedy).nonzero().flatten().tolist()
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    logprobs = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
    if len(sampled) < logits.shape[0]:  # greedy rows: argmax and the model's log-prob of it
        at = greedy.nonzero().flatten()
        best = logits[at].argmax(-1)
        tokens[at] = best
        logprobs[at] = logits[at].log_softmax(-1).gather(-1, best[:, None]).squeeze(-1)
    if not sampled:
        return tokens, logprobs
    rows = torch.tensor(sampled, dtype=torch.long, device=logits.device)
    scaled = logits[rows] / temperature[rows, None].clamp(min=MIN_SAMPLING_TEMPERATURE)
    logp = sampling_log_softmax(scaled, top_p[rows])  # the rule the learner applies too
    picks = draw(logp.exp(), [generators[i] for i in sampled])
    tokens[rows] = picks
    logprobs[rows] = logp.gather(-1, picks[:, None]).squeeze(-1)
    return tokens, logprobs


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token index per row of `probs` (rows sum to about 1), by inverse transform: a
    uniform u per row (from the row's own generator when it has one) and the first token
    whose cumulative probability exceeds u * total. One uniform a row instead of one per
    token (torch.multinomial's cost here: ~15x slower on 16 x 2048), and a token of zero
    probability is never drawn: u stays below the total, and ties go to the right."""
    cumulative = probs.cumsum(-1)
    total = cumulative[:, -1:]
    u = torch.empty_like(total)
    free = [j for j, g in enumerate(generators) if g is None]
    if free:
        u[free] = torch.rand(len(free), 1, device=probs.device, dtype=probs.dtype)
    for j, g in enumerate(generators):
        if g is not None:
            u[j] = torch.rand(1, generator=g, device=probs.device, dtype=probs.dtype)
    below = torch.nextafter(total, torch.zeros_like(total))  # u * total < total, always
    return torch.searchsorted(cumulative, torch.minimum(u * total, below), right=True).squeeze(-1)


class HFEngine(Engine):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_id = settings.model_id or settings.model
        self._lm: LoadedModel | None = None
        self._slots: AdapterSlots | None = None
        self.host_cache = HostAdapterCache(
            settings.host_cache_mb * 2**20, settings.host_cache_adapters
        )
        self._inbox: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._slot_lock = threading.Lock()
        self.batches = 0  # running batches started from idle (rows join and leave inside)
        self.prefills = 0  # forwards that admitted new rows
        self.steps = 0  # decoding forwards over the running rows
        self.peak_rows = 0
        self.running_rows = 0  # rows in the running batch now
        # Requests whose caller went away (deadline passed, client cancelled) before they
        # finished: dropped from the batch, or from the queue before they got a row.
        self.cancelled = 0
        self.cancelled_tokens = 0  # tokens those had produced when they were dropped
        self.metrics: Any = None  # service.metrics.ServerMetrics, set by the server

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._run, name="hf-engine", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        lm = load_model(self.settings, slots=self.settings.adapter_slots + 1)
        self._lm = lm
        self.model_id = lm.model_id
        self._slots = AdapterSlots(lm.bank.slots, lm.bank.load)

    async def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            raise RuntimeError("engine not started")
        return self._lm

    @property
    def slots(self) -> AdapterSlots:
        if self._slots is None:
            raise RuntimeError("engine not started")
        return self._slots

    # --- API ----------------------------------------------------------------------------
    def encode(self, prompt: str | None, messages: list[tuple[str, str]] | None) -> list[int]:
        return encode_with(self.lm.tokenizer, prompt, messages)

    def finish_reason(self, token_ids: list[int], max_tokens: int) -> str:
        eos = self.lm.tokenizer.eos_token_id
        return "stop" if token_ids and token_ids[-1] == eos else "length"

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        job = _Job(request, asyncio.get_running_loop(), asyncio.Queue())
        self._inbox.put(job)
        try:
            while True:
                item = await job.out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, TokenChunk)
                yield item
        finally:
            job.cancelled.set()

    def drop_user(self, user_id: str) -> None:
        """Forget a deleted user's resident adapters (engine slots and host cache)."""
        self.host_cache.drop_user(user_id)
        if self._slots is not None:
            with self._slot_lock:
                self._slots.drop_user(user_id)

    # --- scheduler thread ---------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        lm = self.lm
        batch = RunningBatch(lm.model, lm.bank, lm.tokenizer.pad_token_id)
        rows: list[_Row] = []
        waiting: deque[_Job] = deque()
        stopping = False
        while True:
            if not rows and not waiting:
                if stopping:
                    return
                job = self._inbox.get()  # idle: block until work comes
                if job is None:
                    return
                waiting.append(job)
            while True:  # everything that arrived meanwhile
                try:
                    nxt = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True  # finish what is running and waiting, then stop
                else:
                    waiting.append(nxt)
            try:
                self._drop_cancelled(batch, rows)  # their slots go to waiting jobs at once
                if waiting and len(rows) < self.settings.max_batch_size:
                    if not rows:
                        self.batches += 1
                    self._admit(batch, rows, waiting)
                if rows:
                    self._step(batch, rows)
            except Exception as exc:  # a bug must fail the requests, never the thread
                log.exception("decoding step failed")
                for row in rows:
                    row.job.emit(RuntimeError(f"generation failed: {exc}"))
                rows.clear()
                batch.keep([])
            self.running_rows = len(rows)

    def _drop_cancelled(self, batch: RunningBatch, rows: list[_Row]) -> None:
        """Rows whose caller went away leave the batch before the next forward pass."""
        keep = [i for i, r in enumerate(rows) if not r.job.cancelled.is_set()]
        if len(keep) == len(rows):
            return
        for row in rows:
            if row.job.cancelled.is_set():
                self.cancelled += 1
                self.cancelled_tokens += len(row.produced)
        batch.keep(keep)
        rows[:] = [rows[i] for i in keep]

    def _admit(self, batch: RunningBatch, rows: list[_Row], waiting: deque[_Job]) -> None:
        """Give waiting jobs an adapter slot, prefill them together and add them to the
        running batch. Jobs whose adapter fails to load are answered with the error."""
        pinned = {r.slot for r in rows}
        new: list[_Row] = []
        blocked: list[_Job] = []  # need a slot while all are pinned: keep their place
        with self._slot_lock:
            while waiting and len(rows) + len(new) < self.settings.max_batch_size:
                job = waiting.popleft()
                if job.cancelled.is_set():
                    self.cancelled += 1
                    continue
                try:
                    slot = self._slot_for(job.request, pinned)
                except SlotsPinned:
                    blocked.append(job)  # others (base, resident adapters) may still go
                    continue
                except AdapterLoadError as exc:
                    job.emit(exc)
                    continue
                pinned.add(slot)
                seed = job.request.seed
                gen = None if seed is None else torch.Generator(self.lm.device).manual_seed(seed)
                new.append(_Row(job, slot, gen))
        waiting.extendleft(reversed(blocked))
        if not new:
            return
        self.prefills += 1
        if self.metrics:
            self.metrics.prefill(sum(len(r.job.request.prompt_token_ids) for r in new))
        rows.extend(new)  # before the forward: if it fails, they are answered with the error
        self.peak_rows = max(self.peak_rows, len(rows))
        logits = batch.add([r.job.request.prompt_token_ids for r in new], [r.slot for r in new])
        self._emit(batch, rows, logits, first=len(rows) - len(new))

    def _slot_for(self, request: GenerationRequest, pinned: set[int]) -> int:
        ref = request.adapter
        if ref is None:
            return BASE_SLOT
        misses, start = self.slots.misses, time.perf_counter()
        try:
            slot = self.slots.acquire(
                (ref.user_id, ref.version), lambda: self.host_cache.get(ref), pinned
            )
        except (ValueError, OSError) as exc:
            if self.metrics:
                self.metrics.adapter_load_failed()
            raise adapter_load_error(ref, exc) from exc
        if self.metrics:  # metrics hook: load latency on a miss, hot-swap on first use
            if self.slots.misses != misses:
                self.metrics.adapter_loaded(time.perf_counter() - start)
            self.metrics.adapter_served(ref.user_id, ref.version)
        return slot

    def _step(self, batch: RunningBatch, rows: list[_Row]) -> None:
        last = torch.tensor([r.produced[-1] for r in rows], dtype=torch.long, device=batch.device)
        logits = batch.step(last)
        self.steps += 1
        if self.metrics:
            self.metrics.decode_step(len(rows))
        self._emit(batch, rows, logits, first=0)

    def _emit(
        self, batch: RunningBatch, rows: list[_Row], logits: torch.Tensor, first: int
    ) -> None:
        """Sample the next token of rows[first:] (whose logits are given), stream it, and
        drop finished rows from the batch."""
        active = rows[first:]
        reqs = [r.job.request for r in active]
        temperature = torch.tensor([q.temperature for q in reqs], device=logits.device)
        top_p = torch.tensor([q.top_p for q in reqs], device=logits.device)
        tokens, logprobs = sample_tokens(logits, temperature, top_p, [r.generator for r in active])
        if self.metrics:
            self.metrics.tokens_generated(len(active))
        tok = self.lm.tokenizer
        eos = tok.eos_token_id
        finished: set[int] = set()
        for i, (row, t, lp) in enumerate(
            zip(active, tokens.tolist(), logprobs.tolist(), strict=True)
        ):
            row.produced.append(t)
            if self.metrics and len(row.produced) == 1:
                self.metrics.first_token(time.monotonic() - row.job.queued)
            gone = row.job.cancelled.is_set()
            if gone:
                self.cancelled += 1
                self.cancelled_tokens += len(row.produced)
            done = gone or t == eos or len(row.produced) >= row.job.request.max_tokens
            text = tok.decode(row.produced, skip_special_tokens=True)
            delta = ""
            if done or not text.endswith("\ufffd"):  # hold back half a UTF-8 character
                delta, row.text = text[len(row.text) :], text
            row.job.emit(TokenChunk([t], [lp], delta))
            if done:
                row.job.emit(_DONE)
                finished.add(first + i)
        if finished:
            keep = [i for i in range(len(rows)) if i not in finished]
            batch.keep(keep)
            rows[:] = [rows[i] for i in keep]
