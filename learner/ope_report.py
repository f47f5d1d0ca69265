"""`loraloop ope`: off-policy estimates of candidate arm policies from the logged events.

Reads the interactions and feedback topics from their beginning, joins them by
request_id, turns feedback into rewards with the learner's reward function, and prints
IPS / SNIPS / DR estimates (95 % intervals) for: each arm played always, uniform random,
and a greedy linear policy fitted on the first half of the logs (evaluated on the second).
"""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from loraloop.core.bandits.arms import load_arms
from loraloop.core.bandits.context_schema import load_context_schema, recorded_schema
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.kafka.replay import read_to_end
from loraloop.core.settings import Settings
from loraloop.learner import ope
from loraloop.learner.joiner import Joiner
from loraloop.learner.rewards import reward, reward_config


def read_logs(settings: Settings, timeout_s: float = 30.0) -> tuple[ope.Logs, list[str]]:
    """Joined (context, arm, propensity, reward) rows from Kafka, oldest first: those
    whose context was logged under the context schema of `settings` (context_schema_file;
    the estimates are of policies over that schema's vectors)."""
    arms = [a.name for a in load_arms(settings.arms_file)]
    schema = load_context_schema(settings.context_schema_file)
    joiner = Joiner(wait_seconds=1e9)  # offline: every feedback may still come
    rows: list[tuple[int, list[float], int, float, float]] = []
    cfg = reward_config(settings.reward_weights)
    topics = [settings.topic_interactions, settings.topic_feedback]
    for rec in read_to_end(settings.kafka_bootstrap, topics, timeout_s):
        pos = (rec.topic, rec.partition, rec.offset)
        try:
            if rec.topic == settings.topic_interactions:
                sample = joiner.add_interaction(events_pb2.Interaction.FromString(rec.value), pos)
            else:
                sample = joiner.add_feedback(events_pb2.FeedbackEvent.FromString(rec.value), pos)
        except Exception:  # malformed: the learner skips these too
            continue
        if sample is None or sample.feedback is None:
            continue
        it = sample.interaction
        if it.arm not in arms or it.arm_propensity <= 0:
            continue
        if recorded_schema(it.context_schema) != schema.fingerprint:
            continue
        if len(it.context) != schema.dim:
            continue
        rows.append(
            (
                it.timestamp_ms,
                list(it.context),
                arms.index(it.arm),
                it.arm_propensity,
                reward(sample.feedback.signals, cfg),
            )
        )
    rows.sort(key=lambda row: row[0])
    logs = ope.Logs(
        contexts=np.array([r[1] for r in rows]).reshape(-1, schema.dim),
        actions=np.array([r[2] for r in rows], dtype=int),
        propensities=np.array([r[3] for r in rows]),
        rewards=np.array([r[4] for r in rows]),
    )
    return logs, arms


def _split(logs: ope.Logs, start: int, stop: int | None) -> ope.Logs:
    part = slice(start, stop)
    return ope.Logs(
        logs.contexts[part], logs.actions[part], logs.propensities[part], logs.rewards[part]
    )


def run_ope(settings: Settings) -> int:
    console = Console()
    logs, arms = read_logs(settings)
    n = len(logs.actions)
    if n < 4:
        console.print(f"only {n} joined interactions with arm propensities: nothing to estimate")
        return 1
    k = len(arms)
    policies: dict[str, ope.Policy] = {
        f"always {a}": ope.fixed_arm(i, k) for i, a in enumerate(arms)
    }
    policies["uniform"] = ope.uniform(k)
    train, test = _split(logs, 0, n // 2), _split(logs, n // 2, None)
    results = ope.evaluate(logs, policies, k)
    results["greedy (fit on 1st half)"] = ope.evaluate(
        test, {"g": ope.greedy(ope.fit_reward_model(train, k))}, k
    )["g"]
    table = Table(
        title=f"Off-policy estimates from {n} logged interactions "
        f"(logged policy earned {logs.rewards.mean():.3f})"
    )
    for col in ("candidate policy", "IPS", "SNIPS", "DR"):
        table.add_column(col)
    for name, est in results.items():
        table.add_row(name, str(est["ips"]), str(est["snips"]), str(est["dr"]))
    console.print(table)
    return 0
