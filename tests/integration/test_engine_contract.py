"""One contract for every engine (hf, vllm), checked against a reference forward pass.

The reference is the tiny model with a multi-LoRA bank, decoded greedily by full forwards
(no KV cache, no batching), so it shares no code with either engine's decode path. Each
engine must: give that greedy output for the same adapter (alone and in a mixed batch with
cold users), serve exactly the requested version (hot swap, no stale same-name cache),
report per-token log-probs equal to the forward pass's, stream token by token, and refuse a
corrupt adapter before the first token.

The vllm half needs vllm importable (`scripts/install-vllm.sh`, then run pytest from
.venv-vllm); elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import torch

from loraloop.core.adapters.peft_format import to_peft_files
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.adapters.version import AdapterVersion as AdapterRef
from loraloop.core.logprobs import response_logprobs
from loraloop.core.model_loading import LoadedModel, load_model
from loraloop.core.multi_lora import BASE_SLOT, LoRAWeights
from loraloop.core.settings import Settings
from loraloop.service.engines.protocol import AdapterLoadError, Engine, GenerationRequest

T = TypeVar("T")
PROMPTS = ["How do I cook rice?", "What should I see in Tokyo?", "Tell me about bread"]
TOKENS = 12

_VLLM_MISSING = importlib.util.find_spec("vllm") is None
ENGINES = [
    "hf",
    pytest.param(
        "vllm",
        marks=[
            pytest.mark.vllm,
            pytest.mark.skipif(
                _VLLM_MISSING,
                reason="vllm is not importable here: run scripts/install-vllm.sh, then "
                ".venv-vllm/bin/python -m pytest -m vllm",
            ),
        ],
    ),
]


class LoopThread:
    """An event loop on its own thread: engines keep state bound to one loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def make_adapter(lm: LoadedModel, seed: int) -> LoRAWeights:
    gen = torch.Generator().manual_seed(seed)
    w = LoRAWeights(8, 16.0)
    for name, layer in lm.bank.layers.items():
        w.a[name] = torch.randn(8, layer.base.in_features, generator=gen) * 0.3
        w.b[name] = torch.randn(layer.base.out_features, 8, generator=gen) * 0.3
    return w


class Reference:
    """Greedy decoding and log-probs by plain full forwards through the bank."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm

    @torch.no_grad()
    def greedy(self, prompt: list[int], weights: LoRAWeights | None, n: int) -> list[int]:
        slot = BASE_SLOT
        if weights is not None:
            self.lm.bank.load(1, weights)
            slot = 1
        ids = list(prompt)
        eos = self.lm.tokenizer.eos_token_id
        with self.lm.bank.rows([slot]):
            for _ in range(n):
                logits = self.lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
                if ids[-1] == eos:
                    break
        return ids[len(prompt) :]

    @torch.no_grad()
    def logprobs(self, prompt: list[int], response: list[int], weights: LoRAWeights) -> list[float]:
        self.lm.bank.load(1, weights)
        return response_logprobs(self.lm.model, self.lm.bank, [prompt], [response], [1])[0].tolist()

    @torch.no_grad()
    def sampled_logprobs(
        self,
        prompt: list[int],
        response: list[int],
        weights: LoRAWeights,
        temperature: float,
        top_p: float,
    ) -> list[float]:
        """Log-probs of `response` under the distribution a sampler draws from: logits over
        `temperature`, cut to the smallest top-probability set reaching `top_p`, renormalised
        (the behaviour policy that off-policy corrections need)."""
        self.lm.bank.load(1, weights)
        with self.lm.bank.rows([1]):
            logits = self.lm.model(input_ids=torch.tensor([prompt + response])).logits[0].float()
        out = []
        for k, token in enumerate(response):
            probs = (logits[len(prompt) + k - 1] / temperature).softmax(-1)
            ranked, order = probs.sort(descending=True)
            keep = order[(ranked.cumsum(-1) - ranked) < top_p]
            out.append(float((probs[token] / probs[keep].sum()).log()) if token in keep else -1e9)
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    store_dir = tmp_path_factory.mktemp("contract-store")
    settings = Settings(adapter_store=store_dir)
    lm = load_model(settings, slots=2)
    store = AdapterStore(store_dir)
    weights = {(u, v): make_adapter(lm, 10 * u + v) for u in range(3) for v in (1, 2)}
    refs = {
        key: AdapterRef(
            f"user{key[0]}",
            key[1],
            store.write(
                f"user{key[0]}", key[1], to_peft_files(w, "tiny", settings.lora_targets)
            ).path,
        )
        for key, w in weights.items()
    }
    bad = store_dir / "broken" / "v1"
    bad.mkdir(parents=True)
    (bad / "adapter_config.json").write_text("{not json")
    (bad / "adapter_model.safetensors").write_bytes(b"garbage")
    return {
        "settings": settings,
        "ref": Reference(lm),
        "weights": weights,
        "refs": refs,
        "bad": AdapterRef("broken", 1, bad),
        "tokenizer": lm.tokenizer,
    }


@pytest.fixture(scope="module", params=ENGINES)
def engine(
    request: pytest.FixtureRequest, world: dict[str, Any]
) -> Iterator[tuple[Engine, LoopThread]]:
    from loraloop.service.engines.factory import build_engine

    settings = world["settings"].model_copy(
        update={"engine": request.param, "adapter_slots": 4, "max_batch_size": 8}
    )
    loop = LoopThread()
    eng = build_engine(settings)
    loop.run(eng.start(), timeout=600)
    yield eng, loop
    loop.run(eng.stop(), timeout=120)
    loop.close()


def _request(world: dict[str, Any], prompt: str, ref: AdapterRef | None, tag: str):
    ids = list(world["tokenizer"](prompt)["input_ids"])
    return GenerationRequest(f"contract-{tag}", ids, ref, TOKENS, temperature=0.0)


def test_greedy_output_matches_the_reference_for_each_adapter(engine, world) -> None:
    eng, loop = engine
    for i, prompt in enumerate(PROMPTS):
        key = (i % 3, 1)
        req = _request(world, prompt, world["refs"][key], f"greedy{i}")
        got = loop.run(eng.generate(req)).token_ids
        assert got == world["ref"].greedy(req.prompt_token_ids, world["weights"][key], TOKENS)


def test_cold_user_is_the_base_model(engine, world) -> None:
    eng, loop = engine
    req = _request(world, PROMPTS[0], None, "cold")
    got = loop.run(eng.generate(req)).token_ids
    assert got == world["ref"].greedy(req.prompt_token_ids, None, TOKENS)


def test_mixed_batch_of_adapters_and_cold_users(engine, world) -> None:
    """Concurrent requests with different adapters and none: each gets its own output
    (vLLM once gave a no-LoRA request the last adapter's output)."""
    eng, loop = engine
    keys: list[tuple[int, int] | None] = [(0, 1), None, (1, 2), (2, 1), None, (0, 2)]
    reqs = [
        _request(world, PROMPTS[i % 3], world["refs"][k] if k else None, f"mix{i}")
        for i, k in enumerate(keys)
    ]

    async def all_at_once() -> list[list[int]]:
        results = await asyncio.gather(*(eng.generate(r) for r in reqs))
        return [r.token_ids for r in results]

    got = loop.run(all_at_once())
    for req, key, tokens in zip(reqs, keys, got, strict=True):
        weights = world["weights"][key] if key else None
        assert tokens == world["ref"].greedy(req.prompt_token_ids, weights, TOKENS), key


def test_hot_swap_serves_exactly_the_requested_version(engine, world) -> None:
    eng, loop = engine
    for version in (1, 2, 1, 2):
        key = (1, version)
        req = _request(world, PROMPTS[1], world["refs"][key], f"swap{version}")
        got = loop.run(eng.generate(req)).token_ids
        assert got == world["ref"].greedy(req.prompt_token_ids, world["weights"][key], TOKENS)


def test_logprobs_match_a_forward_pass(engine, world) -> None:
    eng, loop = engine
    key = (2, 2)
    req = _request(world, PROMPTS[2], world["refs"][key], "logprobs")
    result = loop.run(eng.generate(req))
    expected = world["ref"].logprobs(req.prompt_token_ids, result.token_ids, world["weights"][key])
    assert len(result.logprobs) == len(result.token_ids)
    assert result.logprobs == pytest.approx(expected, abs=2e-3)


def test_sampled_logprobs_are_the_distribution_sampled(engine, world) -> None:
    """With temperature and top-p, each reported log-prob is the sampled token's under the
    tempered, nucleus-cut distribution: the behaviour policy the learner's importance
    weights divide by (vLLM's default reports the raw temperature-1 log-probs instead)."""
    eng, loop = engine
    key, temperature, top_p = (0, 2), 0.7, 0.8
    ids = list(world["tokenizer"](PROMPTS[0])["input_ids"])
    req = GenerationRequest(
        "contract-sampled", ids, world["refs"][key], TOKENS, temperature, top_p, seed=7
    )
    result = loop.run(eng.generate(req))
    expected = world["ref"].sampled_logprobs(
        ids, result.token_ids, world["weights"][key], temperature, top_p
    )
    assert len(result.logprobs) == len(result.token_ids) > 1
    assert result.logprobs == pytest.approx(expected, abs=2e-3)


def test_streams_token_by_token(engine, world) -> None:
    eng, loop = engine
    req = _request(world, PROMPTS[0], world["refs"][(0, 1)], "stream")

    async def collect() -> list[Any]:
        return [chunk async for chunk in eng.stream(req)]

    chunks = loop.run(collect())
    full = loop.run(eng.generate(req))
    assert len(chunks) == len(full.token_ids) > 1
    assert [t for c in chunks for t in c.token_ids] == full.token_ids
    assert "".join(c.text for c in chunks) == full.text
    assert full.text == world["tokenizer"].decode(full.token_ids, skip_special_tokens=True)


def test_corrupt_adapter_fails_before_the_first_token(engine, world) -> None:
    eng, loop = engine
    req = _request(world, PROMPTS[0], world["bad"], "bad")

    async def first() -> Any:
        async for chunk in eng.stream(req):
            return chunk
        return None

    with pytest.raises(AdapterLoadError, match="broken v1"):
        loop.run(first())
    # the engine is unharmed
    ok = _request(world, PROMPTS[0], None, "after-bad")
    assert loop.run(eng.generate(ok)).token_ids
