"""vLLM engine: `AsyncLLM` in process, one `LoRARequest` per user *version*.

vLLM caches adapters by name and id, so a new version of a user's adapter is a new
`LoRARequest` (name `<user>@v<version>`, a fresh integer id): a same-name reload would serve
the stale weights. vLLM keeps up to `max_loras` (= `adapter_slots`) adapters in the running
batch and `max_cpu_loras` in host RAM; this engine mirrors the second tier in an LRU and
calls `remove_lora` for what it evicts, for superseded versions once no request uses them,
and for deleted users.

Every request is served with an adapter: cold users get an all-zero adapter (exactly the base
model). In vLLM a batch mixing LoRA and no-LoRA requests gave the no-LoRA request the last
adapter's output (an open upstream bug), so no request here is ever without one.

Per-token log-probabilities of the sampled tokens come back with every chunk. They are
vLLM's *processed* log-probs (`logprobs_mode="processed_logprobs"`): those of the
distribution actually sampled from, after temperature and top-p, as the hf engine reports;
the learner records them as the behaviour policy. Only this module imports vllm, and only
when chosen.

Metrics: the engine calls the hooks of `self.metrics` (a `service.metrics.ServerMetrics`,
set by the server) as the hf engine does, with these figures:

- prompt tokens (`prefill`): the request's prompt token ids, counted at its first output
  (vLLM has prefilled it then); generated tokens: those of every streamed output;
- time to first token: from `stream()` being called (adapter registration included, as the
  hf engine's queue time includes its slot load) to the first output with a token;
- batch size (`decode_step`): per vLLM engine step, the requests that step decoded
  (`num_generation_requests` of vLLM's per-step scheduler stats; requests only being
  prefilled are not counted, as the hf engine counts its decoding forwards only), received
  through a stat logger given to `AsyncLLM`;
- adapter loads: on the first use of a (user, version), the time to read it and register it
  with vLLM (`add_lora`, where vLLM's worker loads the files into its LoRA manager); a
  version that fails to read or register counts as a failed load;
- hot swap (`adapter_served`): when a request with an adapter gets its first output, i.e.
  has been in a vLLM batch;
- residency (`slots`, read by the metrics module at scrape time): the user adapter versions
  registered with vLLM, which keeps them in host RAM (at most `max_cpu_loras`, the zero
  adapter taking one) and up to `max_loras` of them on the device for its batches.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from loraloop.core.adapters.peft_format import read_peft_dir, to_peft_files
from loraloop.core.adapters.version import AdapterVersion
from loraloop.core.devices import resolve_device, resolved_dtype_name
from loraloop.core.model_loading import resolve_model_path
from loraloop.core.multi_lora import LoRAWeights
from loraloop.core.settings import Settings
from loraloop.service.engines.protocol import (
    AdapterLoadError,
    Engine,
    GenerationRequest,
    TokenChunk,
    adapter_load_error,
    encode_with,
)

log = logging.getLogger(__name__)
_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # max_lora_rank values vLLM accepts
_ZERO = ("", 0)  # key of the all-zero adapter


class RegisteredAdapters:
    """The user adapter versions registered with vLLM, counted as the metrics module reads
    an engine's slots (tier "engine"): `len()` of them, `capacity` (max_cpu_loras less the
    zero adapter), `hits` (requests for a version already registered), `misses` (versions
    that had to be read and registered, failures included) and `evictions` (versions
    removed, least recently used, beyond capacity)."""

    def __init__(self, loras: OrderedDict[tuple[str, int], Any], capacity: int) -> None:
        self._loras = loras
        self.capacity = capacity
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._loras) - (_ZERO in self._loras)


def zero_adapter_files(model_path: str, targets: list[str], rank: int) -> dict[str, bytes]:
    """A PEFT adapter whose B matrices are all zero: exactly the base model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weights = LoRAWeights(rank, float(rank))
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
            weights.a[name] = torch.zeros(rank, module.in_features)
            weights.b[name] = torch.zeros(module.out_features, rank)
    if not weights.a:
        raise ValueError(f"no nn.Linear named any of {targets} in {model_path}: set lora_targets")
    return to_peft_files(weights, model_path, targets)


class VLLMEngine(Engine):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_id = settings.model_id or settings.model
        self._llm: Any = None  # vllm AsyncLLM
        self._tokenizer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._loras: OrderedDict[tuple[str, int], Any] = OrderedDict()  # key -> LoRARequest
        self._in_flight: Counter[tuple[str, int]] = Counter()
        self._ids = itertools.count(1)
        self._requests = itertools.count()
        self._lock = asyncio.Lock()
        self.max_cpu_loras = max(settings.vllm_max_cpu_loras, settings.adapter_slots)
        self.lora_rank = next((r for r in _VLLM_RANKS if r >= settings.lora_rank), 512)
        self._tasks: set[asyncio.Future[None]] = set()
        self.removed = 0  # remove_lora calls (evictions, superseded versions, deletions)
        self._registered = RegisteredAdapters(self._loras, self.max_cpu_loras - 1)
        self.steps = 0  # vLLM engine steps that decoded at least one request
        self.peak_rows = 0  # most requests one of those steps decoded
        self.metrics: Any = None  # service.metrics.ServerMetrics, set by the server

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        path = str(resolve_model_path(self.settings.model))
        # vLLM's CPU backend sizes its KV cache from this variable (GiB); GPUs ignore it.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{self.settings.vllm_kv_cache_gib:g}")
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        self._tokenizer = AutoTokenizer.from_pretrained(path)
        s = self.settings
        args = AsyncEngineArgs(
            model=path,
            tokenizer=path,
            # "auto" as the hf engine has it (bfloat16 on CUDA, float32 on the CPU), not
            # vLLM's "auto" (the checkpoint's dtype).
            dtype=resolved_dtype_name(s.dtype, resolve_device(s.device)),
            seed=s.seed,
            enable_lora=True,
            max_lora_rank=self.lora_rank,
            max_loras=min(s.adapter_slots, s.max_batch_size),
            max_cpu_loras=self.max_cpu_loras,
            max_num_seqs=s.max_batch_size,
            max_model_len=s.max_prompt_tokens + s.max_new_tokens,
            gpu_memory_utilization=s.vllm_gpu_memory_utilization,
            enforce_eager=True,
            # vLLM's own stat loggers stay off; `_step_stats_logger` receives its per-step
            # scheduler stats (which the iteration details add the request counts to).
            disable_log_stats=True,
            enable_logging_iteration_details=True,
            # The log-probs of the distribution actually sampled (after temperature and
            # top-p), as the hf engine reports: the learner's behaviour policy.
            logprobs_mode="processed_logprobs",
        )
        self._llm = await asyncio.to_thread(
            AsyncLLM.from_engine_args, args, stat_loggers=[_step_stats_logger(self)]
        )
        self._tmp = tempfile.TemporaryDirectory(prefix="loraloop-zero-lora-")
        zero_dir = Path(self._tmp.name)
        files = await asyncio.to_thread(zero_adapter_files, path, s.lora_targets, s.lora_rank)
        for name, data in files.items():
            (zero_dir / name).write_bytes(data)
        zero = LoRARequest("loraloop-zero", next(self._ids), str(zero_dir))
        await self._llm.add_lora(zero)
        self._loras[_ZERO] = zero

    async def stop(self) -> None:
        if self._llm is not None:
            await asyncio.to_thread(self._llm.shutdown)
            self._llm = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # --- API ----------------------------------------------------------------------------
    def encode(self, prompt: str | None, messages: list[tuple[str, str]] | None) -> list[int]:
        return encode_with(self._tokenizer, prompt, messages)

    def finish_reason(self, token_ids: list[int], max_tokens: int) -> str:
        eos = self._tokenizer.eos_token_id
        return "stop" if token_ids and token_ids[-1] == eos else "length"

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        submitted = time.monotonic()  # for time to first token
        key = _ZERO if request.adapter is None else _key(request.adapter)
        self._in_flight[key] += 1
        try:
            lora = await self._lora_for(request.adapter)
            params = SamplingParams(
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                logprobs=0,  # the sampled token's log-prob only
                output_kind=RequestOutputKind.DELTA,
                skip_special_tokens=True,
            )
            request_id = f"{request.request_id}-{next(self._requests)}"
            prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
            outputs = produced = 0
            async for output in self._llm.generate(prompt, params, request_id, lora_request=lora):
                completion = output.outputs[0]
                tokens = list(completion.token_ids)
                if self.metrics:
                    self._observe(request, outputs, produced, len(tokens), submitted)
                outputs += 1
                if not tokens:
                    continue
                produced += len(tokens)
                logprobs = [
                    float(step[t].logprob)
                    for t, step in zip(tokens, completion.logprobs or [], strict=True)
                ]
                yield TokenChunk(tokens, logprobs, completion.text)
        finally:
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]

    def _observe(
        self, request: GenerationRequest, outputs: int, produced: int, new: int, submitted: float
    ) -> None:
        """Metrics hooks for one vLLM output of `request`, which had `outputs` outputs and
        `produced` tokens before this one and `new` tokens in it: prompt tokens and hot swap
        at the first output, generated tokens at each, time to first token (since
        `submitted`, time.monotonic) at the first with a token."""
        if outputs == 0:
            self.metrics.prefill(len(request.prompt_token_ids))
            if request.adapter is not None:
                self.metrics.adapter_served(request.adapter.user_id, request.adapter.version)
        if new:
            self.metrics.tokens_generated(new)
            if produced == 0:
                self.metrics.first_token(time.monotonic() - submitted)

    def drop_user(self, user_id: str) -> None:
        """Forget a deleted user's adapters (remove_lora runs on the engine's loop)."""
        if self._loop is None:
            return

        def schedule() -> None:
            task = asyncio.ensure_future(self._remove_user(user_id))
            self._tasks.add(task)  # keep a reference until it is done
            task.add_done_callback(self._tasks.discard)

        self._loop.call_soon_threadsafe(schedule)

    # --- adapters -----------------------------------------------------------------------
    async def _lora_for(self, ref: AdapterVersion | None) -> Any:
        """The LoRARequest serving `ref` (the zero adapter for None), registered with vLLM
        on first use; AdapterLoadError when the version is unreadable or incompatible."""
        if ref is None:
            return self._loras[_ZERO]
        key = _key(ref)
        async with self._lock:
            lora = self._loras.get(key)
            if lora is not None:
                self._registered.hits += 1
                self._loras.move_to_end(key)
                return lora
            self._registered.misses += 1
            start = time.perf_counter()
            try:
                lora = await self._register(ref)
            except AdapterLoadError:
                if self.metrics:
                    self.metrics.adapter_load_failed()
                raise
            if self.metrics:  # metrics hook: load latency of the first use of a version
                self.metrics.adapter_loaded(time.perf_counter() - start)
            self._loras[key] = lora
            await self._evict(ref.user_id, key)
            return lora

    async def _register(self, ref: AdapterVersion) -> Any:
        """Read `ref`, check its rank, and register it with vLLM (`add_lora`, where vLLM's
        worker loads it); AdapterLoadError when any of these fails."""
        from vllm.lora.request import LoRARequest

        try:
            weights = await asyncio.to_thread(read_peft_dir, ref.path)
        except (ValueError, OSError) as exc:
            raise adapter_load_error(ref, exc) from exc
        if weights.rank > self.lora_rank:
            raise AdapterLoadError(
                f"adapter {ref.user_id} v{ref.version}: rank {weights.rank} exceeds "
                f"max_lora_rank {self.lora_rank}: raise lora_rank"
            )
        lora = LoRARequest(f"{ref.user_id}@v{ref.version}", next(self._ids), str(ref.path))
        try:
            await self._llm.add_lora(lora)
        except Exception as exc:  # the files read above, so this may pass: retried later
            raise AdapterLoadError(
                f"adapter {ref.user_id} v{ref.version}: {exc}", transient=True
            ) from exc
        return lora

    async def _evict(self, user_id: str, newest: tuple[str, int]) -> None:
        """remove_lora for superseded versions of `user_id` and, beyond max_cpu_loras, the
        least recently used adapters; never one a running request uses."""
        superseded = [k for k in self._loras if k[0] == user_id and k[1] < newest[1]]
        lru: list[tuple[str, int]] = []
        for k in self._loras:  # least recently used first
            if len(self._loras) - len(superseded) - len(lru) <= self.max_cpu_loras:
                break
            if k not in (_ZERO, newest) and k not in superseded:
                lru.append(k)
        for k in superseded + lru:
            if self._in_flight.get(k):
                continue
            lora = self._loras.pop(k)
            await self._llm.remove_lora(lora.lora_int_id)
            self.removed += 1
            if k in lru:
                self._registered.evictions += 1

    async def _remove_user(self, user_id: str) -> None:
        async with self._lock:
            for k in [k for k in self._loras if k[0] == user_id and k != _ZERO]:
                lora = self._loras.pop(k)
                await self._llm.remove_lora(lora.lora_int_id)
                self.removed += 1

    @property
    def resident(self) -> list[str]:
        """Names of the adapters registered with vLLM (for tests and debugging)."""
        return [lora.lora_name for lora in self._loras.values()]

    @property
    def slots(self) -> RegisteredAdapters:
        """The user adapter versions registered with vLLM (the metrics module's engine
        tier); RuntimeError before `start()`, as the hf engine's slots."""
        if self._llm is None:
            raise RuntimeError("engine not started")
        return self._registered

    def _record_step(self, scheduler_stats: Any) -> None:
        """One vLLM engine step's scheduler stats: the requests it decoded are a batch."""
        details = getattr(scheduler_stats, "iteration_details", None)
        if details is None or details.is_dummy:
            return
        rows = int(details.num_generation_requests)
        if rows <= 0:
            return  # a step that only prefilled
        self.steps += 1
        self.peak_rows = max(self.peak_rows, rows)
        if self.metrics:
            self.metrics.decode_step(rows)


def _step_stats_logger(engine: VLLMEngine) -> type:
    """A vLLM stat logger class that hands each step's scheduler stats to `engine`.

    It subclasses vLLM's PrometheusStatLogger, so vLLM installs it instead of its own, and
    it creates no `vllm:*` series: vLLM's own keeps one `vllm:lora_requests_info` series per
    set of running adapter names, which per-user adapters make unbounded. It runs on the
    engine's loop (AsyncLLM's output handler) and never raises there: an exception would
    end the handler and with it every request."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class StepStats(PrometheusStatLogger):
        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
            self.engine_indexes = engine_indexes or [0]

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is None:
                return
            try:
                engine._record_step(scheduler_stats)
            except Exception:
                log.exception("vLLM step stats not recorded")

        def record_admission_rejection(self, reason: str) -> None:
            pass

        def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    return StepStats


def _key(ref: AdapterVersion) -> tuple[str, int]:
    return (ref.user_id, ref.version)
