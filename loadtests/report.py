"""Figures of a load run: a summary dict (the JSON file), a rich table and a PNG plot."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loadtests.generator import RunResult

PERCENTILES = (50, 95, 99)


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99/max (and mean) in milliseconds; None when there are no values."""
    keys = [*(f"p{p}" for p in PERCENTILES), "max", "mean"]
    if not values:
        return dict.fromkeys(keys)
    arr = np.asarray(values) * 1000.0
    out = {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
    out["max"] = float(arr.max())
    out["mean"] = float(arr.mean())
    return out


def _window(result: RunResult, start: float, end: float) -> dict[str, Any]:
    """Availability and latency of the generations that started in [start, end)."""
    gens = [c for c in result.generations if start <= c.start < end]
    ok = [c for c in gens if c.code == "OK"]
    return {
        "from_s": round(start, 2),
        "to_s": round(end, 2),
        "sessions": len(gens),
        "ok": len(ok),
        "availability": len(ok) / len(gens) if gens else None,
        "latency_ms": percentiles([c.latency for c in ok]),
        "share_with_adapter": sum(c.version > 0 for c in ok) / len(ok) if ok else None,
        "max_version": max((c.version for c in ok), default=0),
    }


def reward_trend(result: RunResult, bins: int = 10) -> list[dict[str, float]]:
    """Mean true reward of the simulated users in `bins` equal slices of the run's time."""
    rewarded = [c for c in result.generations if c.reward is not None]
    if not rewarded:
        return []
    span = max(result.issue_seconds, 1e-9)
    trend = []
    for b in range(bins):
        lo, hi = span * b / bins, span * (b + 1) / bins
        chunk = [
            c.reward for c in rewarded if lo <= c.start < hi or (b == bins - 1 and c.start >= hi)
        ]
        if chunk:
            trend.append(
                {
                    "from_s": round(lo, 2),
                    "to_s": round(hi, 2),
                    "n": len(chunk),
                    "reward": statistics.mean(chunk),
                }
            )
    return trend


def summarize(result: RunResult, windows: dict[str, tuple[float, float]] | None = None) -> dict:
    """Everything the table, the JSON file and the comparisons need."""
    gens = result.generations
    ok = [c for c in gens if c.code == "OK"]
    feedback = [c for c in result.calls if c.kind == "feedback"]
    window = max(result.elapsed, 1e-9)
    errors = Counter(c.code for c in gens if c.code != "OK")
    fb_errors = Counter(c.code for c in feedback if c.code != "OK")
    versions = [c.version for c in ok]
    rewards = [c.reward for c in ok if c.reward is not None]
    quarter = max(1, len(rewards) // 4)
    users_with_adapter = {c.user_id for c in ok if c.version > 0}
    summary: dict[str, Any] = {
        "config": result.config.to_dict(),
        "elapsed_s": round(result.elapsed, 3),
        "issue_s": round(result.issue_seconds, 3),
        "sessions": len(gens),
        "completed": len(ok),
        "requests_per_s": len(ok) / window,
        "tokens_per_s": sum(c.tokens for c in ok) / window,
        "mean_completion_tokens": statistics.mean(c.tokens for c in ok) if ok else 0.0,
        "latency_ms": percentiles([c.latency for c in ok]),
        "ttft_ms": percentiles([c.ttft for c in ok if c.ttft is not None]),
        "streamed": sum(c.kind == "stream" for c in ok),
        "error_rate": (len(gens) - len(ok)) / len(gens) if gens else 0.0,
        "errors_by_code": dict(errors.most_common()),
        "feedback": {
            "sent": len(feedback),
            "ok": sum(c.code == "OK" for c in feedback),
            "errors_by_code": dict(fb_errors.most_common()),
            "latency_ms": percentiles([c.latency for c in feedback if c.code == "OK"]),
        },
        "adapter_versions": {
            "served_with_adapter": sum(v > 0 for v in versions),
            "share_with_adapter": sum(v > 0 for v in versions) / len(versions) if versions else 0,
            "max_version": max(versions, default=0),
            "distinct_user_versions": len({(c.user_id, c.version) for c in ok if c.version > 0}),
            "users_with_adapter": len(users_with_adapter),
            "users": result.config.users,
        },
        "reward": {
            "mean": statistics.mean(rewards) if rewards else None,
            "first_quarter": statistics.mean(rewards[:quarter]) if rewards else None,
            "last_quarter": statistics.mean(rewards[-quarter:]) if rewards else None,
            "trend": reward_trend(result),
        },
        "marks": [{"t_s": round(t, 2), "what": what} for t, what in result.marks],
        "actions": result.actions,
        "windows": {name: _window(result, *span) for name, span in (windows or {}).items()},
    }
    return summary


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def table(summary: dict, title: str) -> Table:
    """The run's headline figures as a rich table."""
    t = Table(title=title, show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    cfg = summary["config"]
    load = (
        f"open loop, {cfg['rate']:g} sessions/s"
        if cfg["mode"] == "open"
        else f"closed loop, {cfg['concurrency']} concurrent"
    )
    t.add_row("load", f"{load}, {cfg['users']} users, max_tokens {cfg['max_tokens']}")
    t.add_row("sessions / completed", f"{summary['sessions']} / {summary['completed']}")
    t.add_row("requests/s", f"{summary['requests_per_s']:.2f}")
    t.add_row("tokens/s", f"{summary['tokens_per_s']:.1f}")
    for name, key in (("latency", "latency_ms"), ("time to first token", "ttft_ms")):
        p = summary[key]
        t.add_row(
            f"{name} p50/p95/p99/max ms",
            " / ".join(_ms(p[k]) for k in ("p50", "p95", "p99", "max")),
        )
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors_by_code"].items()) or "none"
    t.add_row("error rate", f"{summary['error_rate']:.1%} ({errors})")
    fb = summary["feedback"]
    fb_err = ", ".join(f"{k} {v}" for k, v in fb["errors_by_code"].items()) or "none"
    t.add_row("feedback ok / sent", f"{fb['ok']} / {fb['sent']} (errors: {fb_err})")
    av = summary["adapter_versions"]
    t.add_row(
        "adapter versions served",
        f"{av['share_with_adapter']:.0%} of replies; {av['users_with_adapter']}/{av['users']}"
        f" users; max v{av['max_version']}; {av['distinct_user_versions']} user-versions",
    )
    r = summary["reward"]
    if r["mean"] is not None:
        t.add_row(
            "reward first → last quarter",
            f"{r['first_quarter']:.2f} → {r['last_quarter']:.2f} (mean {r['mean']:.2f})",
        )
    for name, w in summary["windows"].items():
        avail = "-" if w["availability"] is None else f"{w['availability']:.0%}"
        t.add_row(
            f"{name}: {w['from_s']:.0f}-{w['to_s']:.0f} s",
            f"{w['ok']}/{w['sessions']} ok ({avail}), p99 {_ms(w['latency_ms']['p99'])} ms,"
            f" newest adapter v{w['max_version']}",
        )
    for name, info in summary["actions"].items():
        t.add_row(f"action {name}", escape(", ".join(f"{k}={v}" for k, v in info.items())))
    return t


def plot(result: RunResult, path: Path, title: str) -> None:
    """Throughput and latency over time, and the users' reward and adapter versions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in result.generations if c.code == "OK"]
    span = max(result.elapsed, 1.0)
    width = max(1.0, span / 60)  # about 60 bins
    edges = np.arange(0.0, span + width, width)
    mids = edges[:-1] + width / 2
    ends = np.array([c.end for c in ok])
    starts = np.array([c.start for c in result.generations])
    fails = np.array([c.start for c in result.generations if c.code != "OK"])
    done_rate = np.histogram(ends, edges)[0] / width if len(ends) else np.zeros(len(mids))
    fail_rate = np.histogram(fails, edges)[0] / width if len(fails) else np.zeros(len(mids))
    offered = np.histogram(starts, edges)[0] / width if len(starts) else np.zeros(len(mids))

    def per_bin(values: list[tuple[float, float]], q: float | None) -> list[float]:
        out = []
        for lo, hi in itertools.pairwise(edges):
            chunk = [v for t, v in values if lo <= t < hi]
            if not chunk:
                out.append(float("nan"))
            else:
                out.append(float(np.percentile(chunk, q)) if q else statistics.mean(chunk))
        return out

    lat = [(c.end, c.latency * 1000) for c in ok]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    ax = axes[0]
    ax.plot(mids, offered, color="grey", linestyle="--", label="sessions started/s")
    ax.plot(mids, done_rate, color="tab:blue", label="completed/s")
    ax.plot(mids, fail_rate, color="tab:red", label="failed/s")
    ax.set_ylabel("requests/s")
    ax.legend(fontsize=8, loc="upper right")
    ax = axes[1]
    for q, color in ((50, "tab:green"), (99, "tab:orange")):
        ax.plot(mids, per_bin(lat, q), color=color, label=f"p{q} latency")
    ttft = [(c.end, c.ttft * 1000) for c in ok if c.ttft is not None]
    if ttft:
        ax.plot(mids, per_bin(ttft, 50), color="tab:purple", label="p50 time to first token")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8, loc="upper right")
    ax = axes[2]
    rewarded = sorted((c.end, c.reward) for c in ok if c.reward is not None)
    if rewarded:
        k = max(5, len(rewarded) // 20)
        xs = [t for t, _ in rewarded]
        rs = [r for _, r in rewarded]
        smooth = [statistics.mean(rs[max(0, i - k + 1) : i + 1]) for i in range(len(rs))]
        ax.plot(xs, smooth, color="black", label=f"user reward (moving mean of {k})")
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("reward")
    ax.set_xlabel("seconds")
    twin = ax.twinx()
    twin.plot(mids, per_bin([(c.end, float(c.version)) for c in ok], None), color="tab:cyan")
    twin.set_ylabel("mean adapter version served", color="tab:cyan")
    ax.legend(fontsize=8, loc="upper left")
    for t, what in result.marks:
        for a in axes:
            a.axvline(t, color="red", alpha=0.3, linewidth=1)
        axes[0].annotate(what, (t, 0), rotation=90, fontsize=7, color="red", va="bottom")
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(
    result: RunResult,
    out_dir: Path,
    name: str,
    windows: dict[str, tuple[float, float]] | None = None,
    console: Console | None = None,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Summarize, print the table, write `<name>.json` and `<name>.png` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(result, windows)
    summary["scenario"] = name
    summary.update(extra or {})
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2, default=str))
    plot(result, out_dir / f"{name}.png", f"loadtests: {name}")
    if console is not None:
        console.print(table(summary, f"{name} ({result.config.target})"))
        for key, value in (extra or {}).items():
            if key != "stack":
                console.print(f"{key}: {json.dumps(value, default=str)}", markup=False)
        console.print(f"wrote {out_dir / (name + '.json')} and {out_dir / (name + '.png')}")
    return summary
