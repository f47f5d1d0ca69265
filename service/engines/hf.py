"""transformers engine: batches of requests for different users decoded in one pass.

A scheduler thread owns the model. It takes up to `max_batch_size` waiting requests,
places each request's adapter version in a slot of the multi-LoRA bank, and decodes the
whole batch together with a KV cache; each row reads its own adapter through the per-row
slot index, so a batch mixing many users costs one forward per step. Tokens reach the
caller's asyncio loop as they are produced.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from core.model_loading import LoadedModel, load_model
from core.multi_lora import BASE_SLOT
from core.peft_format import read_peft_dir
from core.settings import Settings
from service.adapter_slots import AdapterSlots
from service.engines.base import (
    AdapterLoadError,
    Engine,
    GenerationRequest,
    TokenChunk,
)

log = logging.getLogger(__name__)
_DONE = object()


@dataclass
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[object]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return (tokens, log-probs under the distribution sampled).

    Rows with temperature 0 are greedy and report the model's own (temperature 1)
    log-probability of the chosen token, since a greedy choice has no proper distribution.
    """
    logits = logits.float()
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    outside = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    logp_sorted = sorted_logits.log_softmax(-1)
    tokens = torch.empty(logits.shape[0], dtype=torch.long)
    logprobs = torch.empty(logits.shape[0])
    for i, gen in enumerate(generators):
        if greedy[i]:
            pos = 0
            tokens[i] = order[i, 0]
            logprobs[i] = logits[i].log_softmax(-1)[tokens[i]]
            continue
        pos = int(torch.multinomial(logp_sorted[i].exp(), 1, generator=gen))
        tokens[i] = order[i, pos]
        logprobs[i] = logp_sorted[i, pos]
    return tokens, logprobs


class HFEngine(Engine):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_id = settings.model_id or settings.model
        self._lm: LoadedModel | None = None
        self._slots: AdapterSlots | None = None
        self._inbox: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._slot_lock = threading.Lock()
        self._row_slots: list[int] = []
        self.batches = 0

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

    # --- API ----------------------------------------------------------------------------
    def encode(self, prompt: str | None, messages: list[tuple[str, str]] | None) -> list[int]:
        tok = self.lm.tokenizer
        if messages is not None:
            chat = [{"role": r, "content": c} for r, c in messages]
            ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return list(tok(prompt or "")["input_ids"])

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
        """Forget a deleted user's resident adapters."""
        if self._slots is not None:
            with self._slot_lock:
                self._slots.drop_user(user_id)

    # --- scheduler thread ---------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            job = self._inbox.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < self.settings.max_batch_size:
                try:
                    nxt = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._inbox.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            try:
                self._decode(batch)
            except Exception as exc:  # a bug must fail the requests, never the thread
                log.exception("batch failed")
                for j in batch:
                    j.emit(RuntimeError(f"generation failed: {exc}"))

    def _assign_slots(self, batch: list[_Job]) -> list[_Job]:
        """Put every job's adapter in a slot; jobs whose adapter fails are answered."""
        assert self._slots is not None
        ready, slots, pinned = [], [], set()
        for job in batch:
            ref = job.request.adapter
            if ref is None:
                slots.append(BASE_SLOT)
                ready.append(job)
                continue
            try:
                slot = self._slots.acquire(
                    (ref.user_id, ref.version), lambda ref=ref: read_peft_dir(ref.path), pinned
                )
            except (ValueError, OSError) as exc:
                job.emit(AdapterLoadError(f"adapter {ref.user_id} v{ref.version}: {exc}"))
                continue
            pinned.add(slot)
            slots.append(slot)
            ready.append(job)
        self._row_slots = slots
        return ready

    def _decode(self, batch: list[_Job]) -> None:
        lm = self.lm
        with self._slot_lock:
            batch = self._assign_slots(batch)
        if not batch:
            return
        self.batches += 1
        tok = lm.tokenizer
        eos, pad = tok.eos_token_id, tok.pad_token_id
        reqs = [j.request for j in batch]
        n = len(reqs)
        width = max(len(r.prompt_token_ids) for r in reqs)
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding keeps every row's last token aligned
            input_ids[i, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
            mask[i, width - len(r.prompt_token_ids) :] = 1
        temperature = torch.tensor([r.temperature for r in reqs])
        top_p = torch.tensor([r.top_p for r in reqs])
        gens = []
        for r in reqs:
            g = None
            if r.seed is not None:
                g = torch.Generator().manual_seed(r.seed)
            gens.append(g)
        produced: list[list[int]] = [[] for _ in reqs]
        texts = [""] * n
        done = [False] * n
        max_new = max(r.max_tokens for r in reqs)
        past = None
        step_ids = input_ids
        with lm.bank.rows(self._row_slots):
            for _ in range(max_new):
                positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
                out = lm.model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=past,
                    use_cache=True,
                )
                past = out.past_key_values
                tokens, logprobs = sample_tokens(out.logits[:, -1, :], temperature, top_p, gens)
                for i, job in enumerate(batch):
                    if done[i]:
                        continue
                    t = int(tokens[i])
                    produced[i].append(t)
                    text = tok.decode(produced[i], skip_special_tokens=True)
                    finished = t == eos or len(produced[i]) >= reqs[i].max_tokens
                    if job.cancelled.is_set():
                        finished = True
                    delta = ""
                    if finished or not text.endswith("\ufffd"):
                        delta, texts[i] = text[len(texts[i]) :], text
                    job.emit(TokenChunk([t], [float(logprobs[i])], delta))
                    if finished:
                        done[i] = True
                        job.emit(_DONE)
                if all(done):
                    break
                step_ids = tokens.where(torch.tensor([not d for d in done]), pad)[:, None]
                mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
