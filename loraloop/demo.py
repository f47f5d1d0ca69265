"""`loraloop demo`: Kafka + server + learner + simulated users, end to end on one machine.

Everything is real: a Kafka broker process, `loraloop serve` and `loraloop learn` as their
own processes, the gRPC API over loopback. Simulated users with a hidden taste in tone
ask questions and react; the learner turns their feedback into new versions of each
user's LoRA adapter, which the server hot-swaps. At the end: a table of what changed and
a plot of reward per interaction.
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
from loraloop.processes import Process

PROBE = "How do I cook pasta?"
console = Console()


def _round(client: LoraLoopClient, user: SimulatedUser) -> tuple[float, float]:
    """One interaction of a user, and the same prompt for the user's control twin.

    The twin is an id that never sends feedback, so it is always served by the base
    model: scoring its reply with the user's taste measures the base model's reward on the
    very same prompts, in the same run.
    """
    prompt = [("user", user.prompt())]
    reply = client.generate(user.user_id, messages=prompt, max_tokens=40, temperature=1.0)
    reward, signals = user.react(reply.text)
    client.feedback(reply.request_id, user.user_id, **signals)  # type: ignore[arg-type]
    control = client.generate(
        f"control-{user.user_id}", messages=prompt, max_tokens=40, temperature=1.0
    )
    return reward, user.score(control.text)


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
    rewards: dict[str, list[float]],
    control: dict[str, list[float]],
    users: list[SimulatedUser],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    window = 10
    for user in users:
        series = _smooth(rewards[user.user_id], window)
        ax.plot(
            range(1, len(series) + 1),
            series,
            alpha=0.45,
            linewidth=1,
            label=f"{user.user_id} (likes {user.likes})",
        )
    rounds = len(next(iter(rewards.values())))
    mean = [statistics.mean(rewards[u.user_id][i] for u in users) for i in range(rounds)]
    base = [statistics.mean(control[u.user_id][i] for u in users) for i in range(rounds)]
    ax.plot(
        range(1, rounds + 1),
        _smooth(mean, window),
        color="black",
        linewidth=2.5,
        label="personalized, mean of users",
    )
    ax.plot(
        range(1, rounds + 1),
        _smooth(base, window),
        color="grey",
        linewidth=2.5,
        linestyle="--",
        label="base model on the same prompts",
    )
    ax.set_xlabel("interaction")
    ax.set_ylabel(f"reward (moving mean of {window})")
    ax.set_ylim(0, 1.05)
    ax.set_title("Per-user LoRA adapters learning each user's taste online")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(
    users: int = 6, rounds: int = 150, out_dir: str = "out/demo", learning_rate: float = 2e-3
) -> int:
    out = Path(out_dir)
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
            kafka_bootstrap=bootstrap,
            port=0,
            adapter_store=out / "adapters",
            learning_rate=learning_rate,
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
            code = _run_users(target, make_users(users), rounds, out, [server, learner])
        finally:
            learner.stop()
            server.stop()
    console.print(f"finished in {time.monotonic() - started:.0f} s")
    return code


def _run_users(
    target: str, people: list[SimulatedUser], rounds: int, out: Path, procs: list[Process]
) -> int:
    rewards: dict[str, list[float]] = {u.user_id: [] for u in people}
    control: dict[str, list[float]] = {u.user_id: [] for u in people}
    with LoraLoopClient(target, timeout=120) as client:
        client.wait_ready()
        before = _probe(client, people)
        with Progress(console=console) as progress, ThreadPoolExecutor(len(people)) as pool:
            task = progress.add_task("simulated users interacting", total=rounds * len(people))
            for _ in range(rounds):
                for proc in procs:
                    if proc.proc.poll() is not None:
                        console.print(f"[red]`loraloop {proc.name}` exited:[/red]\n{proc.output}")
                        return 1
                for user, (reward, base) in zip(
                    people, pool.map(lambda u: _round(client, u), people), strict=True
                ):
                    rewards[user.user_id].append(reward)
                    control[user.user_id].append(base)
                    progress.advance(task)
        time.sleep(1.0)  # let the learner publish the last updates
        after = _probe(client, people)
        states = {u.user_id: client.user_state(u.user_id) for u in people}

    tail = max(1, rounds // 4)
    table = Table(title=f"Reward per user (share of replies in the liked tone), last {tail}")
    for col in ("user", "likes", "adapter version", "base model", "personalized"):
        table.add_column(col)
    for u in people:
        table.add_row(
            u.user_id,
            u.likes,
            str(states[u.user_id].adapter_version),
            f"{statistics.mean(control[u.user_id][-tail:]):.2f}",
            f"{statistics.mean(rewards[u.user_id][-tail:]):.2f}",
        )
    console.print(table)
    console.print(f"greedy reply to {PROBE!r}, adapter v0 -> now:")
    for u in people:
        b, a = before[u.user_id], after[u.user_id]
        console.print(f"  {u.user_id} (likes {u.likes})", highlight=False)
        console.print(f"    v0  [{tone_of(b)}] {b}", highlight=False, markup=False)
        console.print(f"    now [{tone_of(a)}] {a}", highlight=False, markup=False)
    base = statistics.mean(r for s in control.values() for r in s[-tail:])
    mine = statistics.mean(r for s in rewards.values() for r in s[-tail:])
    console.print(
        f"last {tail} interactions per user: base model {base:.2f}, personalized {mine:.2f}"
        f" ({mine / max(base, 1e-9):.1f}x)"
    )
    plot = out / "reward.png"
    _plot(rewards, control, people, plot)
    console.print(f"plot: {plot}")
    changed = sum(before[u.user_id] != after[u.user_id] for u in people)
    versions = [states[u.user_id].adapter_version for u in people]
    console.print(f"adapter versions {versions}; probe reply changed for {changed}/{len(people)}")
    return 0 if all(v > 0 for v in versions) else 1
