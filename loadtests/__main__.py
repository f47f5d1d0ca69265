"""`python -m loadtests run|stack|compare|capacity` (see loadtests/README.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Wide enough for the tables when the output is a file or a pipe (rich assumes 80).
console = Console(width=None if sys.stdout.isatty() else 140)

# What `stack` and `capacity` use when the command line says nothing: open loop at about
# 40 % of this 2-core machine's capacity (see the README's capacity table).
STACK_DEFAULTS: dict[str, Any] = {
    "mode": "open",
    "rate": 10.0,
    "concurrency": 4,
    "users": 16,
    "duration": 60.0,
    "max_tokens": 32,
    "stream_share": 0.5,
}


def _load_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument(
        "--mode",
        choices=("open", "closed"),
        help="open: Poisson arrivals at --rate; closed: --concurrency sessions in flight",
    )
    g.add_argument("--rate", type=float, help="open loop: sessions per second")
    g.add_argument("--concurrency", type=int, help="closed loop: concurrent sessions")
    g.add_argument("--users", type=int, help="simulated users (demo world, hidden tastes)")
    g.add_argument("--duration", type=float, help="seconds of issuing new sessions")
    g.add_argument("--requests", type=int, help="stop after this many sessions")
    g.add_argument("--ramp", type=float, help="seconds to ramp up to --rate/--concurrency")
    g.add_argument(
        "--hard-stop",
        type=float,
        help="cancel what is in flight this many s after issuing ends (default 30)",
    )
    g.add_argument("--max-tokens", type=int, help="max_tokens of every Generate")
    g.add_argument(
        "--stream-share",
        type=float,
        help="fraction of sessions using GenerateStream (measures time to first token)",
    )
    g.add_argument(
        "--no-feedback",
        dest="feedback",
        action="store_false",
        default=None,
        help="only Generate, no Feedback",
    )
    g.add_argument("--think", type=float, help="closed loop: mean think time between sessions")
    g.add_argument("--timeout", type=float, help="deadline of each RPC in seconds (default 60)")
    g.add_argument("--seed", type=int, help="seed of users, prompts and arrivals")
    g.add_argument("--user-prefix", help="user ids are PREFIX-0000 ... (default 'load')")
    p.add_argument("--out", type=Path, default=Path("out/loadtests"), help="output directory")


_FIELDS = (
    "mode",
    "rate",
    "concurrency",
    "users",
    "duration",
    "requests",
    "ramp",
    "hard_stop",
    "max_tokens",
    "stream_share",
    "feedback",
    "think",
    "timeout",
    "seed",
    "user_prefix",
)


def _load_fields(ns: argparse.Namespace, defaults: dict[str, Any] | None = None) -> dict:
    given = {k: getattr(ns, k) for k in _FIELDS if getattr(ns, k, None) is not None}
    fields = {**(defaults or {}), **given}
    if "requests" in given and "duration" not in given:
        fields["duration"] = None  # a request count alone decides when to stop
    return fields


def _stack_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stack (Kafka + server + learner started by this command)")
    g.add_argument("--no-learner", dest="learner", action="store_false", help="no learner")
    g.add_argument("--adapter-slots", type=int, default=64, help="LORALOOP_ADAPTER_SLOTS")
    g.add_argument("--max-batch-size", type=int, default=16, help="LORALOOP_MAX_BATCH_SIZE")
    g.add_argument(
        "--engine",
        choices=["hf", "vllm"],
        default="hf",
        help="the server's engine (vllm: runs under .venv-vllm, see `make vllm`)",
    )


def _stack_options(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "learner": ns.learner,
        "adapter_slots": ns.adapter_slots,
        "max_batch_size": ns.max_batch_size,
        "engine": ns.engine,
    }


# --- run -------------------------------------------------------------------------------------
def cmd_run(ns: argparse.Namespace) -> int:
    from loadtests import report
    from loadtests.config import LoadConfig
    from loadtests.generator import run_load

    config = LoadConfig(target=ns.target, **_load_fields(ns))
    console.print(f"load test against {config.target}: {config.mode} loop")
    result = run_load(config)
    summary = report.write(result, ns.out, ns.name, console=console)
    return 0 if summary["completed"] else 1


# --- stack -----------------------------------------------------------------------------------
def cmd_stack(ns: argparse.Namespace) -> int:
    from loadtests.scenarios import run_scenario, scenario_names

    names = scenario_names() if ns.scenario == "all" else [ns.scenario]
    knobs = {
        "burst": {"factor": ns.burst_factor},
        "cold-users": {"slots": ns.cold_slots, "users": ns.cold_users},
        "learner-restart": {"down": ns.learner_down},
        "kafka-outage": {"seconds": ns.outage_seconds},
    }
    summaries = {}
    for name in names:
        base = _load_fields(ns, STACK_DEFAULTS)
        base.setdefault("user_prefix", name)
        summaries[name] = run_scenario(
            name, base, ns.out, console, _stack_options(ns), knobs.get(name, {})
        )
    if len(names) > 1:
        (ns.out / "scenarios.json").write_text(json.dumps(summaries, indent=2, default=str))
    return 0 if all(s["completed"] for s in summaries.values()) else 1


# --- compare with ghz ------------------------------------------------------------------------
def cmd_compare(ns: argparse.Namespace) -> int:
    from loadtests import report
    from loadtests.config import LoadConfig
    from loadtests.generator import run_load
    from loadtests.ghz import ghz_binary, ghz_figures, median_figures, request_messages, run_ghz
    from loadtests.stack import Stack

    if ghz_binary() is None:
        console.print("[red]ghz is not installed: run scripts/install-loadtest-tools.sh")
        return 2
    stack = None
    target = ns.target
    if target is None:
        with console.status("starting Kafka and server..."):
            stack = Stack(ns.out / "compare" / "stack", learner=False).start()
        target = stack.target
    try:
        fields = {
            "users": ns.users,
            "concurrency": ns.concurrency,
            "max_tokens": ns.max_tokens,
            "mode": "closed",
            "stream_share": 0.0,
            "feedback": False,
            "duration": None,
        }
        messages = request_messages(ns.users, ns.requests, ns.max_tokens, "compare")
        with console.status("warming up..."):
            run_ghz(target, messages[: ns.concurrency * 2], ns.concurrency)
            run_load(LoadConfig(target=target, requests=ns.concurrency * 2, **fields))
        runs: dict[str, list[dict[str, Any]]] = {"ghz": [], "loadtests": []}
        for i in range(ns.repeats):  # alternate, so both see the same machine state
            with console.status(f"round {i + 1}/{ns.repeats}: ghz..."):
                runs["ghz"].append(ghz_figures(run_ghz(target, messages, ns.concurrency)))
            with console.status(f"round {i + 1}/{ns.repeats}: loadtests..."):
                result = run_load(
                    LoadConfig(target=target, requests=ns.requests, user_prefix="compare", **fields)
                )
                runs["loadtests"].append(report.summarize(result))
    finally:
        if stack is not None:
            stack.close()
    medians = {tool: median_figures(r) for tool, r in runs.items()}
    t = Table(
        title=f"ghz vs loadtests: unary Generate, closed loop, concurrency {ns.concurrency}, "
        f"{ns.requests} requests, max_tokens {ns.max_tokens}, median of {ns.repeats}"
    )
    for col in ("figure", "ghz", "loadtests", "loadtests / ghz"):
        t.add_column(col, justify="right")
    rows = [("requests/s", lambda m: m["requests_per_s"])]
    rows += [(f"{k} ms", lambda m, k=k: m["latency_ms"][k]) for k in ("p50", "p95", "p99", "max")]
    for label, get in rows:
        g, o = get(medians["ghz"]), get(medians["loadtests"])
        t.add_row(label, f"{g:,.2f}", f"{o:,.2f}", f"{o / g:.2f}" if g else "-")
    t.add_row("errors", str(medians["ghz"]["errors"]), str(medians["loadtests"]["errors"]), "")
    for tool, rs in runs.items():
        each = ", ".join(f"{r['requests_per_s']:.2f}" for r in rs)
        t.add_row(f"{tool} requests/s each run", each, "", "")
    console.print(t)
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "compare.json").write_text(
        json.dumps({"runs": runs, "median": medians, "args": vars(ns)}, indent=2, default=str)
    )
    console.print(f"wrote {ns.out / 'compare.json'}")
    return 0


# --- capacity --------------------------------------------------------------------------------
def cmd_capacity(ns: argparse.Namespace) -> int:
    from loadtests import report
    from loadtests.config import LoadConfig
    from loadtests.generator import LoadGenerator
    from loadtests.stack import Stack

    stack = None
    target = ns.target
    if target is None:
        with console.status("starting Kafka, server and learner..."):
            stack = Stack(ns.out / "capacity" / "stack", **_stack_options(ns)).start()
        target = stack.target
    rows: list[dict[str, Any]] = []
    try:
        fields = _load_fields(ns, {**STACK_DEFAULTS, "duration": ns.step_seconds})
        fields["mode"] = "open"
        failures = 0
        for rate in [float(r) for r in ns.rates.split(",")]:
            config = LoadConfig(target=target, **{**fields, "rate": rate, "hard_stop": 10.0})
            learning = stack is not None and stack.with_learner
            updates_before = stack.adapter_updates() if learning and stack else 0
            step_started = time.monotonic()
            with console.status(f"{rate:g} sessions/s for {ns.step_seconds:g} s..."):
                result = asyncio.run(LoadGenerator(config).run())
            updates_per_s = (
                (stack.adapter_updates() - updates_before) / (time.monotonic() - step_started)
                if learning and stack
                else None
            )
            s = report.summarize(result)
            p99 = s["latency_ms"]["p99"]
            ok = s["error_rate"] == 0 and p99 is not None and p99 < ns.p99_ms
            rows.append(
                {
                    "offered_per_s": rate,
                    "completed_per_s": s["requests_per_s"],
                    "tokens_per_s": s["tokens_per_s"],
                    "latency_ms": s["latency_ms"],
                    "ttft_ms": s["ttft_ms"],
                    "error_rate": s["error_rate"],
                    "errors_by_code": s["errors_by_code"],
                    "share_with_adapter": s["adapter_versions"]["share_with_adapter"],
                    "learner_updates_per_s": updates_per_s,
                    "sustainable": ok,
                }
            )
            console.print(
                f"  {rate:g}/s: completed {s['requests_per_s']:.2f}/s, p50 "
                f"{s['latency_ms']['p50'] or 0:,.0f} ms, p99 {p99 or 0:,.0f} ms, errors "
                f"{s['error_rate']:.1%}"
                + ("" if updates_per_s is None else f", learner {updates_per_s:.1f} updates/s")
                + f" -> {'ok' if ok else 'NOT sustainable'}"
            )
            failures = 0 if ok else failures + 1
            if failures >= 2:  # two failing steps in a row: beyond capacity
                break
            time.sleep(ns.pause)  # let the queue drain between steps
    finally:
        if stack is not None:
            stack.close()
    good = [r["offered_per_s"] for r in rows if r["sustainable"]]
    t = Table(
        title=f"capacity ({ns.engine} engine, {'with' if ns.learner else 'no'} learner): open "
        f"loop, max_tokens {fields['max_tokens']}, {fields['users']} users,"
        f" {ns.step_seconds:g} s per step, bound p99 < {ns.p99_ms:,.0f} ms, {os.cpu_count()} CPUs"
    )
    for col in (
        "offered/s",
        "completed/s",
        "tokens/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "TTFT p50 ms",
        "errors",
        "learner updates/s",
        "sustainable",
    ):
        t.add_column(col, justify="right")
    for r in rows:
        lat, ttft = r["latency_ms"], r["ttft_ms"]
        t.add_row(
            f"{r['offered_per_s']:g}",
            f"{r['completed_per_s']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            *(f"{lat[k] or 0:,.0f}" for k in ("p50", "p95", "p99")),
            f"{ttft['p50'] or 0:,.0f}",
            f"{r['error_rate']:.1%}",
            "-" if r["learner_updates_per_s"] is None else f"{r['learner_updates_per_s']:.1f}",
            "yes" if r["sustainable"] else "no",
        )
    console.print(t)
    best = max(good, default=0.0)
    console.print(f"max sustainable: {best:g} sessions/s at p99 < {ns.p99_ms:,.0f} ms")
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / f"{ns.name}.json").write_text(
        json.dumps(
            {"steps": rows, "max_sustainable_per_s": best, "args": vars(ns)}, indent=2, default=str
        )
    )
    console.print(f"wrote {ns.out / (ns.name + '.json')}")
    return 0


# --- profile ---------------------------------------------------------------------------------
def cmd_profile(ns: argparse.Namespace) -> int:
    from loadtests import profile, report
    from loadtests.config import LoadConfig
    from loadtests.generator import run_load
    from loadtests.stack import Stack

    profile.py_spy()
    out = ns.out / "profile"
    with console.status("starting Kafka, server and learner..."):
        stack = Stack(out / "stack", **_stack_options(ns)).start()
    try:
        assert stack.server is not None
        fields = _load_fields(ns, {**STACK_DEFAULTS, "duration": 40.0, "rate": 10.0})
        config = LoadConfig(target=stack.target, **fields)
        raw = out / "server.pyspy.txt"
        warmup = 3.0  # sample the steady part, not the first requests
        recorder = profile.start_recording(
            stack.server.proc.pid, (config.duration or 30) - warmup, raw
        )
        with console.status(f"load + py-spy for {config.duration:g} s..."):
            result = run_load(config)
        recorder.wait(60)
    finally:
        stack.close()
    summary = report.write(result, out, "profile-load", console=console)
    shares = profile.summarize(raw)
    n = shares["samples"]
    t = Table(title=f"server process, py-spy: share of busy samples ({n['busy']:.0f} busy,"
                    f" {n['waiting']:.0f} waiting)")  # fmt: skip
    t.add_column("where")
    t.add_column("share", justify="right")
    for key in ("by_category", "by_thread"):
        for name, share in shares[key].items():
            t.add_row(name, f"{share:.1%}")
        t.add_section()
    console.print(t)
    (out / "profile.json").write_text(
        json.dumps({"shares": shares, "load": summary}, indent=2, default=str)
    )
    console.print(f"wrote {out / 'profile.json'} and {raw}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from loadtests.scenarios import scenario_names

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="drive a running server (loopback only)")
    p.add_argument("--target", required=True, help="HOST:PORT of a loraloop server")
    p.add_argument("--name", default="run", help="file names: NAME.json, NAME.png")
    _load_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("stack", help="start Kafka + server + learner, run a scenario, stop")
    p.add_argument("--scenario", default="steady", choices=[*scenario_names(), "all"])
    g = p.add_argument_group("scenario knobs")
    g.add_argument("--burst-factor", type=float, default=4.0, help="burst: rate multiplier")
    g.add_argument("--cold-users", type=int, default=48, help="cold-users: users")
    g.add_argument("--cold-slots", type=int, default=4, help="cold-users: adapter slots")
    g.add_argument("--learner-down", type=float, default=2.0, help="learner-restart: s down")
    g.add_argument("--outage-seconds", type=float, default=15.0, help="kafka-outage: s down")
    _load_args(p)
    _stack_args(p)
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("compare", help="ghz and this generator on the same server and RPC")
    p.add_argument("--target", help="a running server; default: start Kafka + server")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds per tool")
    p.add_argument("--out", type=Path, default=Path("out/loadtests"))
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("capacity", help="step the open-loop rate up to find the capacity")
    p.add_argument("--target", help="a running server; default: start the stack")
    p.add_argument("--rates", default="2,5,10,15,20,25,30,40", help="comma-separated sessions/s")
    p.add_argument("--step-seconds", type=float, default=30.0)
    p.add_argument("--p99-ms", type=float, default=2000.0, help="latency bound of 'sustainable'")
    p.add_argument("--pause", type=float, default=3.0, help="seconds between steps")
    p.add_argument("--name", default="capacity")
    _load_args(p)
    _stack_args(p)
    p.set_defaults(func=cmd_capacity)

    p = sub.add_parser("profile", help="steady load while py-spy samples the server process")
    _load_args(p)
    _stack_args(p)
    p.set_defaults(func=cmd_profile)

    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except ValueError as exc:  # a bad option (e.g. a non-loopback target): say what to fix
        console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
