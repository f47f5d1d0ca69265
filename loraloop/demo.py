"""`loraloop demo`: Kafka + server + learner + simulated users, end to end on one machine.

Everything is real: a Kafka broker process, `loraloop serve` and `loraloop learn` as their
own processes, the gRPC API over loopback. Simulated users with a hidden taste in tone
ask questions and react; the learner turns their feedback into bandit statistics and new
versions of each user's LoRA adapter, which the server hot-swaps.

Every prompt is asked three times, so the comparison is on the very same prompts:
- personalized: the user's own bandit posterior and LoRA adapter (the user gives feedback);
- global: a twin id that never gives feedback, so it is served by the population's bandit
  statistics (what everyone's feedback taught) and the base weights;
- base: a twin pinned to the no-system-prompt arm: the base model as shipped.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from core.kafka.broker import KafkaBroker, ensure_loraloop_topics
from core.settings import Settings
from core.tiny_model import ensure_tiny_model
from loraloop.client import LoraLoopClient
from loraloop.demo_world import SimulatedUser, make_users, tone_of
from loraloop.processes import ROOT, Process

PROBE = "How do I cook pasta?"
DEMO_ARMS = ROOT / "configs" / "demo-arms.toml"
SERIES = ("base", "global", "personalized")
console = Console()


def _round(client: LoraLoopClient, user: SimulatedUser) -> dict[str, float]:
    """One interaction of a user, plus the same prompt for its global and base twins."""
    prompt = [("user", user.prompt())]
    reply = client.generate(user.user_id, messages=prompt, max_tokens=40, temperature=1.0)
    reward, signals = user.react(reply.text)
    client.feedback(reply.request_id, user.user_id, **signals)  # type: ignore[arg-type]
    glob = client.generate(f"global-{user.user_id}", messages=prompt, max_tokens=40)
    base = client.generate(f"base-{user.user_id}", messages=prompt, max_tokens=40, arm="default")
    return {"personalized": reward, "global": user.score(glob.text), "base": user.score(base.text)}


def _probe(client: LoraLoopClient, users: list[SimulatedUser]) -> dict[str, str]:
    return {
        u.user_id: client.generate(
            u.user_id, messages=[("user", PROBE)], max_tokens=40, temperature=0
        ).text.strip()
        for u in users
    }


def _smooth(series: list[float], window: int) -> list[float]:
    return [statistics.mean(series[max(0, i - window + 1) : i + 1]) for i in range(len(series))]


def _plot(
    rewards: dict[str, dict[str, list[float]]], users: list[SimulatedUser], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    window = 10
    for user in users:
        series = _smooth(rewards["personalized"][user.user_id], window)
        ax.plot(
            range(1, len(series) + 1),
            series,
            alpha=0.3,
            linewidth=1,
            label=f"{user.user_id} (likes {user.likes})",
        )
    styles = {"personalized": ("black", "-"), "global": ("tab:blue", "-."), "base": ("grey", "--")}
    for name in reversed(SERIES):
        per_user = rewards[name]
        rounds = len(next(iter(per_user.values())))
        mean = [statistics.mean(per_user[u.user_id][i] for u in users) for i in range(rounds)]
        color, style = styles[name]
        ax.plot(
            range(1, rounds + 1),
            _smooth(mean, window),
            color=color,
            linestyle=style,
            linewidth=2.5,
            label=f"{name}, mean of users",
        )
    ax.set_xlabel("interaction")
    ax.set_ylabel(f"reward (moving mean of {window})")
    ax.set_ylim(0, 1.05)
    ax.set_title("Per-user bandit + LoRA learning each user's taste online")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(
    users: int = 6,
    rounds: int = 150,
    out_dir: str = "out/demo",
    learning_rate: float = 2e-3,
    arms_file: Path | None = DEMO_ARMS,
) -> int:
    """The README's demo: returns 0 when every simulated user got a learnt adapter."""
    code, _ = run_world(
        users, rounds, Path(out_dir), {"learning_rate": learning_rate, "arms_file": arms_file}
    )
    return code


Rewards = dict[str, dict[str, list[float]]]  # series -> user -> reward per interaction


def run_world(
    users: int, rounds: int, out: Path, overrides: dict[str, object]
) -> tuple[int, Rewards]:
    """Kafka, server, learner and simulated users with these settings; the rewards."""
    shutil.rmtree(out / "adapters", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]loraloop demo")
    with console.status("building the tiny local model (once, cached)..."):
        model = ensure_tiny_model(progress=False)
    console.print(f"model: {model}")
    started = time.monotonic()
    os.environ.setdefault("LORALOOP_LOG_LEVEL", "INFO")  # the children's logs are the story
    with KafkaBroker(data_dir=Path(tempfile.mkdtemp(prefix="loraloop-kafka-"))) as broker:
        with console.status("starting Kafka..."):
            bootstrap = broker.start(timeout=120)
        settings = Settings(
            kafka_bootstrap=bootstrap, port=0, adapter_store=out / "adapters", **overrides
        )
        ensure_loraloop_topics(settings)
        console.print(f"Kafka broker (KRaft) at {bootstrap}")
        with console.status("starting server and learner..."):
            server = Process(
                ["serve"], settings, r"listening on [\d.]+:(\d+)", log=out / "server.log"
            )
            learner = Process(["learn"], settings, r"learner consuming", log=out / "learner.log")
        assert server.match is not None
        target = f"127.0.0.1:{server.match.group(1)}"
        console.print(f"server at {target}, learner consuming; logs in {out}/")
        try:
            code, rewards = _run_users(target, make_users(users), rounds, out, [server, learner])
        finally:
            learner.stop()
            server.stop()
    console.print(f"finished in {time.monotonic() - started:.0f} s")
    return code, rewards


def _run_users(
    target: str, people: list[SimulatedUser], rounds: int, out: Path, procs: list[Process]
) -> tuple[int, Rewards]:
    rewards = {name: {u.user_id: [] for u in people} for name in SERIES}
    with LoraLoopClient(target, timeout=120) as client:
        client.wait_ready()
        before = _probe(client, people)
        with Progress(console=console) as progress, ThreadPoolExecutor(len(people)) as pool:
            task = progress.add_task("simulated users interacting", total=rounds * len(people))
            for _ in range(rounds):
                for proc in procs:
                    if proc.proc.poll() is not None:
                        console.print(f"[red]`loraloop {proc.name}` exited:[/red]\n{proc.output}")
                        return 1, rewards
                results = pool.map(lambda u: _round(client, u), people)
                for user, result in zip(people, results, strict=True):
                    for name in SERIES:
                        rewards[name][user.user_id].append(result[name])
                    progress.advance(task)
        time.sleep(1.0)  # let the learner publish the last updates
        after = _probe(client, people)
        states = {u.user_id: client.user_state(u.user_id) for u in people}

    tail = max(1, rounds // 4)
    table = Table(title=f"Reward (share of replies in the liked tone), last {tail} per user")
    for col in ("user", "likes", "adapter", "favourite arm", *SERIES):
        table.add_column(col)
    for u in people:
        arms = states[u.user_id].arms
        favourite = max(arms, key=lambda a: a[1])[0] if arms else "-"
        table.add_row(
            u.user_id,
            u.likes,
            f"v{states[u.user_id].adapter_version}",
            favourite,
            *(f"{statistics.mean(rewards[n][u.user_id][-tail:]):.2f}" for n in SERIES),
        )
    means = {n: statistics.mean(r for s in rewards[n].values() for r in s[-tail:]) for n in SERIES}
    table.add_row("all", "", "", "", *(f"{means[n]:.2f}" for n in SERIES), style="bold")
    console.print(table)
    console.print(f"greedy reply to {PROBE!r}, before -> after:")
    for u in people:
        b, a = before[u.user_id], after[u.user_id]
        console.print(f"  {u.user_id} (likes {u.likes})", highlight=False)
        console.print(f"    before [{tone_of(b)}] {b}", highlight=False, markup=False)
        console.print(f"    after  [{tone_of(a)}] {a}", highlight=False, markup=False)
    plot = out / "reward.png"
    _plot(rewards, people, plot)
    console.print(
        f"personalized {means['personalized']:.2f} vs global {means['global']:.2f} vs base "
        f"{means['base']:.2f}; plot: {plot}"
    )
    versions = [states[u.user_id].adapter_version for u in people]
    return (0 if all(v > 0 for v in versions) else 1), rewards
