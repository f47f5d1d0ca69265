"""Interactions to 80 % of the oracle: thumbs alone vs thumbs + regenerate/edit pairs.

Simulated users of the demo world (`loraloop.demo_world`: a hidden taste in reply style,
judged from the text alone) talk to the real stack (a Kafka broker, `loraloop serve` and
`loraloop learn` as processes, the gRPC client), with no bandit arms, so only each user's
LoRA adapter can learn their taste. Every setup has the same users and reactions
(`SimulatedUser.react`); what the app reports differs:

- thumbs only: the thumbs alone (REINFORCE), as from an app with no other control;
- + regenerate/edit, rewards: the app has a regenerate button and an edit box: the user
  asks again when they would regenerate (GenerateRequest.regenerates, at most
  MAX_REGENERATES times per question) and, when they would edit, sends their own reply in
  their taste (FeedbackSignals.edited_text, written by the demo corpus's renderer), with
  `regenerated` / `edited` beside the thumbs; the learner uses them as rewards only
  (preference_learning='reward', today's learner);
- + regenerate/edit, DPO: the same, with preference_learning='both' (REINFORCE + DPO
  on the pairs); `--setups` also offers DPO alone ('preference').

The server is a `loraloop serve` process; the learner (`learner.loop.Learner`) runs in
this process and is stepped after every round until it has read every event of the
round, and the server has every version it wrote: the figures measure what is learnt per
interaction, not how fast the learner keeps up. The reward window is REWARD_WAIT_S, so a
regenerated reply that gets no feedback still pairs a few rounds later.

Every Generate of a user is an interaction (a regenerate counts as one). Each question
is also asked once by an oracle twin (the system prompt asking for exactly the taste, base
weights). Per seed: the first interaction at which the users' mean reward, as a centred
mean of 5, reaches 80 % of the oracle's mean (`loraloop.eval`'s rule); printed per seed
and as the median over seeds.

    python benchmarks/bench_preferences.py            # 6 users x 80 interactions, seeds 0 1 2
    python benchmarks/bench_preferences.py --quick    # 3 users x 30 interactions, seed 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from loraloop.client import LoraLoopClient, Reply
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.settings import Settings
from loraloop.demo import MAX_TOKENS, TEMPERATURE
from loraloop.demo_world import SimulatedUser, make_users
from loraloop.devtools.demo_corpus import render_reply, sample_prompt, sample_style
from loraloop.devtools.kafka_broker import KafkaBroker
from loraloop.devtools.tiny_model import ensure_tiny_model
from loraloop.eval import _to_80
from loraloop.learner.loop import Learner
from loraloop.processes import Process

MAX_REGENERATES = 2  # per question, as a user gives up asking again
REWARD_WAIT_S = 5.0
# setup -> (what the app reports: "thumbs" or "all", learner settings)
SETUPS: dict[str, tuple[str, dict[str, Any]]] = {
    "thumbs only": ("thumbs", {}),
    "+ regenerate/edit, rewards": ("all", {}),
    "+ regenerate/edit, DPO": ("all", {"preference_learning": "both"}),
    "+ regenerate/edit, DPO alone": ("all", {"preference_learning": "preference"}),
}
DEFAULT_SETUPS = list(SETUPS)[:3]


def question(
    client: LoraLoopClient, user: SimulatedUser, report: str, left: int, counts: Counts
) -> tuple[list[float], float]:
    """One question of a user: the true rewards of their interactions (at most `left`),
    and the oracle twin's reward on it."""
    topic, thing, prompt = sample_prompt(user.rng)
    msgs = [("user", prompt)]
    oracle = client.generate(
        f"oracle-{user.user_id}",
        messages=[("system", user.oracle_prompt), *msgs],
        max_tokens=MAX_TOKENS,
        temperature=TEMPERATURE,
    )
    counts.interactions += 1
    rewards: list[float] = []
    replaced: Reply | None = None
    while len(rewards) < left:
        reply = client.generate(
            user.user_id,
            messages=msgs,
            max_tokens=MAX_TOKENS,
            temperature=TEMPERATURE,
            regenerates=replaced.request_id if replaced else None,
        )
        counts.interactions += 1
        true, signals = user.react(reply.text)
        rewards.append(true)
        sent: dict[str, Any] = {k: signals[k] for k in ("thumbs",) if k in signals}
        if report != "thumbs":
            sent |= {k: signals[k] for k in ("regenerated", "edited") if k in signals}
        if report != "thumbs" and signals.get("edited"):
            edit = render_reply(user.rng, topic, thing, sample_style(user.rng, user.taste))
            sent["edited_text"] = edit
        if sent:
            counts.feedback += client.feedback(reply.request_id, user.user_id, **sent)
        again = report != "thumbs" and signals.get("regenerated")
        if not again or len(rewards) > MAX_REGENERATES:
            break
        replaced = reply
    return rewards, user.score(oracle.text)


class Counts:
    """Events the users' calls produced, per topic (the learner must read them all)."""

    def __init__(self) -> None:
        self.interactions = 0
        self.feedback = 0


def catch_up(learner: Learner, counts: Counts, timeout: float = 120) -> None:
    """Poll and process until the learner has read every event produced so far."""
    consumer = learner.consumer
    assert consumer is not None
    s = learner.settings
    deadline = time.monotonic() + timeout
    while True:
        polled = consumer.poll(timeout_ms=100)
        learner.process([r for batch in polled.values() for r in batch])
        read = {s.topic_interactions: 0, s.topic_feedback: 0}
        for tp in consumer.assignment():
            if tp.topic in read:
                read[tp.topic] += consumer.position(tp)
        if read[s.topic_interactions] >= counts.interactions and (
            read[s.topic_feedback] >= counts.feedback
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the learner read {read}, not all of {vars(counts)}")


def swapped(client: LoraLoopClient, learner: Learner, people: list[SimulatedUser]) -> None:
    """Wait until the server knows every user's newest version in the store."""
    deadline = time.monotonic() + 30
    for u in people:
        versions = learner.store.versions(u.user_id)
        newest = versions[-1] if versions else 0
        while client.user_state(u.user_id).adapter_version < newest:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not load {u.user_id} v{newest}")
            time.sleep(0.02)


def run(
    setup: str, users: int, interactions: int, seed: int, bootstrap: str, out: Path, model: str
) -> dict[str, Any]:
    """One setup, one seed, on the shared broker (topics and group of its own)."""
    report, overrides = SETUPS[setup]
    tag = uuid.uuid4().hex[:8]
    run_dir = out / f"{list(SETUPS).index(setup)}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        model=model,
        kafka_bootstrap=bootstrap,
        port=0,
        drain_seconds=0.0,
        seed=seed,
        adapter_store=run_dir / "adapters",
        topic_interactions=f"interactions-{tag}",
        topic_feedback=f"feedback-{tag}",
        topic_adapter_updates=f"adapter-updates-{tag}",
        topic_bandit_state=f"bandit-state-{tag}",
        topic_dead_letter=f"dead-letter-{tag}",
        group_id=f"bench-{tag}",
        reward_wait_seconds=REWARD_WAIT_S,
        **overrides,
    )
    ensure_loraloop_topics(settings)
    people = make_users(users, seed)
    server = Process(["serve"], settings, r"listening on [\d.]+:(\d+)", log=run_dir / "server.log")
    assert server.match is not None
    learner = Learner(settings, max_users_per_step=max(users, 1))
    counts = Counts()
    rewards: dict[str, list[float]] = {u.user_id: [] for u in people}
    oracle: dict[str, list[float]] = {u.user_id: [] for u in people}
    started = time.monotonic()
    try:
        with (
            LoraLoopClient(f"127.0.0.1:{server.match.group(1)}", timeout=120) as client,
            ThreadPoolExecutor(len(people)) as pool,
        ):
            client.wait_ready()
            learner.connect()

            def turn(u: SimulatedUser) -> None:
                left = interactions - len(rewards[u.user_id])
                if left > 0:
                    got, target = question(client, u, report, left, counts)
                    rewards[u.user_id] += got
                    oracle[u.user_id].append(target)

            while any(len(r) < interactions for r in rewards.values()):
                if server.proc.poll() is not None:
                    raise RuntimeError(f"`loraloop serve` exited:\n{server.output}")
                list(pool.map(turn, people))
                catch_up(learner, counts)
                swapped(client, learner, people)
    finally:
        learner.close()
        server.stop()
    units = [
        {"personalized": np.asarray(rewards[u.user_id]), "oracle": np.asarray(oracle[u.user_id])}
        for u in people
    ]
    result = {
        "setup": setup,
        "seed": seed,
        "to_80": _to_80(units),
        "oracle": float(np.mean([u["oracle"].mean() for u in units])),
        "last_10": float(np.mean([u["personalized"][-10:].mean() for u in units])),
        "seconds": time.monotonic() - started,
        "pairs": learner.stats["pairs"],
        "versions": learner.stats["versions"],
    }
    (run_dir / "result.json").write_text(json.dumps({**result, "rewards": rewards}))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--interactions", type=int, default=80)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=DEFAULT_SETUPS)
    parser.add_argument("--quick", action="store_true", help="3 users, 30 interactions, seed 0")
    parser.add_argument("--dpo-beta", type=float, help="dpo_beta of the DPO setups")
    parser.add_argument("--dpo-weight", type=float, help="dpo_weight of the DPO setups")
    parser.add_argument("--out", default="out/bench-preferences")
    ns = parser.parse_args()
    for _, overrides in SETUPS.values():
        if "preference_learning" in overrides:
            for key in ("dpo_beta", "dpo_weight"):
                if getattr(ns, key) is not None:
                    overrides[key] = getattr(ns, key)
    if ns.quick:
        ns.users, ns.interactions, ns.seeds = 3, 30, [0]
    out = Path(ns.out)
    model = str(ensure_tiny_model(progress=False))
    broker = KafkaBroker(data_dir=Path(tempfile.mkdtemp(prefix="loraloop-kafka-")))
    bootstrap = broker.start(timeout=120)
    results: list[dict[str, Any]] = []
    try:
        for seed in ns.seeds:
            for setup in ns.setups:
                r = run(setup, ns.users, ns.interactions, seed, bootstrap, out, model)
                results.append(r)
                print(
                    f"seed {seed} {setup:28s} to 80 %: {show(r['to_80'], ns.interactions)}"
                    f"  last 10: {r['last_10']:.2f} (oracle {r['oracle']:.2f}, "
                    f"{r['pairs']} pairs, {r['versions']} versions, {r['seconds']:.0f} s)",
                    flush=True,
                )
    finally:
        broker.stop()
    print(
        f"\ninteractions to 80 % of the oracle, {ns.users} users x {ns.interactions} "
        f"interactions, seeds {' '.join(map(str, ns.seeds))} (median; per seed):"
    )
    for setup in ns.setups:
        mine = [r for r in results if r["setup"] == setup]
        median = statistics.median(r["to_80"] for r in mine)
        per_seed = ", ".join(show(r["to_80"], ns.interactions) for r in mine)
        last = statistics.median(r["last_10"] / r["oracle"] for r in mine)
        print(
            f"  {setup:28s} {show(median, ns.interactions):>5s}   ({per_seed});"
            f" last 10 at {last:.0%} of the oracle"
        )
    (out / "summary.json").write_text(json.dumps(results, indent=2))


def show(value: float, interactions: int) -> str:
    return f">{interactions}" if value > interactions else f"{value:.0f}"


if __name__ == "__main__":
    main()
