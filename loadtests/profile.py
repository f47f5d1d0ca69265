"""Where the server's time goes under load: py-spy samples of the server process, grouped.

`python -m loadtests profile` starts the stack, drives steady open-loop load and records
the server process with py-spy (sampling from outside, `--nonblocking`, so the server is
not paused). Each sampled stack is put in the first category whose rule matches, reading
from the innermost frame out, and the table shows each category's share of the samples
in which a thread was busy (stacks that end blocked in select / a condition / a queue are
counted apart as waiting: with `--nonblocking` py-spy cannot always tell them idle).
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

# (category, substrings of a frame "function (path:line)"); the innermost match wins.
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("sampling (top-p, multinomial)", ("sample_tokens",)),
    ("detokenize (tokenizer.decode)", ("decode (transformers", "decode (tokenizers")),
    ("tokenize prompt (chat template)", ("apply_chat_template", "encode (service/engines")),
    ("LoRA: batched multi-LoRA matmuls", ("loraloop/core/multi_lora.py",)),
    ("attention (sdpa / eager)", ("attention_interface", "sdpa_attention", "eager_attention")),
    ("base model forward (other layers)", ("modeling_llama.py", "torch/nn/modules")),
    ("engine bookkeeping (KV cache, batch, hf.py)", ("cache_utils.py", "service/engines/hf.py")),
    ("adapter load (store, slots)", ("core/adapters/", "service/adapters/slots.py")),
    ("Kafka client (event log, registry)", ("kafka/",)),
    ("protobuf + request handling", ("service/server.py", "service/validation.py", "protobuf")),
    ("gRPC + asyncio", ("grpc", "asyncio")),
]


def py_spy() -> str:
    found = shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: pip install py-spy")
    return found


def start_recording(pid: int, seconds: float, out: Path, rate: int = 100) -> subprocess.Popen:
    """py-spy record of `pid` for `seconds`, collapsed stacks ("raw") written to `out`."""
    cmd = [
        py_spy(), "record", "--pid", str(pid), "--duration", str(int(seconds)),
        "--rate", str(rate), "--format", "raw", "--output", str(out), "--nonblocking",
        "--threads",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# Leaf frames of a thread that is blocked, not working: with --nonblocking py-spy cannot
# always tell, so these samples are counted apart as waiting.
IDLE_LEAVES = ("select (selectors.py", "wait (threading.py", "get (queue.py", "sleep (")
WAITING = "waiting (select / condition / queue)"


def categorize(stack: str) -> str:
    frames = stack.split(";")
    if any(needle in frames[-1] for needle in IDLE_LEAVES):
        return WAITING
    for frame in reversed(frames):  # innermost first
        for name, needles in RULES:
            if any(n in frame for n in needles):
                return name
    return "other"


# The event log's modules (service/event_log.py and the roles split out of it).
EVENT_LOG_MODULES = ("event_log", "event_sender", "event_producer", "journal_drain")


def thread_of(stack: str) -> str:
    if "service/engines/hf.py" in stack or "hf-engine" in stack:
        return "engine thread"
    if any(f"service/{m}.py" in stack for m in EVENT_LOG_MODULES):
        return "event log threads (sender, producer connector)"
    if "service/adapters/registry.py" in stack:
        return "adapter registry thread (Kafka consumer)"
    if "kafka/" in stack:
        return "Kafka client threads"
    if "asyncio" in stack or "grpc" in stack or "MainThread" in stack:
        return "gRPC / asyncio loop"
    return "other threads"


def summarize(raw: Path) -> dict[str, dict[str, float]]:
    """Shares of active samples by category and by thread, from py-spy's raw output."""
    by_category: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        category = categorize(stack)
        by_category[category] += n
        if category != WAITING:
            by_thread[thread_of(stack)] += n
    waiting = by_category.pop(WAITING, 0)
    busy = total - waiting
    scale = 1.0 / busy if busy else 0.0
    return {
        "samples": {"sampled": float(total), "busy": float(busy), "waiting": float(waiting)},
        "by_category": {k: v * scale for k, v in by_category.most_common()},
        "by_thread": {k: v * scale for k, v in by_thread.most_common()},
    }
