"""Property-based fuzzing of every RPC against the real server over loopback.

Hypothesis draws request fields from the whole of their types and beyond what the API
allows: odd Unicode, oversized and path-traversal user ids, prompts past every limit,
NaN/inf/subnormal/negative sampling parameters, garbled request ids, huge message lists,
and raw bytes that are not a valid message at all (corrupt wire format, invalid UTF-8 in
a string field). Every answer must be OK or a status that blames the request, with a
message; never INTERNAL or UNKNOWN. After thousands of cases the server still answers a
health check and a normal Generate. Run with `-s` for the cases per RPC and the status
histogram.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraloop.core.gen.loraloop.v1 import api_pb2, api_pb2_grpc, common_pb2
from loraloop.core.settings import Settings
from tests.support import InProcessServer, isolated_settings, serving

pytestmark = pytest.mark.kafka

S = grpc.StatusCode
# What a bad request may be answered with: each blames the request, none the server.
ALLOWED = {
    S.OK,
    S.INVALID_ARGUMENT,
    S.NOT_FOUND,
    S.PERMISSION_DENIED,
    S.RESOURCE_EXHAUSTED,
    S.OUT_OF_RANGE,
    S.FAILED_PRECONDITION,
}
SERVICE = "/loraloop.v1.LoraLoop/"
MAX_NEW_TOKENS = 4  # every generation the fuzzer gets through is short
MAX_PROMPT_TOKENS = 256
MAX_PROMPT_CHARS = 20_000
MAX_MESSAGE_BYTES = 256 * 1024  # every drawn field fits, but for the 1 % made to exceed it

TALLY: dict[str, Counter[str]] = defaultdict(Counter)  # rpc -> status name -> cases
SECONDS: Counter[str] = Counter()  # rpc -> seconds spent fuzzing it


def fuzz_settings(examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # nothing written into the checkout
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, InProcessServer]]:
    settings_ = isolated_settings(
        kafka_bootstrap,
        tmp_path_factory.mktemp("fuzz"),
        max_new_tokens=MAX_NEW_TOKENS,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        max_prompt_chars=MAX_PROMPT_CHARS,
        max_message_bytes=MAX_MESSAGE_BYTES,
    )
    with serving(settings_) as server:
        yield settings_, server


@pytest.fixture(scope="module")
def channel(served) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served[1].target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel) -> api_pb2_grpc.LoraLoopStub:
    return api_pb2_grpc.LoraLoopStub(channel)


def call(rpc: str, fn: Callable[..., Any], request: Any) -> tuple[grpc.StatusCode, Any]:
    """One fuzz case: the status it was answered with (checked) and the response, if OK."""
    try:
        response = fn(request, timeout=60)
        if rpc.startswith("GenerateStream"):
            response = list(response)
        code = S.OK
    except grpc.RpcError as err:
        code, details, response = err.code(), err.details(), None
        shown = repr(request)[:400]
        assert code in ALLOWED, f"{rpc} answered {code.name} ({details!r}) to {shown}"
        assert details and details.strip(), f"{rpc} answered {code.name} with no message"
    TALLY[rpc][code.name] += 1
    return code, response


def report(rpcs: list[str], started: float) -> None:
    """Print the cases and status histogram of `rpcs`, fuzzed since `started`."""
    seconds = time.perf_counter() - started
    SECONDS[" + ".join(rpcs)] += seconds
    print(f"\n{' + '.join(rpcs)}: {seconds:.1f}s")
    for rpc in rpcs:
        tally = TALLY[rpc]
        print(f"  {rpc}: {sum(tally.values())} cases  {dict(sorted(tally.items()))}")
        assert sum(tally.values()) > 0, rpc


# --- strategies -------------------------------------------------------------------------


def repeated(min_n: int, max_n: int) -> st.SearchStrategy[str]:
    """One character repeated `min_n` to `max_n` times: huge, cheaply. (Lone surrogates
    cannot be sent as a string field; their UTF-8 form is among the raw-bytes cases.)"""
    return st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(min_n, max_n))


ODD = [
    "",
    " ",
    ".",
    "..",
    "../../etc/passwd",
    "..\\..\\windows",
    "a/b",
    "%2e%2e%2f",
    "\x00",
    "nul\x00byte",
    "\u202eevil",
    "\ufeff",
    "\ufffd",
    "🙂",
    "\uff46\uff55\uff4c\uff4c",  # fullwidth "full"
    "a\u0301",
    "CON",
    "user\n",
    " alice",
    "x" * 128,
    "x" * 129,
]
user_ids = st.one_of(
    st.from_regex(r"[A-Za-z0-9._@-]{1,128}", fullmatch=True),
    st.sampled_from(["alice", "bob.smith@example.com", "u-1", "0", *ODD]),
    st.text(max_size=200),
    repeated(100, 20_000),
)
prompts = st.one_of(
    st.text(max_size=300),
    st.sampled_from(
        [*ODD, "<s>", "</s>", "<pad><unk>", "{{ bos_token }}", "{% for m in messages %}", "hi"]
    ),
    repeated(1, MAX_PROMPT_CHARS + 5_000),  # around the token and character limits
)
# Past the message size limit: grpc refuses these before the server reads them, at about
# a quarter of a second each (the client waits on flow control), so a few fixed ones are
# sent after the drawn cases rather than drawn.
OVERSIZED = [
    {"user_id": "u", "prompt": "x" * (MAX_MESSAGE_BYTES + 1)},
    {"user_id": "u", "prompt": "\U0001f642" * (MAX_MESSAGE_BYTES // 3)},
    {"user_id": "\u00fc" * MAX_MESSAGE_BYTES, "prompt": "hi"},
    {"user_id": "u", "messages": {"messages": [{"role": "user", "content": "hi"}] * 70_000}},
    {"user_id": "u", "prompt": "hi", "arm": "a" * (4 * MAX_MESSAGE_BYTES)},
]
floats = st.one_of(
    st.none(),
    st.floats(width=32),  # NaN, ±inf, subnormals, negative zero, anything
    st.sampled_from([0.0, 1e-45, 1e-38, 1e-30, 1e-7, 0.5, 1.0, 10.0, 10.5, -1e-45]),
)


@st.composite
def sampling_params(draw: st.DrawFn) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(
        max_tokens=draw(st.one_of(st.integers(-3, 8), st.integers(-(2**31), 2**31 - 1)))
    )
    for name in ("temperature", "top_p"):
        value = draw(floats)
        if value is not None:
            setattr(params, name, value)
    seed = draw(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)))
    if seed is not None:
        params.seed = seed
    return params


roles = st.one_of(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=20))
chat = st.one_of(
    st.lists(st.tuples(roles, st.one_of(st.text(max_size=200), repeated(1, 5_000))), max_size=8),
    st.integers(900, 3_000).map(lambda n: [("user", "hi")] * n),  # around the 1,000 limit
)


@st.composite
def generate_requests(draw: st.DrawFn) -> api_pb2.GenerateRequest:
    request = api_pb2.GenerateRequest(
        user_id=draw(user_ids),
        sampling=draw(sampling_params()),
        arm=draw(st.one_of(st.just(""), st.just("default"), st.text(), repeated(100, 5_000))),
    )
    which = draw(st.sampled_from(["prompt", "prompt", "messages", "none"]))
    if which == "prompt":
        request.prompt = draw(prompts)
    elif which == "messages":
        msgs = [common_pb2.ChatMessage(role=r, content=c) for r, c in draw(chat)]
        request.messages.CopyFrom(api_pb2.ChatMessages(messages=msgs))
    return request


valid_user_ids = st.from_regex(r"[A-Za-z0-9._@-]{1,128}", fullmatch=True).filter(
    lambda u: u not in {".", ".."}
)
some_text = st.text(min_size=1, max_size=60).filter(str.strip)  # any Unicode, not blank
edge_floats = [0.0, 1e-45, 1e-38, 1e-30, 1e-7, 1.0]


@st.composite
def accepted_requests(draw: st.DrawFn) -> api_pb2.GenerateRequest:
    """Requests inside every rule, reaching the engine with odd Unicode and the edges of
    each sampling parameter (subnormal temperatures, a top_p of 1e-45, extreme seeds)."""
    params = common_pb2.SamplingParams(max_tokens=draw(st.integers(0, MAX_NEW_TOKENS)))
    temperature = draw(
        st.one_of(st.none(), st.floats(0, 10, width=32), st.sampled_from([*edge_floats, 10.0]))
    )
    if temperature is not None:
        params.temperature = temperature
    top_p = draw(
        st.one_of(
            st.none(), st.floats(0, 1, exclude_min=True, width=32), st.sampled_from(edge_floats[1:])
        )
    )
    if top_p is not None:
        params.top_p = top_p
    seed = draw(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)))
    if seed is not None:
        params.seed = seed
    request = api_pb2.GenerateRequest(
        user_id=draw(valid_user_ids), sampling=params, arm=draw(st.sampled_from(["", "default"]))
    )
    if draw(st.booleans()):
        request.prompt = draw(some_text)
    else:
        turns = draw(
            st.lists(
                st.tuples(st.sampled_from(["system", "user", "assistant"]), some_text),
                min_size=1,
                max_size=4,
            )
        )
        msgs = [common_pb2.ChatMessage(role=r, content=c) for r, c in turns]
        request.messages.CopyFrom(api_pb2.ChatMessages(messages=msgs))
    return request


@st.composite
def signals(draw: st.DrawFn) -> common_pb2.FeedbackSignals:
    s = common_pb2.FeedbackSignals()
    fields: dict[str, st.SearchStrategy[Any]] = {
        "thumbs": st.one_of(st.sampled_from([-1, 1, 0, 2]), st.integers(-(2**31), 2**31 - 1)),
        "rating": st.floats(width=32),
        "accepted": st.booleans(),
        "copied": st.booleans(),
        "regenerated": st.booleans(),
        "edited": st.booleans(),
        "follow_up": st.booleans(),
        "dwell_ms": st.integers(-(2**63), 2**63 - 1),
    }
    for name in draw(st.sets(st.sampled_from(sorted(fields)), max_size=4)):
        setattr(s, name, draw(fields[name]))
    return s


def mutated(request_id: str) -> st.SearchStrategy[str]:
    """A real request id, garbled: a character changed, cut short, extended, or reversed."""
    n = len(request_id)
    return st.one_of(
        st.builds(
            lambda i, c: request_id[:i] + c + request_id[i + 1 :],
            st.integers(0, n - 1),
            st.sampled_from("0123456789abcdefX.-ü"),
        ),
        st.integers(0, n - 1).map(lambda i: request_id[:i]),
        st.text(max_size=20).map(lambda t: request_id + t),
        st.just(request_id[::-1]),
        st.just(request_id.upper()),
    )


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string_field(number: int, data: bytes) -> bytes:
    """Wire bytes of a length-delimited field `number` holding `data`."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


invalid_utf8 = st.one_of(
    st.binary(min_size=1, max_size=64).filter(not_utf8),
    st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80b"]),
)
# string fields of each request type, by field number
STRING_FIELDS = {
    "Generate": (1, 2, 5),
    "GenerateStream": (1, 2, 5),
    "Feedback": (1, 2),
    "GetUserState": (1,),
    "DeleteUser": (1,),
}
raw_requests = st.one_of(
    st.binary(max_size=512),  # mostly corrupt wire format
    st.tuples(st.sampled_from(sorted(STRING_FIELDS)), st.integers(0, 2), invalid_utf8).map(
        lambda t: (t[0], string_field(STRING_FIELDS[t[0]][t[1] % len(STRING_FIELDS[t[0]])], t[2]))
    ),
)


# --- the fuzz tests ---------------------------------------------------------------------


def test_fuzz_generate(stub) -> None:
    started = time.perf_counter()

    @fuzz_settings(2500)
    @given(request=generate_requests())
    def case(request: api_pb2.GenerateRequest) -> None:
        code, response = call("Generate", stub.Generate, request)
        if code == S.OK:
            assert response.request_id and response.finish_reason in {"stop", "length"}
            assert 0 < response.usage.completion_tokens <= MAX_NEW_TOKENS

    case()
    for fields in OVERSIZED:
        code, _ = call("Generate", stub.Generate, api_pb2.GenerateRequest(**fields))
        assert code == S.RESOURCE_EXHAUSTED
    report(["Generate"], started)


def test_fuzz_generate_inside_the_rules(stub) -> None:
    started = time.perf_counter()

    @fuzz_settings(300)
    @given(request=accepted_requests())
    def case(request: api_pb2.GenerateRequest) -> None:
        code, response = call("Generate (inside the rules)", stub.Generate, request)
        # only a prompt of odd characters can be refused: too many tokens
        assert code in {S.OK, S.RESOURCE_EXHAUSTED}
        if code == S.OK:
            assert 0 < response.usage.completion_tokens <= MAX_NEW_TOKENS

    case()
    report(["Generate (inside the rules)"], started)
    assert TALLY["Generate (inside the rules)"]["OK"] > 150


def test_fuzz_generate_stream(stub) -> None:
    started = time.perf_counter()

    @fuzz_settings(300)
    @given(request=st.one_of(generate_requests(), accepted_requests()))
    def case(request: api_pb2.GenerateRequest) -> None:
        code, parts = call("GenerateStream", stub.GenerateStream, request)
        if code == S.OK:
            assert parts and parts[-1].HasField("final")
            assert "".join(p.delta for p in parts[:-1]) == parts[-1].final.text

    case()
    report(["GenerateStream"], started)


def test_fuzz_feedback(stub) -> None:
    started = time.perf_counter()
    owner = "fuzz-owner"
    issued = [
        stub.Generate(
            api_pb2.GenerateRequest(
                user_id=owner, prompt="hello", sampling=common_pb2.SamplingParams(max_tokens=1)
            ),
            timeout=60,
        ).request_id
        for _ in range(3)
    ]
    request_ids = st.one_of(
        st.sampled_from(issued),
        st.sampled_from(issued).flatmap(mutated),
        st.from_regex(r"[0-9a-f]{24}\.[0-9a-f]{24}", fullmatch=True),  # well formed, not ours
        st.text(max_size=80),
        st.sampled_from(ODD),
        repeated(100, 20_000),
    )
    owners = st.one_of(st.just(owner), user_ids)
    rated: set[str] = set()

    @fuzz_settings(1000)
    @given(request_id=request_ids, user_id=owners, signals=signals())
    def case(request_id: str, user_id: str, signals: common_pb2.FeedbackSignals) -> None:
        request = api_pb2.FeedbackRequest(request_id=request_id, user_id=user_id, signals=signals)
        code, response = call("Feedback", stub.Feedback, request)
        if code == S.OK:
            assert request_id in issued and user_id == owner  # only the owner's own ids
            # the first feedback on an id counts ("earliest"), a repeat is said not to
            assert response.accepted == (request_id not in rated), response
            assert response.reason == ("" if response.accepted else "repeated")
            rated.add(request_id)
        if request_id in issued and user_id != owner and code != S.INVALID_ARGUMENT:
            assert code == S.PERMISSION_DENIED

    case()
    report(["Feedback"], started)


def test_fuzz_user_state_and_delete(stub) -> None:
    started = time.perf_counter()

    @fuzz_settings(800)
    @given(user_id=user_ids, delete=st.booleans())
    def case(user_id: str, delete: bool) -> None:
        if delete:
            code, response = call(
                "DeleteUser", stub.DeleteUser, api_pb2.DeleteUserRequest(user_id=user_id)
            )
            assert code != S.OK or not response.deleted  # none of these users had anything
        else:
            request = api_pb2.GetUserStateRequest(user_id=user_id)
            code, response = call("GetUserState", stub.GetUserState, request)
            assert code != S.OK or response.user_id == user_id

    case()
    report(["GetUserState", "DeleteUser"], started)


def test_fuzz_raw_bytes(channel) -> None:
    """Bytes that are not a valid request of the method: INVALID_ARGUMENT (or, where they
    happen to parse, whatever that request deserves), never UNKNOWN."""
    started = time.perf_counter()
    unary = {m: channel.unary_unary(SERVICE + m) for m in STRING_FIELDS if m != "GenerateStream"}
    stream = channel.unary_stream(SERVICE + "GenerateStream")

    @fuzz_settings(1000)
    @given(method=st.sampled_from(sorted(STRING_FIELDS)), raw=raw_requests)
    def case(method: str, raw: bytes | tuple[str, bytes]) -> None:
        if isinstance(raw, tuple):
            method, raw = raw  # invalid UTF-8 in one of this method's string fields
        fn = stream if method == "GenerateStream" else unary[method]
        call(f"{method} (raw bytes)", fn, raw)  # bytes that happen to parse may be OK

    case()
    raw_rpcs = sorted(rpc for rpc in TALLY if rpc.endswith("(raw bytes)"))
    report(raw_rpcs, started)
    assert sum(TALLY[rpc][S.INVALID_ARGUMENT.name] for rpc in raw_rpcs) > 0


@pytest.mark.parametrize(
    ("label", "request_fields"),
    [
        # a float32 temperature this small overflowed the logits to inf: the sampler saw NaN
        # and the whole running batch failed with UNKNOWN
        ("temperature 1e-38", {"prompt": "hi", "sampling": {"temperature": 1e-38}}),
        ("temperature 1e-45", {"prompt": "hi", "sampling": {"temperature": 1e-45}}),
        ("top_p 1e-45", {"prompt": "hi", "sampling": {"top_p": 1e-45, "temperature": 1.0}}),
        ("seed -2^63", {"prompt": "hi", "sampling": {"seed": -(2**63)}}),
        ("arm of 100,000 characters", {"prompt": "hi", "arm": "a" * 100_000}),
        (
            "role of 100,000 characters",
            {"messages": {"messages": [{"role": "r" * 100_000, "content": "hi"}]}},
        ),
        ("2,000 messages", {"messages": {"messages": [{"role": "user", "content": "x"}] * 2000}}),
    ],
)
def test_inputs_the_fuzzer_found(stub, label: str, request_fields: dict[str, Any]) -> None:
    request = api_pb2.GenerateRequest(user_id="regression", **request_fields)
    for rpc, fn in (("Generate", stub.Generate), ("GenerateStream", stub.GenerateStream)):
        code, _ = call(rpc, fn, request)
        if "temperature" in label or "seed" in label or "top_p" in label:
            assert code == S.OK, label
        else:
            assert code in {S.INVALID_ARGUMENT, S.RESOURCE_EXHAUSTED}, label


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("Generate", b"\x0a\x02\xff\xfe"),  # user_id not UTF-8: was UNKNOWN (DecodeError)
        ("Generate", b"\xff\xff\xff"),  # corrupt wire format: was UNKNOWN
        ("Feedback", string_field(1, b"\xc3\x28")),
        ("GetUserState", string_field(1, b"\xed\xa0\x80")),  # an encoded surrogate
        ("DeleteUser", b"\x0a\x05abc"),  # length past the end
    ],
)
def test_unparsable_requests_are_invalid_argument(channel, method: str, raw: bytes) -> None:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(SERVICE + method)(raw, timeout=30)
    assert info.value.code() == S.INVALID_ARGUMENT
    details = info.value.details()
    assert method in details and "not a valid message" in details, details


def test_server_still_serves_after_fuzzing(channel, stub) -> None:
    """Runs last in this file: health SERVING, a normal Generate and Feedback work (the
    event loop and the engine's scheduler thread survived)."""
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "loraloop.v1.LoraLoop"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reply = stub.Generate(
        api_pb2.GenerateRequest(
            user_id="after-fuzz",
            prompt="Tell me about travel",
            sampling=common_pb2.SamplingParams(max_tokens=4, seed=1),
        ),
        timeout=60,
    )
    assert reply.request_id and reply.usage.completion_tokens > 0
    ack = stub.Feedback(
        api_pb2.FeedbackRequest(
            request_id=reply.request_id,
            user_id="after-fuzz",
            signals=common_pb2.FeedbackSignals(thumbs=1),
        ),
        timeout=30,
    )
    assert ack.accepted
    total = sum(sum(t.values()) for t in TALLY.values())
    codes: Counter[str] = Counter()
    for tally in TALLY.values():
        codes.update(tally)
    print(
        f"\nfuzzing total: {total} cases, {sum(SECONDS.values()):.0f}s; status codes {dict(codes)}"
    )
    print(f"per RPC: { {rpc: sum(t.values()) for rpc, t in sorted(TALLY.items())} }")
    assert not {"INTERNAL", "UNKNOWN"} & set(codes)
