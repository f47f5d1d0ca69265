"""Serving overhead: the engine alone vs the same engine behind the real server.

    python benchmarks/bench_server_overhead.py --engine hf --quick        # about 1 minute
    python benchmarks/bench_server_overhead.py --engine hf                # about 3 minutes
    .venv-vllm/bin/python benchmarks/bench_server_overhead.py --engine vllm --quick  # 1.5 min
    .venv-vllm/bin/python benchmarks/bench_server_overhead.py --engine vllm          # 3 min

Needs ghz (`make loadtest-tools`) and, for the split by stage, py-spy (`pip install
py-spy`; without it, `--profile-rate 0`).

Two processes run the same engine (`--engine hf|vllm`) with the same settings, model
(the tiny one), adapters (one stored version per user, N users), prompts and sampling
(temperature 1, a seed per request, max_tokens 32), each at the same concurrency C:

- **server**: a Kafka broker and `python -m loraloop.cli serve` (settings through the
  environment, as a deployment has them: API keys on, four no-op bandit arms so that every
  request samples the bandit, events to Kafka, the access log at INFO), driven by ghz
  (closed loop, C workers on one connection, unary Generate; request i is prompt i % M of
  user i % N with seed i, the user and the seed filled in by ghz's data templating), so
  the client's CPU is not the server's;
- **engine alone**: a process of its own that starts the engine and calls
  `engine.encode` and `engine.generate` from C asyncio tasks for the same requests (same
  token ids, adapter versions, sampling and seeds).

Runs alternate (server, engine alone, server, ...); figures are medians. Reported:

- throughput: requests/s and tokens/s of each, and their ratio (target >= 0.8);
- CPU per request: the server process's CPU time (/proc/<pid>/stat utime + stime, with
  its child processes, e.g. vLLM's engine core) over a ghz run, and the engine-alone
  process's over its run; the difference (median of the pairs) is the server's CPU per
  request outside the engine (target <= 2 ms). On a shared machine the engine's own CPU
  moves by more than that between runs, so the split below is the steadier figure;
- the split by stage: one more run of each side with py-spy sampling the process (from
  outside, `--nonblocking`) and every thread's CPU read from /proc/<pid>/task before and
  after. A thread's CPU is spread over the stages of its busy samples (a sample's stage is
  named by its innermost frame that a rule in STAGES matches); threads without Python
  frames (torch's OpenMP pool, grpc's C++ threads) go by their name. The engine-alone
  figure of a stage is subtracted from the server's (the asyncio loop, the tokenizer, the
  engine thread are in both), and the stages outside the engine are summed; a table of
  CPU per request by thread (no sampling involved) comes with it.

The machine has 2 cores here and ghz, the Kafka broker and the server share them, so
the server's throughput is also bounded by what the client and the broker take (shown).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

USER_PREFIX = "bench-u"
API_KEY = "bench-overhead-key-0123456789"  # a throwaway key of this benchmark's server
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_READY = re.compile(r"listening on [\d.]+:(\d+)")
METRICS_READY = re.compile(r"server metrics on [\d.]+:(\d+)")


# --- the workload: the same requests for both sides --------------------------------------
@dataclass(frozen=True)
class Workload:
    users: int
    prompts: tuple[str, ...]
    max_tokens: int
    temperature: float = 1.0

    def user(self, i: int) -> str:
        return f"{USER_PREFIX}{i % self.users}"

    def prompt(self, i: int) -> str:
        return self.prompts[i % len(self.prompts)]

    def ghz_data(self) -> list[dict[str, Any]]:
        """ghz's data: entry i % M is request i's; ghz fills in the user and the seed per
        call from its request number (Go text/template with sprig's `mod`)."""
        return [
            {
                "user_id": f"{USER_PREFIX}{{{{mod .RequestNumber {self.users}}}}}",
                "prompt": p,
                "sampling": {
                    "max_tokens": self.max_tokens,
                    "temperature": self.temperature,
                    "seed": "{{.RequestNumber}}",  # proto3 JSON takes int64 as a string
                },
            }
            for p in self.prompts
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "users": self.users,
            "prompts": list(self.prompts),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Workload:
        return cls(d["users"], tuple(d["prompts"]), d["max_tokens"], d["temperature"])


def make_workload(users: int, prompts: int, max_tokens: int, seed: int = 0) -> Workload:
    from loraloop.devtools.demo_corpus import sample_prompt

    rng = random.Random(seed)
    return Workload(users, tuple(sample_prompt(rng)[2] for _ in range(prompts)), max_tokens)


# --- CPU time from /proc -----------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (vLLM's engine core, its helpers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(int(st[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    st = _stat(pid)
    return 0.0 if st is None else (int(st[11]) + int(st[12])) / CLK_TCK


def tree_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of `pid` itself, of `pid` and all its descendants)."""
    own = cpu_seconds(pid)
    return own, own + sum(cpu_seconds(p) for p in descendants(pid)[1:])


# --- engine alone: the worker process ----------------------------------------------------
def worker_main(spec_path: str) -> int:
    """The engine-alone process: settings from the environment (as the server's), the
    workload from `spec_path`; commands on stdin, one JSON result per line on stdout."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else prints (vLLM's logs, its engine core) goes to stderr
    spec = json.loads(Path(spec_path).read_text())
    return asyncio.run(_worker(spec, out))


async def _worker(spec: dict[str, Any], out: IO[str]) -> int:
    from loraloop.core.adapters.store import AdapterStore
    from loraloop.core.settings import Settings
    from loraloop.service.engines.factory import build_engine

    settings = Settings()
    work = Workload.from_json(spec["workload"])
    concurrency = int(spec["concurrency"])
    store = AdapterStore(settings.adapter_store)
    adapters = {work.user(u): store.latest(work.user(u)) for u in range(work.users)}
    engine = build_engine(settings)
    await engine.start()
    out.write("READY\n")
    runs = 0
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line or not line.strip():
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        runs += 1
        result = await drive(engine, work, adapters, int(cmd["requests"]), concurrency, runs)
        out.write("RESULT " + json.dumps(result) + "\n")
    await engine.stop()
    return 0


async def drive(
    engine: Any, work: Workload, adapters: dict[str, Any], n: int, concurrency: int, run: int
) -> dict[str, Any]:
    """Requests 0..n-1 of `work` through `engine.generate` from `concurrency` tasks (each
    takes the next request when its last one is done, as a ghz worker does)."""
    from loraloop.service.engines.protocol import GenerationRequest

    ids = iter(range(n))
    counts = {"tokens": 0, "errors": 0}

    async def one_worker() -> None:
        for i in ids:
            req = GenerationRequest(
                request_id=f"alone-{run}-{i}",
                prompt_token_ids=engine.encode(None, [("user", work.prompt(i))]),
                adapter=adapters[work.user(i)],
                max_tokens=work.max_tokens,
                temperature=work.temperature,
                top_p=1.0,
                seed=i,
            )
            try:
                result = await engine.generate(req)
            except Exception:
                counts["errors"] += 1
                continue
            counts["tokens"] += len(result.token_ids)

    me = os.getpid()
    own0, tree0 = tree_cpu(me)
    start = time.perf_counter()
    await asyncio.gather(*(one_worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    own1, tree1 = tree_cpu(me)
    return {
        "requests": n - counts["errors"],
        "errors": counts["errors"],
        "tokens": counts["tokens"],
        "elapsed": elapsed,
        "cpu_main": own1 - own0,
        "cpu_tree": tree1 - tree0,
    }


class EngineAlone:
    """The worker process, driven from here."""

    def __init__(
        self, python: str, env: dict[str, str], spec: Path, log: Path, timeout: float
    ) -> None:
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", str(spec)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=ROOT,
        )
        self._timeout = timeout

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"engine-alone worker ended; see {self._log.name}")
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def wait_ready(self) -> None:
        self._line("READY")

    def run(self, requests: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": "run", "requests": requests}) + "\n")
        self.proc.stdin.flush()
        return dict(json.loads(self._line("RESULT ")))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# --- the server, and ghz ------------------------------------------------------------------
class ServerProcess:
    """`python -m loraloop.cli serve` with its output in a log file."""

    def __init__(self, python: str, env: dict[str, str], log: Path, timeout: float) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            [python, "-m", "loraloop.cli", "serve"],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        self.port = self.metrics_port = 0
        while not self.port:
            text = log.read_text(errors="replace")
            if m := SERVER_READY.search(text):
                self.port = int(m.group(1))
                if mm := METRICS_READY.search(text):
                    self.metrics_port = int(mm.group(1))
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{text[-4000:]}")
            else:
                time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def generated_tokens(self) -> float:
        """loraloop_server_generated_tokens_total, from the server's /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("loraloop_server_generated_tokens_total "):
                    return float(line.split()[1])
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # SIGINT: no drain window
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()


def ghz_command(binary: str, data: Path, concurrency: int, cpus: int) -> list[str]:
    """ghz's command line, less --total and the target."""
    from loadtests.ghz import CALL, PROTO

    return [
        binary,
        "--insecure",
        f"--proto={PROTO}",
        f"--import-paths={PROTO.parents[2]}",
        f"--call={CALL}",
        f"--data-file={data}",
        f"--metadata={json.dumps({'x-api-key': API_KEY})}",
        f"--concurrency={concurrency}",
        "--timeout=120s",
        "--connections=1",
        f"--cpus={cpus}",
        "--format=json",
    ]


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Bench:
    server: ServerProcess
    alone: EngineAlone
    broker_pid: int | None
    ghz: list[str]  # without --total
    runs: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"server": [], "alone": []}
    )

    def run_server(self, total: int) -> dict[str, Any]:
        tok0 = self.server.generated_tokens()
        b0 = tree_cpu(self.broker_pid)[1] if self.broker_pid else 0.0
        c0 = children_cpu()
        own0, tree0 = tree_cpu(self.server.pid)
        proc = subprocess.run(
            [*self.ghz, f"--total={total}", self.server.target],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        own1, tree1 = tree_cpu(self.server.pid)
        c1 = children_cpu()
        b1 = tree_cpu(self.broker_pid)[1] if self.broker_pid else 0.0
        tok1 = self.server.generated_tokens()
        if proc.returncode != 0:
            raise RuntimeError(f"ghz failed ({proc.returncode}): {proc.stderr[-2000:]}")
        report = json.loads(proc.stdout)
        codes = dict(report.get("statusCodeDistribution") or {})
        ok = int(codes.pop("OK", 0))
        return {
            "requests": ok,
            "errors": sum(codes.values()),
            "error_codes": codes,
            "tokens": tok1 - tok0,
            "elapsed": report["total"] * 1e-9,
            "cpu_main": own1 - own0,
            "cpu_tree": tree1 - tree0,
            "cpu_client": c1 - c0,
            "cpu_broker": b1 - b0,
            "p50_ms": _ghz_percentile(report, 50),
            "p99_ms": _ghz_percentile(report, 99),
        }


def _ghz_percentile(report: dict[str, Any], q: int) -> float:
    for p in report.get("latencyDistribution") or []:
        if int(p["percentage"]) == q:
            return float(p["latency"]) * 1e-6
    return float("nan")


# --- stages: py-spy samples grouped ------------------------------------------------------
# (stage, regexes on one frame "function (path:line)"); frames are read innermost first and
# the first rule (in this order) matching a frame names the sample's stage.
ENGINE_TOKENIZE = "engine: prompt tokenization (both runs)"
ENGINE_MODEL = "engine: model, sampling, batching (both runs)"
KAFKA = "Kafka client threads"
STAGES: list[tuple[str, tuple[str, ...]]] = [
    (
        "detokenization and streaming",
        (
            r"(^|\.)_?decode \((transformers|tokenizers)/",
            r"(^|\.)(convert_ids_to_tokens|batch_decode) \(",
            r"vllm/v1/engine/detokenizer\.py",
            r"(^|\.)GenerateStream \(.*service/server\.py",
            r"(^|\.)generate \(.*service/engines/protocol\.py",
            r"service/call_metadata\.py",
        ),
    ),
    (
        ENGINE_TOKENIZE,
        (
            r"(^|\.)apply_chat_template \(",
            r"(^|\.)encode_with \(",
            r"jinja2/",
            r"(^|\.)encode \(.*service/engines/",
        ),
    ),
    ("bandit choice", (r"service/strategy\.py", r"core/bandits/")),
    (
        "validation and auth",
        (
            r"service/validation\.py",
            r"service/auth\.py",
            r"service/call_guard\.py",
            r"service/admission\.py",
            r"service/request_ids\.py",
            r"core/user_ids\.py",
            r"(^|\.)_prepare \(.*service/server\.py",
            r"\((hmac|hashlib)\.py",
        ),
    ),
    (
        "event encoding and event log (Interaction, queue, sender, producer)",
        (
            r"(^|\.)_response \(.*service/server\.py",
            r"service/(event_\w+|spill_\w+|journal_drain|missing_topics)\.py",
            r"kafka/producer/",
        ),
    ),
    ("logging (access log lines)", (r"logging/", r"core/structured_logs\.py", r"log_throttle")),
    ("metrics (interceptor, Prometheus)", (r"service/metrics\.py", r"prometheus_client/")),
    (
        "registry and cache",
        (r"service/adapters/", r"core/adapters/", r"core/kafka/follow\.py"),
    ),
    (KAFKA, (r"\(kafka/",)),
    (
        ENGINE_MODEL,
        (
            r"service/engines/",
            r"core/multi_lora\.py",
            r"core/sampling\.py",
            r"core/model_loading\.py",
            r"\((torch|transformers|vllm|safetensors|peft|zmq|msgspec|cloudpickle)/",
        ),
    ),
    ("other server code (service/)", (r"service/\w+\.py",)),
    ("gRPC / asyncio", (r"\(grpc", r"asyncio/", r"selectors\.py", r"concurrent/futures")),
]
_COMPILED = [(name, [re.compile(p) for p in pats]) for name, pats in STAGES]
# Leaf frames of a thread that waits, not works (py-spy --nonblocking cannot always tell).
IDLE_LEAVES = re.compile(
    r"^([\w.<>]*\.)?(select|poll|epoll|wait|_wait_for_tstate_lock|get|sleep|recv|recv_into|"
    r"accept|readline|_recv_msg|_worker) \((selectors|threading|queue|socket|selector|time|"
    r"multiprocessing|zmq|kafka|concurrent)"
)
WAITING = "waiting"
# Kafka client threads' samples by their owner (the thread's own frames or name).
KAFKA_OWNERS = (
    ("event encoding and event log (Interaction, queue, sender, producer)", "producer"),
    ("event encoding and event log (Interaction, queue, sender, producer)", "event"),
    ("registry and cache", "adapter-updates"),
    ("registry and cache", "registry"),
    ("bandit choice", "bandit-state"),
    ("bandit choice", "strategy"),
)


def stage_of(stack: str) -> str:
    frames = stack.split(";")
    if IDLE_LEAVES.match(frames[-1]):
        return WAITING
    for frame in reversed(frames):
        for name, pats in _COMPILED:
            if any(p.search(frame) for p in pats):
                if name == KAFKA:
                    for owner, needle in KAFKA_OWNERS:
                        if needle in stack:
                            return owner
                return name
    return "other"


THREAD = re.compile(r"^thread \((\d+)\)")
UNSAMPLED_GRPC = "gRPC / asyncio"
UNSAMPLED_NATIVE = "native threads without Python frames (torch's intra-op pool, ...)"


THREAD_NAME = re.compile(r"^thread \((\d+)\): ([^;]+)")


def thread_names(raw: Path) -> dict[int, str]:
    """Python thread names by native id, from py-spy's stacks."""
    names = {}
    for line in raw.read_text().splitlines():
        if m := THREAD_NAME.match(line):
            names[int(m.group(1))] = m.group(2)
    return names


def by_thread(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    names: dict[int, str],
    requests: int,
) -> dict[str, float]:
    """ms of CPU per request by thread name (Python's, else the OS's, marked native)."""
    ms: Counter[str] = Counter()
    for tid, (name, end) in after.items():
        used = end - before.get(tid, (name, 0.0))[1]
        if used > 0:
            label = names.get(tid) or f"(native) {name}"
            ms[re.sub(r"-\d+(_\d+)?$", "", label)] += 1e3 * used / requests
    return dict(ms)


def summarize_profile(raw: Path) -> tuple[dict[int, Counter[str]], int]:
    """Busy samples per thread (native id) and stage, and how many samples were waiting."""
    by_thread: dict[int, Counter[str]] = {}
    waiting = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stage = stage_of(stack)
        if stage == WAITING:
            waiting += int(count)
            continue
        m = THREAD.match(stack)
        by_thread.setdefault(int(m.group(1)) if m else 0, Counter())[stage] += int(count)
    return by_thread, waiting


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of `pid`: (its name, utime + stime in seconds)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def split_by_stage(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    samples: dict[int, Counter[str]],
    requests: int,
) -> dict[str, float]:
    """ms of CPU per request by stage: each thread's CPU over the run (from /proc), spread
    over the stages of its busy samples; threads with CPU but no busy sample (no Python
    frames: grpc's C++ threads, torch's OpenMP pool) by their name."""
    ms: Counter[str] = Counter()
    for tid, (name, end) in after.items():
        used = end - before.get(tid, (name, 0.0))[1]
        if used <= 0:
            continue
        counts = samples.get(tid)
        if counts:
            total = sum(counts.values())
            for stage, n in counts.items():
                ms[stage] += 1e3 * used * n / total / requests
        elif name.startswith(("grpc", "default-exec", "resolver-exe", "event_engine")):
            ms[UNSAMPLED_GRPC] += 1e3 * used / requests
        else:
            ms[f"{UNSAMPLED_NATIVE}"] += 1e3 * used / requests
    return dict(ms)


def dump_threads(
    path: Path,
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    samples: dict[int, Counter[str]],
) -> None:
    """Per thread: name, CPU seconds over the run, busy samples by stage (for --keep)."""
    rows = {
        str(tid): {
            "name": name,
            "cpu_s": round(end - before.get(tid, (name, 0.0))[1], 3),
            "samples": dict(samples.get(tid, {})),
        }
        for tid, (name, end) in after.items()
    }
    path.write_text(json.dumps(rows, indent=1))


def py_spy_binary() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    main = ROOT / ".venv" / "bin" / "py-spy"
    for c in (here, main):
        if c.is_file():
            return str(c)
    return shutil.which("py-spy")


class Profiler:
    """py-spy record of one process until stopped (SIGINT makes it write its output)."""

    def __init__(self, binary: str, pid: int, out: Path, rate: int) -> None:
        self.out = out
        cmd = [
            binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
            "--output", str(out), "--nonblocking", "--threads",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # attached before the load starts

    def stop(self) -> Path:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if not self.out.is_file():
            assert self.proc.stdout is not None
            raise RuntimeError(f"py-spy wrote nothing: {self.proc.stdout.read()[-2000:]!r}")
        return self.out


# --- set-up ------------------------------------------------------------------------------
def arms_toml(n: int) -> str:
    """`n` arms without levers: the bandit chooses (and logs) an arm per request, and every
    arm samples the same way, so both sides run the same generations."""
    return "".join(f'[[arm]]\nname = "arm{i}"\n\n' for i in range(n))


def write_adapters(settings: Any, work: Workload, rank: int) -> None:
    """Version 1 of every user's adapter in the store (random weights, the engine's
    targets), as the learner would have written it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraloop.core.adapters.peft_format import to_peft_files
    from loraloop.core.adapters.store import AdapterStore
    from loraloop.core.multi_lora import LoRAWeights

    config = AutoConfig.from_pretrained(settings.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in settings.lora_targets and isinstance(m, torch.nn.Linear)
    }
    store = AdapterStore(settings.adapter_store)
    gen = torch.Generator().manual_seed(0)
    for u in range(work.users):
        w = LoRAWeights(rank, settings.lora_alpha)
        for name, (fan_in, fan_out) in shapes.items():
            w.a[name] = torch.randn(rank, fan_in, generator=gen) * 0.05
            w.b[name] = torch.randn(fan_out, rank, generator=gen) * 0.05
        files = to_peft_files(w, settings.model_id or settings.model, settings.lora_targets)
        store.write(work.user(u), 1, files)


def child_python(engine: str) -> str:
    if engine == "vllm":
        venv = ROOT / ".venv-vllm" / "bin" / "python"
        if venv.is_file():
            return str(venv)
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise SystemExit("no .venv-vllm: run `make vllm` first") from None
    return sys.executable


# --- report ------------------------------------------------------------------------------
def med(runs: list[dict[str, Any]], key: str, per: str | None = None) -> float:
    vals = [r[key] / r[per] if per else r[key] for r in runs if not per or r[per]]
    return statistics.median(vals) if vals else float("nan")


def report(
    console: Any,
    engine: str,
    args: argparse.Namespace,
    runs: dict[str, list[dict[str, Any]]],
    stages: dict[str, tuple[float, float]],
    samples: dict[str, tuple[int, int]],
    threads: dict[str, tuple[float, float]],
    idle_cpu: tuple[float, float],
) -> None:
    from rich.table import Table

    srv, alone = runs["server"], runs["alone"]
    for r in srv + alone:
        r["rps"] = r["requests"] / r["elapsed"]
        r["tps"] = r["tokens"] / r["elapsed"]
        r["cpu_ms"] = 1e3 * r["cpu_tree"] / max(1, r["requests"])
        r["main_ms"] = 1e3 * r["cpu_main"] / max(1, r["requests"])
        r["tok_req"] = r["tokens"] / max(1, r["requests"])
    rps_s, rps_a = med(srv, "rps"), med(alone, "rps")
    tps_s, tps_a = med(srv, "tps"), med(alone, "tps")
    cpu_s, cpu_a = med(srv, "cpu_ms"), med(alone, "cpu_ms")
    pairs = [1e3 * (s["cpu_tree"] / s["requests"] - a["cpu_tree"] / a["requests"])
             for s, a in zip(srv, alone, strict=False)]  # fmt: skip
    t = Table(
        title=(
            f"{engine} engine: server (ghz) vs engine alone, concurrency {args.concurrency}, "
            f"{args.requests} requests x {len(srv)} runs each, {args.users} users with "
            f"adapters, max_tokens {args.max_tokens}; medians"
        )
    )
    for col in ("figure", "engine alone", "server", "server / alone", "target"):
        t.add_column(col, justify="right" if col != "figure" else "left")
    ratio_r, ratio_t = rps_s / rps_a, tps_s / tps_a
    t.add_row("requests/s", f"{rps_a:.2f}", f"{rps_s:.2f}", f"{ratio_r:.3f}", ">= 0.8")
    t.add_row("tokens/s", f"{tps_a:.1f}", f"{tps_s:.1f}", f"{ratio_t:.3f}", ">= 0.8")
    t.add_row("tokens per request", f"{med(alone, 'tok_req'):.1f}", f"{med(srv, 'tok_req'):.1f}",
              "", "")  # fmt: skip
    t.add_row("p50 / p99 latency ms (ghz)", "", f"{med(srv, 'p50_ms'):.0f} / "
              f"{med(srv, 'p99_ms'):.0f}", "", "")  # fmt: skip
    t.add_row("CPU ms / request (process tree)", f"{cpu_a:.2f}", f"{cpu_s:.2f}",
              f"+{cpu_s - cpu_a:.2f} ms", "")  # fmt: skip
    t.add_row("  of it the main process", f"{med(alone, 'main_ms'):.2f}",
              f"{med(srv, 'main_ms'):.2f}", "", "")  # fmt: skip
    t.add_row(
        "server CPU ms / request outside the engine",
        "",
        f"{statistics.median(pairs):.2f}",
        f"pairs: {', '.join(f'{p:.2f}' for p in pairs)}",
        "<= 2 ms",
    )
    t.add_row("ghz client CPU ms / request", "", f"{1e3 * med(srv, 'cpu_client', 'requests'):.2f}",
              "", "")  # fmt: skip
    t.add_row("Kafka broker CPU ms / request", "",
              f"{1e3 * med(srv, 'cpu_broker', 'requests'):.2f}", "", "")  # fmt: skip
    t.add_row("CPU while idle (% of a core, process tree)", f"{100 * idle_cpu[1]:.1f} %",
              f"{100 * idle_cpu[0]:.1f} %", "", "")  # fmt: skip
    errors = sum(r["errors"] for r in srv + alone)
    t.add_row("errors", str(sum(r["errors"] for r in alone)), str(sum(r["errors"] for r in srv)),
              "", "0")  # fmt: skip
    console.print(t)
    per_run = Table(title="per run (in the order run)")
    for col in ("run", "side", "req/s", "tok/s", "CPU ms/req", "main ms/req", "client ms/req"):
        per_run.add_column(col, justify="right")
    for i, (s, a) in enumerate(zip(srv, alone, strict=False)):
        for side, r in (("server", s), ("alone", a)):
            client = f"{1e3 * r['cpu_client'] / r['requests']:.2f}" if "cpu_client" in r else ""
            per_run.add_row(str(i + 1), side, f"{r['rps']:.2f}", f"{r['tps']:.1f}",
                            f"{r['cpu_ms']:.2f}", f"{r['main_ms']:.2f}", client)  # fmt: skip
    console.print(per_run)
    if stages:
        st = Table(
            title=(
                "CPU per request by stage (one more run of each: every thread's CPU from /proc, "
                "spread over the stages of its py-spy samples)"
            )
        )
        for col in ("stage", "server ms/req", "engine alone ms/req", "outside the engine"):
            st.add_column(col, justify="right" if col != "stage" else "left")
        order = [name for name, _ in STAGES] + ["other", UNSAMPLED_NATIVE]
        outside_total = 0.0
        for name in order:
            s_ms, a_ms = stages.get(name, (0.0, 0.0))
            if not s_ms and not a_ms:
                continue
            diff = s_ms - a_ms
            in_engine = name.startswith("engine:") or name == UNSAMPLED_NATIVE
            if not in_engine:
                outside_total += diff
            st.add_row(name, f"{s_ms:.3f}", f"{a_ms:.3f}", "" if in_engine else f"{diff:+.3f}")
        s_tot = sum(v[0] for v in stages.values())
        a_tot = sum(v[1] for v in stages.values())
        st.add_row("all threads of the main process", f"{s_tot:.3f}", f"{a_tot:.3f}",
                   f"{outside_total:+.3f}")  # fmt: skip
        console.print(st)
        (s_busy, s_wait), (a_busy, a_wait) = samples["server"], samples["alone"]
        console.print(
            f"py-spy samples: server {s_busy} busy + {s_wait} waiting, engine alone {a_busy} "
            f"busy + {a_wait} waiting. Child processes (vLLM's engine core) are not sampled: "
            "their CPU is the engine's in both runs."
        )
    if threads:
        tt = Table(title="CPU per request by thread, same profiled runs (/proc; no sampling)")
        for col in ("thread", "server ms/req", "engine alone ms/req"):
            tt.add_column(col, justify="right" if col != "thread" else "left")
        for name, (s_ms, a_ms) in sorted(threads.items(), key=lambda kv: -kv[1][0] - kv[1][1]):
            if s_ms >= 0.005 or a_ms >= 0.005:
                tt.add_row(name, f"{s_ms:.2f}", f"{a_ms:.2f}")
        tt.add_row(
            "all", f"{sum(v[0] for v in threads.values()):.2f}",
            f"{sum(v[1] for v in threads.values()):.2f}",
        )  # fmt: skip
        console.print(tt)
    if errors:
        console.print(f"[red]errors: {errors}[/red]")


# --- main --------------------------------------------------------------------------------
def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--quick", action="store_true", help="about 1 minute (hf)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, help="per run (default 480; quick 120)")
    parser.add_argument("--repeats", type=int, help="runs of each side (default 5; quick 2)")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--arms", type=int, default=4, help="no-op bandit arms (1: no bandit)")
    parser.add_argument("--ghz-cpus", type=int, default=1, help="ghz's GOMAXPROCS")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy Hz; 0: no split")
    parser.add_argument(
        "--profile-requests", type=int, help="per profiled run (default 2 x --requests)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    args.requests = args.requests or (120 if args.quick else 480)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.profile_requests = args.profile_requests or 2 * args.requests

    from rich.console import Console
    from rich.progress import Progress

    from loadtests.ghz import ghz_binary
    from loraloop.core.kafka.admin import ensure_loraloop_topics
    from loraloop.core.settings import Settings
    from loraloop.devtools.kafka_broker import KafkaBroker
    from loraloop.devtools.tiny_model import ensure_tiny_model
    from loraloop.processes import settings_env

    console = Console(width=None if sys.stdout.isatty() else 150)
    ghz = ghz_binary()
    if ghz is None:
        raise SystemExit("ghz is not installed: make loadtest-tools")
    spy = py_spy_binary() if args.profile_rate > 0 else None
    if args.profile_rate > 0 and spy is None:
        console.print("py-spy not found (pip install py-spy): no split by stage")
    python = child_python(args.engine)
    tmp = Path(tempfile.mkdtemp(prefix="bench-server-overhead-"))
    work = make_workload(args.users, args.prompts, args.max_tokens)
    (tmp / "data.json").write_text(json.dumps(work.ghz_data()))
    (tmp / "arms.toml").write_text(arms_toml(args.arms))
    (tmp / "spec.json").write_text(
        json.dumps({"workload": work.to_json(), "concurrency": args.concurrency})
    )
    warm = max(2 * args.users, 2 * args.concurrency)
    started = time.monotonic()
    server = alone = None
    broker = KafkaBroker(data_dir=tmp / "kafka", log_level="WARN")
    try:
        with console.status("starting the Kafka broker"):
            broker.start(timeout=180)
        settings = Settings(
            model=str(ensure_tiny_model(progress=False)),
            engine=args.engine,
            kafka_bootstrap=broker.bootstrap,
            port=0,
            server_metrics_port=0,
            adapter_store=(tmp / "adapters").resolve(),
            spill_dir=(tmp / "spill").resolve(),
            arms_file=(tmp / "arms.toml").resolve(),
            api_keys=f"{API_KEY}={USER_PREFIX}*",
            request_id_secret="bench-server-overhead-secret",
            max_new_tokens=max(64, args.max_tokens),
            drain_seconds=0.0,
        )
        ensure_loraloop_topics(settings)
        write_adapters(settings, work, settings.lora_rank)
        env = settings_env(settings)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault(
            "GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
        )
        timeout = 600 if args.engine == "vllm" else 180
        with console.status(f"starting the server and the engine alone ({args.engine})"):
            alone = EngineAlone(python, env, tmp / "spec.json", tmp / "alone.log", timeout)
            server = ServerProcess(python, env, tmp / "server.log", timeout)
            alone.wait_ready()
        broker_proc = getattr(broker, "_proc", None)
        bench = Bench(
            server,
            alone,
            broker_proc.pid if broker_proc is not None else None,
            ghz_command(ghz, tmp / "data.json", args.concurrency, args.ghz_cpus),
        )
        idle0 = tree_cpu(server.pid)[1], tree_cpu(alone.pid)[1]
        time.sleep(3.0)
        idle_cpu = (
            (tree_cpu(server.pid)[1] - idle0[0]) / 3.0,
            (tree_cpu(alone.pid)[1] - idle0[1]) / 3.0,
        )
        steps = 2 + 2 * args.repeats + (2 if spy else 0)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("warm-up", total=steps)
            bench.run_server(warm)
            alone.run(warm)
            progress.advance(task, 2)
            for r in range(args.repeats):
                progress.update(task, description=f"run {r + 1}/{args.repeats}: server")
                bench.runs["server"].append(bench.run_server(args.requests))
                progress.advance(task)
                progress.update(task, description=f"run {r + 1}/{args.repeats}: engine alone")
                bench.runs["alone"].append(alone.run(args.requests))
                progress.advance(task)
            stages: dict[str, tuple[float, float]] = {}
            samples: dict[str, tuple[int, int]] = {}
            threads: dict[str, tuple[float, float]] = {}
            if spy:
                progress.update(task, description="py-spy: server")
                prof = Profiler(spy, server.pid, tmp / "server.raw", args.profile_rate)
                t0 = thread_cpu(server.pid)
                run_s = bench.run_server(args.profile_requests)
                t1 = thread_cpu(server.pid)
                s_threads, s_wait = summarize_profile(prof.stop())
                s_ms = split_by_stage(t0, t1, s_threads, run_s["requests"])
                dump_threads(tmp / "server-threads.json", t0, t1, s_threads)
                s_by = by_thread(t0, t1, thread_names(prof.out), run_s["requests"])
                progress.advance(task)
                progress.update(task, description="py-spy: engine alone")
                prof = Profiler(spy, alone.pid, tmp / "alone.raw", args.profile_rate)
                t0 = thread_cpu(alone.pid)
                run_a = alone.run(args.profile_requests)
                t1 = thread_cpu(alone.pid)
                a_threads, a_wait = summarize_profile(prof.stop())
                a_ms = split_by_stage(t0, t1, a_threads, run_a["requests"])
                dump_threads(tmp / "alone-threads.json", t0, t1, a_threads)
                a_by = by_thread(t0, t1, thread_names(prof.out), run_a["requests"])
                threads = {n: (s_by.get(n, 0.0), a_by.get(n, 0.0)) for n in {*s_by, *a_by}}
                progress.advance(task)
                for name in set(s_ms) | set(a_ms):
                    stages[name] = (s_ms.get(name, 0.0), a_ms.get(name, 0.0))
                samples = {
                    "server": (sum(sum(c.values()) for c in s_threads.values()), s_wait),
                    "alone": (sum(sum(c.values()) for c in a_threads.values()), a_wait),
                }
        report(console, args.engine, args, bench.runs, stages, samples, threads, idle_cpu)
        console.print(
            f"{time.monotonic() - started:.0f} s in all; logs and profiles in {tmp}"
            + ("" if args.keep else " (removed)")
        )
    finally:
        if server is not None:
            server.stop()
        if alone is not None:
            alone.close()
        broker.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
