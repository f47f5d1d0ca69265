"""`loraloop demo`: Kafka + server + learner + simulated users, end to end on one machine.

Everything is real: a Kafka broker process, `loraloop serve` and `loraloop learn` as their
own processes, the gRPC API over loopback. Simulated users (`loraloop.demo_world`) with a
hidden taste in reply style ask questions and react; the learner turns their feedback into
bandit statistics and new versions of each user's LoRA adapter, which the server hot-swaps.

Every prompt is also asked by twin ids that never give feedback, so all series are
measured on the very same prompts:
- personalized: the user's own bandit posterior and LoRA adapter (the user gives feedback);
- global: served by the population's bandit statistics (what everyone's feedback taught)
  and the base weights: one policy for all;
- base: pinned to the no-system-prompt arm: the base model as shipped;
- arm (eval): the arm the personalized reply got, with the base weights: the bandit alone,
  so personalized - arm is what the user's LoRA adds;
- oracle (eval): the system prompt that asks for exactly the user's taste.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from loraloop.client import LoraLoopClient, Reply
from loraloop.configs import DEMO_ARMS
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.settings import Settings
from loraloop.demo_world import SimulatedUser, describe, make_users, style_of
from loraloop.devtools.kafka_broker import KafkaBroker
from loraloop.devtools.tiny_model import ensure_tiny_model
from loraloop.processes import Process

PROBE = "How do I cook pasta?"
SERIES = ("base", "global", "personalized", "oracle")
ALL_SERIES = ("base", "global", "arm", "personalized", "oracle")
MAX_TOKENS = 64  # the longest corpus replies are about 55 tokens
TEMPERATURE = 1.0  # the same for every series: sampling, as in production
# Wide enough for the table when the output is not a terminal (rich then assumes 80).
console = Console(width=None if sys.stdout.isatty() else 120)

Rewards = dict[str, dict[str, list[float]]]  # series -> user -> reward per interaction


def _round(
    client: LoraLoopClient,
    user: SimulatedUser,
    series: tuple[str, ...],
    twins: ThreadPoolExecutor,
    log: IO[str] | None,
) -> dict[str, float]:
    """One interaction of a user, plus the same prompt for the twins of `series`."""
    uid, msgs = user.user_id, [("user", user.prompt())]

    def ask(who: str, arm: str | None = None, system: str | None = None) -> Reply:
        messages = [("system", system), *msgs] if system else msgs
        return client.generate(
            who, messages=messages, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, arm=arm
        )

    pending = {}  # twins that do not depend on the personalized reply run beside it
    if "global" in series:
        pending["global"] = twins.submit(ask, f"global-{uid}")
    if "base" in series:
        pending["base"] = twins.submit(ask, f"base-{uid}", "default")
    if "oracle" in series:
        pending["oracle"] = twins.submit(ask, f"oracle-{uid}", "default", user.oracle_prompt)
    reply = ask(uid)
    reward, signals = user.react(reply.text)
    client.feedback(reply.request_id, uid, **signals)  # type: ignore[arg-type]
    replies = {"personalized": reply}
    if "arm" in series:
        replies["arm"] = ask(f"arm-{uid}", reply.arm)
    replies |= {name: future.result() for name, future in pending.items()}
    if log is not None:
        for name, r in replies.items():
            log.write(json.dumps({"user": uid, "series": name, "arm": r.arm, "text": r.text}))
            log.write("\n")
    return {
        name: reward if name == "personalized" else user.score(r.text)
        for name, r in replies.items()
    }


def _probe(client: LoraLoopClient, users: list[SimulatedUser]) -> dict[str, str]:
    """Each user's reply to the same question, sampled with a fixed seed (greedy decoding
    of a tiny model repeats itself, which is not what users see)."""
    return {
        u.user_id: client.generate(
            u.user_id, messages=[("user", PROBE)], max_tokens=MAX_TOKENS, seed=7
        ).text.strip()
        for u in users
    }


def smooth(series: list[float], window: int) -> list[float]:
    """Trailing moving mean."""
    return [statistics.mean(series[max(0, i - window + 1) : i + 1]) for i in range(len(series))]


def mean_curve(per_user: dict[str, list[float]], users: list[SimulatedUser]) -> list[float]:
    """Mean over `users` of their reward at each interaction."""
    rounds = min(len(per_user[u.user_id]) for u in users)
    return [statistics.mean(per_user[u.user_id][i] for u in users) for i in range(rounds)]


_STYLES = {
    "oracle": ("tab:green", ":"),
    "personalized": ("black", "-"),
    "arm": ("tab:orange", "-"),
    "global": ("tab:blue", "-."),
    "base": ("grey", "--"),
}
_NAMES = {
    "oracle": "oracle (asks for the taste)",
    "personalized": "personalized (bandit + LoRA)",
    "arm": "bandit arm only",
    "global": "global policy",
    "base": "base model",
}


def plot_rewards(
    rewards: Rewards, users: list[SimulatedUser], path: Path, window: int = 10
) -> None:
    """Two panels (shared / idiosyncratic tastes), one smoothed mean curve per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [
        ("tastes an arm expresses", [u for u in users if u.shared]),
        ("idiosyncratic tastes (no arm expresses them)", [u for u in users if not u.shared]),
    ]
    groups = [(title, members) for title, members in groups if members]
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for ax, (title, members) in zip(axes[0], groups, strict=True):
        for name in _STYLES:
            if name not in rewards:
                continue
            curve = smooth(mean_curve(rewards[name], members), window)
            color, style = _STYLES[name]
            ax.plot(
                range(1, len(curve) + 1),
                curve,
                color=color,
                linestyle=style,
                linewidth=2,
                label=_NAMES[name],
            )
        ax.set_title(f"{title}: {', '.join(u.likes for u in members)}", fontsize=9)
        ax.set_xlabel("interaction")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"reward (mean of users, moving mean of {window})")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(
    users: int = 6,
    rounds: int = 100,
    out_dir: str = "out/demo",
    learning_rate: float | None = None,
    arms_file: Path | None = DEMO_ARMS,
) -> int:
    """The README's demo: returns 0 when every simulated user got a learnt adapter."""
    overrides: dict[str, Any] = {"arms_file": arms_file}
    if learning_rate is not None:
        overrides["learning_rate"] = learning_rate
    code, _ = run_world(users, rounds, Path(out_dir), overrides)
    return code


def run_world(
    users: int,
    rounds: int,
    out: Path,
    overrides: dict[str, Any],
    series: tuple[str, ...] = SERIES,
    seed: int = 0,
    bootstrap: str | None = None,
    quiet: bool = False,
    tastes: str = "demo",
    signals: str = "demo",
) -> tuple[int, Rewards]:
    """Kafka, server, learner and simulated users with these settings; the rewards.

    `bootstrap` uses that Kafka broker instead of starting one (the caller then isolates
    topics and consumer group in `overrides`). `tastes` and `signals` choose the users'
    world (loraloop.demo_world.make_users).
    """
    shutil.rmtree(out / "adapters", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if not quiet:
        console.rule("[bold]loraloop demo")
    with console.status("building the tiny local model (once, cached; a few minutes)..."):
        model = ensure_tiny_model(progress=False)
    if not quiet:
        console.print(f"model: {model}")
    started = time.monotonic()
    people = make_users(users, seed, tastes, signals)
    with ExitStack() as stack:
        if bootstrap is None:
            broker = KafkaBroker(data_dir=Path(tempfile.mkdtemp(prefix="loraloop-kafka-")))
            stack.callback(broker.stop)
            with console.status("starting Kafka..."):
                bootstrap = broker.start(timeout=120)
        values: dict[str, Any] = {"seed": seed, **overrides}
        if "LORALOOP_LOG_LEVEL" not in os.environ:
            values["log_level"] = "INFO"  # the children's logs are the story
        settings = Settings(
            model=str(model),
            drain_seconds=0.0,  # no load balancer to drain from: stop at once
            kafka_bootstrap=bootstrap,
            port=0,
            adapter_store=out / "adapters",
            **values,
        )
        ensure_loraloop_topics(settings)
        if not quiet:
            console.print(f"Kafka broker (KRaft) at {bootstrap}")
        with console.status("starting server and learner..."):
            server = Process(
                ["serve"], settings, r"listening on [\d.]+:(\d+)", log=out / "server.log"
            )
            try:
                learner = Process(
                    ["learn"], settings, r"learner consuming", log=out / "learner.log"
                )
            except BaseException:
                server.stop()
                raise
        assert server.match is not None
        target = f"127.0.0.1:{server.match.group(1)}"
        if not quiet:
            console.print(f"server at {target}, learner consuming; logs in {out}/")
        try:
            code, rewards = _run_users(
                target, people, rounds, out, [server, learner], series, quiet
            )
        finally:
            learner.stop()
            server.stop()
    if not quiet:
        console.print(f"finished in {time.monotonic() - started:.0f} s")
    return code, rewards


def _run_users(
    target: str,
    people: list[SimulatedUser],
    rounds: int,
    out: Path,
    procs: list[Process],
    series: tuple[str, ...],
    quiet: bool,
) -> tuple[int, Rewards]:
    rewards: Rewards = {name: {u.user_id: [] for u in people} for name in series}
    twins_per_user = len(set(series) - {"personalized", "arm"})
    with (
        LoraLoopClient(target, timeout=120) as client,
        (out / "replies.jsonl").open("w") as log,
    ):
        client.wait_ready()
        before = _probe(client, people)
        with (
            Progress(console=console, disable=quiet) as progress,
            ThreadPoolExecutor(len(people)) as pool,
            ThreadPoolExecutor(max(1, len(people) * twins_per_user)) as twins,
        ):
            task = progress.add_task("simulated users interacting", total=rounds * len(people))
            for _ in range(rounds):
                for proc in procs:
                    if proc.proc.poll() is not None:
                        console.print(f"[red]`loraloop {proc.name}` exited:[/red]\n{proc.output}")
                        return 1, rewards
                results = pool.map(lambda u: _round(client, u, series, twins, log), people)
                for user, result in zip(people, results, strict=True):
                    for name in series:
                        rewards[name][user.user_id].append(result[name])
                recent = {
                    n: statistics.mean(r for s in rewards[n].values() for r in s[-10:])
                    for n in series
                }
                progress.update(
                    task,
                    advance=len(people),
                    description="reward, last 10: "
                    + " · ".join(f"{n} {recent[n]:.2f}" for n in series),
                )
        time.sleep(1.0)  # let the learner publish the last updates
        after = _probe(client, people)
        states = {u.user_id: client.user_state(u.user_id) for u in people}
    (out / "rewards.json").write_text(
        json.dumps({"users": {u.user_id: u.taste for u in people}, "rewards": rewards})
    )
    versions = [states[u.user_id].adapter_version for u in people]
    code = 0 if all(v > 0 for v in versions) else 1
    if quiet:
        return code, rewards

    tail = max(1, rounds // 4)
    table = Table(
        title=f"Reward per user (share of the liked attributes), last {tail} interactions"
    )
    for col in ("user", "likes", "an arm fits", "adapter", "top arm", *series):
        table.add_column(col)
    for u in people:
        arms = states[u.user_id].arms
        favourite = max(arms, key=lambda a: a[1])[0] if arms else "-"
        table.add_row(
            u.user_id,
            u.likes,
            "yes" if u.shared else "no",
            f"v{states[u.user_id].adapter_version}",
            favourite,
            *(f"{statistics.mean(rewards[n][u.user_id][-tail:]):.2f}" for n in series),
        )
    means = {n: statistics.mean(r for s in rewards[n].values() for r in s[-tail:]) for n in series}
    table.add_row("all", "", "", "", "", *(f"{means[n]:.2f}" for n in series), style="bold")
    console.print(table)
    console.print(f"a reply to {PROBE!r} (sampled, seed 7), before -> after:")
    for u in people:
        b, a = before[u.user_id], after[u.user_id]
        console.print(f"  {u.user_id} (likes {u.likes})", highlight=False)
        for when, text in (("before", b), ("after ", a)):
            label = describe(style_of(text))
            console.print(f"    {when} [{label}] {text!r}", highlight=False, markup=False)
    plot = out / "reward.png"
    try:
        plot_rewards(rewards, people, plot)
        where = f"plot: {plot}"
    except ImportError:  # matplotlib is the `demo` extra, not a dependency of the service
        where = "no plot: pip install 'loraloop\\[demo]' for matplotlib"  # \[: not rich markup
    console.print("  ".join(f"{n} {means[n]:.2f}" for n in series) + f"   (last {tail}); {where}")
    return code, rewards
