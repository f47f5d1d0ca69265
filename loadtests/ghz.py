"""ghz (github.com/bojand/ghz), a Go gRPC load tool, as a peer to check our figures.

`compare` drives the same server and the same RPC (unary Generate, the demo world's
users and prompts, same max_tokens, closed loop at the same concurrency and request
count) with ghz and with our generator, alternating so both see the same machine state,
and prints one table. Install ghz with `scripts/install-loadtest-tools.sh`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from loadtests.config import check_loopback
from loadtests.generator import make_load_users
from loraloop.client import api_key_metadata

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "protos" / "loraloop" / "v1" / "api.proto"
CALL = "loraloop.v1.LoraLoop.Generate"


def ghz_binary() -> str | None:
    """The ghz executable on PATH or in the Go bin directory, or None."""
    found = shutil.which("ghz")
    if found:
        return found
    gobin = os.environ.get("GOBIN") or os.path.join(
        os.environ.get("GOPATH") or os.path.expanduser("~/go"), "bin"
    )
    candidate = Path(gobin) / "ghz"
    return str(candidate) if candidate.is_file() else None


def request_messages(
    users: int, requests: int, max_tokens: int, prefix: str, seed: int = 0
) -> list[dict[str, Any]]:
    """The Generate requests of `requests` sessions of the demo world's users, as the JSON
    ghz sends (it cycles through a list round-robin)."""
    people = make_load_users(users, prefix, seed)
    return [
        {
            "user_id": people[i % users].user_id,
            "messages": {"messages": [{"role": "user", "content": people[i % users].prompt()}]},
            "sampling": {"max_tokens": max_tokens, "temperature": 1.0},
        }
        for i in range(requests)
    ]


def run_ghz(
    target: str,
    messages: list[dict[str, Any]],
    concurrency: int,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Run ghz once (len(messages) unary Generate calls) and return its JSON report."""
    check_loopback(target)
    binary = ghz_binary()
    if binary is None:
        raise RuntimeError("ghz is not installed: run scripts/install-loadtest-tools.sh")
    with tempfile.TemporaryDirectory(prefix="loadtests-ghz-") as tmp:
        data = Path(tmp) / "data.json"
        data.write_text(json.dumps(messages))
        report = Path(tmp) / "report.json"
        auth = []
        if metadata := api_key_metadata():  # $LORALOOP_API_KEY, in a file: not on argv
            meta = Path(tmp) / "metadata.json"
            meta.touch(mode=0o600)
            meta.write_text(json.dumps(dict(metadata)))
            auth = [f"--metadata-file={meta}"]
        cmd = [
            binary,
            "--insecure",
            f"--proto={PROTO}",
            f"--import-paths={PROTO.parents[2]}",
            f"--call={CALL}",
            f"--data-file={data}",
            f"--concurrency={concurrency}",
            f"--total={len(messages)}",
            f"--timeout={timeout:g}s",
            "--connections=1",
            "--format=json",
            *auth,
            f"--output={report}",
            target,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * 4 + 600)
        if proc.returncode != 0 or not report.is_file():
            raise RuntimeError(f"ghz failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return json.loads(report.read_text())


def ghz_figures(raw: dict[str, Any]) -> dict[str, Any]:
    """ghz's report in our summary's terms (ms, requests/s, errors by code)."""
    ns = 1e-6
    dist = {int(p["percentage"]): p["latency"] * ns for p in raw.get("latencyDistribution") or []}
    codes = dict(raw.get("statusCodeDistribution") or {})
    ok = codes.pop("OK", 0)
    total = raw.get("count", 0)
    return {
        "requests": total,
        "completed": ok,
        "requests_per_s": raw.get("rps", 0.0) * (ok / total if total else 0.0),
        "latency_ms": {
            "p50": dist.get(50),
            "p95": dist.get(95),
            "p99": dist.get(99),
            "max": raw.get("slowest", 0) * ns,
            "mean": raw.get("average", 0) * ns,
        },
        "errors_by_code": codes,
    }


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-figure medians over repeated runs (requests/s and latency percentiles)."""
    keys = ("p50", "p95", "p99", "max", "mean")
    return {
        "requests_per_s": statistics.median(r["requests_per_s"] for r in runs),
        "latency_ms": {
            k: statistics.median(r["latency_ms"][k] for r in runs if r["latency_ms"][k] is not None)
            for k in keys
        },
        "errors": sum(sum(r["errors_by_code"].values()) for r in runs),
    }
