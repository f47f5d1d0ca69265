"""Personalization measurably beats the base model, through the real stack.

Server and learner processes on the session Kafka broker, simulated users whose taste an
arm expresses (friendly, formal, short), feedback through the real Feedback API. On the
same prompts, the personalized reply's reward minus the base model's is tested with a
one-sided sign-flip test (fixed seed) over the second half of every user's interactions.
"""

from __future__ import annotations

import statistics
import uuid
from pathlib import Path

import pytest

from loraloop.demo import DEMO_ARMS, run_world
from loraloop.eval import sign_flip_p

pytestmark = pytest.mark.kafka

USERS = 3  # the shared tastes of loraloop.demo_world.TASTES
ROUNDS = 40  # enough that the second half holds 60 paired samples: p < 0.01 holds run to run


def test_personalized_beats_base_for_users_with_a_clear_taste(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    isolated = {
        "topic_interactions": f"interactions-{tag}",
        "topic_feedback": f"feedback-{tag}",
        "topic_adapter_updates": f"adapter-updates-{tag}",
        "topic_bandit_state": f"bandit-state-{tag}",
        "topic_partitions": 1,
        "group_id": f"learner-{tag}",
    }
    code, rewards = run_world(
        USERS,
        ROUNDS,
        tmp_path,
        {"arms_file": DEMO_ARMS, **isolated},
        series=("base", "personalized"),
        seed=0,
        bootstrap=kafka_bootstrap,
        quiet=True,
    )
    assert code == 0, (tmp_path / "learner.log").read_text()[-3000:]
    half = ROUNDS // 2
    diffs = [
        p - b
        for user in rewards["personalized"]
        for p, b in zip(
            rewards["personalized"][user][half:], rewards["base"][user][half:], strict=True
        )
    ]
    p_value = sign_flip_p(diffs, seed=0)
    summary = {
        name: statistics.mean(r for s in per_user.values() for r in s[half:])
        for name, per_user in rewards.items()
    }
    assert p_value < 0.01, (p_value, summary)
    assert summary["personalized"] > summary["base"]
