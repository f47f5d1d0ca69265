"""One contract for every engine (hf, vllm), checked against a reference forward pass.

The reference is the tiny model with a multi-LoRA bank, scoring the engine's output by full
forwards (no KV cache, no batching), so it shares no code with either engine's decode path.
Each engine must: give the greedy output for the same adapter (alone and in a mixed batch
with cold users), serve exactly the requested version (hot swap, no stale same-name cache),
report per-token log-probs equal to the forward pass's, stream token by token, and refuse a
corrupt adapter before the first token. "Greedy" and "equal" hold up to rounding: the engine
sums in other orders (KV cache, batches, its own kernels), so its logits agree with the
reference's to `logit_atol`, and a near-tie within that may go either way.

Each engine must also feed the server's metrics the same way: attached to a real
`ServerMetrics` (as the server attaches it) and a real `AdapterRegistry`, a few generations
with and without adapters leave a sample above zero in every family of `ENGINE_METRICS`
(what the dashboard reads), with the figures of the requests actually run.

The vllm half needs vllm importable (`scripts/install-vllm.sh`, then run pytest from
.venv-vllm); elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loraloop.core.adapters.peft_format import to_peft_files
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.adapters.version import AdapterVersion
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.logprobs import response_logprobs
from loraloop.core.model_loading import LoadedModel, load_model
from loraloop.core.multi_lora import BASE_SLOT, LoRAWeights
from loraloop.core.settings import Settings
from loraloop.service.adapters.registry import AdapterRegistry
from loraloop.service.engines.protocol import AdapterLoadError, Engine, GenerationRequest
from loraloop.service.metrics import ServerMetrics
from tests.tolerances import forward_atol, rounding_atol

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


# vLLM runs its own kernels (attention, LoRA and sampler ops), whose rounding this file does
# not model: its log-probs keep the bound they were first checked with (not derived here).
VLLM_LOGPROB_ATOL = 2e-3


class Reference:
    """Greedy checks and log-probs by plain full forwards through the bank."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm

    @torch.no_grad()
    def logits(self, prompt: list[int], response: list[int], weights: LoRAWeights | None):
        """The float32 logits that predict each response token, `[len(response), V]`."""
        slot = BASE_SLOT
        if weights is not None:
            self.lm.bank.load(1, weights)
            slot = 1
        with self.lm.bank.rows([slot]):
            out = self.lm.model(input_ids=torch.tensor([prompt + response])).logits[0].float()
        return out[len(prompt) - 1 : len(prompt) - 1 + len(response)]

    def logit_atol(self, eng: Engine, logits: torch.Tensor) -> float:
        """How far the engine's logits may be from these: the same float32 forward summed
        in other orders (`forward_atol`); for vLLM, half its log-prob bound (log p moves by
        up to twice the logits' change)."""
        if eng.settings.engine == "vllm":
            return VLLM_LOGPROB_ATOL / 2
        return forward_atol(self.lm.model.config, torch.float32, float(logits.abs().max()))

    def assert_greedy(
        self,
        eng: Engine,
        prompt: list[int],
        weights: LoRAWeights | None,
        got: list[int],
        n: int,
        label: object = "",
    ) -> None:
        """`got` is the greedy continuation of `prompt`: n tokens, or up to eos, each the
        argmax of the reference's logits after the prompt and the tokens before it, or
        within rounding of it (the engine's logits and these differ by up to `logit_atol`
        each way, so a near-tie that close may be broken either way)."""
        eos = self.lm.tokenizer.eos_token_id
        assert 0 < len(got) <= n and eos not in got[:-1], (label, got)
        assert len(got) == n or got[-1] == eos, (label, "stopped early without eos", got)
        logits = self.logits(prompt, got, weights)
        best = logits.max(-1).values
        picked = logits.gather(-1, torch.tensor(got)[:, None]).squeeze(-1)
        gap = best - picked  # 0 where the engine took the reference's argmax
        assert float(gap.max()) <= 2 * self.logit_atol(eng, logits), (label, got, gap.tolist())

    @torch.no_grad()
    def logprobs(self, prompt: list[int], response: list[int], weights: LoRAWeights) -> list[float]:
        self.lm.bank.load(1, weights)
        return response_logprobs(self.lm.model, self.lm.bank, [prompt], [response], [1])[0].tolist()

    def logprob_atol(
        self,
        eng: Engine,
        prompt: list[int],
        response: list[int],
        weights: LoRAWeights,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> float:
        """log_softmax(z / T) moves by up to 2 * |dz| / T; renormalising over a nucleus
        (top_p < 1) by as much again (its log-mass is a log-sum-exp of the same values); and
        the float32 log-softmax itself rounds a sum over V terms of size <= 1."""
        if eng.settings.engine == "vllm":
            return VLLM_LOGPROB_ATOL
        logits = self.logits(prompt, response, weights)
        factor = (2 if top_p >= 1.0 else 4) / temperature
        vocab = self.lm.model.config.vocab_size
        return factor * self.logit_atol(eng, logits) + rounding_atol(torch.float32, 1.0, vocab)

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

    def nucleus_slack(
        self,
        eng: Engine,
        prompt: list[int],
        response: list[int],
        weights: LoRAWeights,
        temperature: float,
        top_p: float,
    ) -> list[float]:
        """Per token, how far the nucleus cut itself may move the log-prob. A token whose
        preceding cumulative mass lies within rounding of top_p is in the engine's nucleus or
        not by summation order (the engine's probabilities differ by up to 2 * logit_atol / T
        relative, and each side's float32 cumsum rounds V terms of size <= 1); each such
        token moves the normaliser by its mass, so log p by at most its share of the kept
        mass. (This tiny model's nuclei hold hundreds of tokens, so near-ties are common.)"""
        logits = self.logits(prompt, response, weights)
        vocab = self.lm.model.config.vocab_size
        window = 2 * self.logit_atol(eng, logits) / temperature
        window += rounding_atol(torch.float32, 1.0, vocab)
        out = []
        for row in logits:
            ranked = (row / temperature).softmax(-1).sort(descending=True).values
            before = ranked.cumsum(-1) - ranked
            near = (before - top_p).abs() <= window
            out.append(float(ranked[near].sum() / ranked[before < top_p].sum()))
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    store_dir = tmp_path_factory.mktemp("contract-store")
    settings = Settings(adapter_store=store_dir)
    lm = load_model(settings, slots=2)
    store = AdapterStore(store_dir)
    weights = {(u, v): make_adapter(lm, 10 * u + v) for u in range(3) for v in (1, 2)}
    refs = {
        key: AdapterVersion(
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
        "bad": AdapterVersion("broken", 1, bad),
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


def _request(world: dict[str, Any], prompt: str, ref: AdapterVersion | None, tag: str):
    ids = list(world["tokenizer"](prompt)["input_ids"])
    return GenerationRequest(f"contract-{tag}", ids, ref, TOKENS, temperature=0.0)


def test_greedy_output_matches_the_reference_for_each_adapter(engine, world) -> None:
    eng, loop = engine
    for i, prompt in enumerate(PROMPTS):
        key = (i % 3, 1)
        req = _request(world, prompt, world["refs"][key], f"greedy{i}")
        got = loop.run(eng.generate(req)).token_ids
        world["ref"].assert_greedy(eng, req.prompt_token_ids, world["weights"][key], got, TOKENS)


def test_cold_user_is_the_base_model(engine, world) -> None:
    eng, loop = engine
    req = _request(world, PROMPTS[0], None, "cold")
    got = loop.run(eng.generate(req)).token_ids
    world["ref"].assert_greedy(eng, req.prompt_token_ids, None, got, TOKENS)


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
        world["ref"].assert_greedy(eng, req.prompt_token_ids, weights, tokens, TOKENS, key)


def test_hot_swap_serves_exactly_the_requested_version(engine, world) -> None:
    eng, loop = engine
    for version in (1, 2, 1, 2):
        key = (1, version)
        req = _request(world, PROMPTS[1], world["refs"][key], f"swap{version}")
        got = loop.run(eng.generate(req)).token_ids
        world["ref"].assert_greedy(eng, req.prompt_token_ids, world["weights"][key], got, TOKENS)


def test_logprobs_match_a_forward_pass(engine, world) -> None:
    eng, loop = engine
    key = (2, 2)
    req = _request(world, PROMPTS[2], world["refs"][key], "logprobs")
    result = loop.run(eng.generate(req))
    expected = world["ref"].logprobs(req.prompt_token_ids, result.token_ids, world["weights"][key])
    assert len(result.logprobs) == len(result.token_ids)
    atol = world["ref"].logprob_atol(
        eng, req.prompt_token_ids, result.token_ids, world["weights"][key]
    )
    assert result.logprobs == pytest.approx(expected, abs=atol, rel=0)


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
    args = (eng, ids, result.token_ids, world["weights"][key], temperature, top_p)
    atol, slack = world["ref"].logprob_atol(*args), world["ref"].nucleus_slack(*args)
    for got, want, cut in zip(result.logprobs, expected, slack, strict=True):
        assert abs(got - want) <= atol + cut, (result.logprobs, expected, atol, slack)


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


# The engine-fed series the dashboard reads (ops/grafana/loraloop-dashboard.json), as
# (sample name, labels): after the traffic below, each has a sample above zero, whichever
# the engine. One list for both engines.
ENGINE_METRICS: tuple[tuple[str, dict[str, str]], ...] = (
    ("loraloop_server_generated_tokens_total", {}),
    ("loraloop_server_prompt_tokens_total", {}),
    ("loraloop_server_time_to_first_token_seconds_count", {}),
    ("loraloop_server_batch_size_count", {}),
    ("loraloop_server_adapter_loads_total", {"result": "ok"}),
    ("loraloop_server_adapter_loads_total", {"result": "error"}),
    ("loraloop_server_adapter_load_duration_seconds_count", {}),
    ("loraloop_server_adapter_cache_hits_total", {"tier": "engine"}),
    ("loraloop_server_adapter_cache_misses_total", {"tier": "engine"}),
    ("loraloop_server_adapters_resident", {}),
    ("loraloop_server_adapter_slots", {}),
    ("loraloop_server_adapter_swap_seconds_count", {}),
)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: ServerMetrics) -> Samples:
    """Every sample of the registry's exposition text (what Prometheus reads)."""
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_engines_export_the_dashboard_metrics(engine, world) -> None:
    """A version published while the server follows adapter-updates, then served with a
    cold user and an older adapter in one batch, again (a resident hit), and a corrupt
    adapter: every ENGINE_METRICS series is above zero, with these requests' figures."""
    eng, loop = engine
    settings = world["settings"]
    user = f"metrics-{eng.settings.engine}"
    store = AdapterStore(settings.adapter_store)
    files = to_peft_files(make_adapter(world["ref"].lm, 99), "tiny", settings.lora_targets)
    written = store.write(user, 1, files)
    # A real registry, never started (no Kafka here): it applies the announcement as its
    # follower would once caught up, so the version is live and its hot swap is timed.
    registry = AdapterRegistry(store, "127.0.0.1:9", settings.topic_adapter_updates)
    registry.caught_up.set()
    metrics = ServerMetrics()
    metrics.watch(
        engine=eng,
        registry=registry,
        events=None,
        adapter_slots=eng.settings.adapter_slots,
        queue_size=0,
    )
    assert eng.metrics is metrics  # the engine has the hooks
    try:
        published = events_pb2.AdapterUpdated(
            user_id=user,
            version=1,
            uri=written.path.as_uri(),
            timestamp_ms=int(time.time() * 1000),
        )
        assert registry.apply(user, published)
        ref = registry.resolve(user)
        assert ref is not None and ref.version == 1
        batch = [
            _request(world, PROMPTS[0], ref, "metrics-new"),
            _request(world, PROMPTS[1], None, "metrics-cold"),
            _request(world, PROMPTS[2], world["refs"][(2, 1)], "metrics-old"),
        ]

        async def together() -> list[Any]:
            return await asyncio.gather(*(eng.generate(r) for r in batch))

        results = loop.run(together())
        again = _request(world, PROMPTS[1], ref, "metrics-again")
        results.append(loop.run(eng.generate(again)))
        with pytest.raises(AdapterLoadError):
            loop.run(eng.generate(_request(world, PROMPTS[0], world["bad"], "metrics-bad")))
    finally:
        eng.metrics = None
    samples = scrape(metrics)

    def value(name: str, labels: dict[str, str] | None = None) -> float:
        return samples.get((name, frozenset((labels or {}).items())), 0.0)

    missing = [(name, labels) for name, labels in ENGINE_METRICS if not value(name, labels) > 0]
    assert not missing, f"{eng.settings.engine}: no sample above zero for {missing}"
    served = [*batch, again]
    assert value("loraloop_server_generated_tokens_total") == sum(len(r.token_ids) for r in results)
    assert value("loraloop_server_prompt_tokens_total") == sum(
        len(r.prompt_token_ids) for r in served
    )
    assert value("loraloop_server_time_to_first_token_seconds_count") == len(served)
    # no step decoded more requests than ran at once (three)
    steps = value("loraloop_server_batch_size_count")
    assert value("loraloop_server_batch_size_bucket", {"le": "4.0"}) == steps
    assert value("loraloop_server_adapter_loads_total", {"result": "error"}) == 1
    loads = value("loraloop_server_adapter_loads_total", {"result": "ok"})
    assert 1 <= loads <= 2  # the new version, and the older one unless still resident
    assert value("loraloop_server_adapter_load_duration_seconds_count") == loads
    assert value("loraloop_server_adapter_swap_seconds_count") == 1  # the first request only
    assert 0 <= value("loraloop_server_adapter_swap_seconds_sum") < 600
    resident = value("loraloop_server_adapters_resident")
    assert resident <= value("loraloop_server_adapter_slots")
