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
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import tempfile
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
            disable_log_stats=True,
            # The log-probs of the distribution actually sampled (after temperature and
            # top-p), as the hf engine reports: the learner's behaviour policy.
            logprobs_mode="processed_logprobs",
        )
        self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
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
            async for output in self._llm.generate(prompt, params, request_id, lora_request=lora):
                completion = output.outputs[0]
                tokens = list(completion.token_ids)
                if not tokens:
                    continue
                logprobs = [
                    float(step[t].logprob)
                    for t, step in zip(tokens, completion.logprobs or [], strict=True)
                ]
                yield TokenChunk(tokens, logprobs, completion.text)
        finally:
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]

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
        from vllm.lora.request import LoRARequest

        if ref is None:
            return self._loras[_ZERO]
        key = _key(ref)
        async with self._lock:
            lora = self._loras.get(key)
            if lora is not None:
                self._loras.move_to_end(key)
                return lora
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
            self._loras[key] = lora
            await self._evict(ref.user_id, key)
            return lora

    async def _evict(self, user_id: str, newest: tuple[str, int]) -> None:
        """remove_lora for superseded versions of `user_id` and, beyond max_cpu_loras, the
        least recently used adapters; never one a running request uses."""
        victims = [k for k in self._loras if k[0] == user_id and k[1] < newest[1]]
        for k in self._loras:  # least recently used first
            if len(self._loras) - len(victims) <= self.max_cpu_loras:
                break
            if k not in (_ZERO, newest) and k not in victims:
                victims.append(k)
        for k in victims:
            if self._in_flight.get(k):
                continue
            lora = self._loras.pop(k)
            await self._llm.remove_lora(lora.lora_int_id)
            self.removed += 1

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


def _key(ref: AdapterVersion) -> tuple[str, int]:
    return (ref.user_id, ref.version)
