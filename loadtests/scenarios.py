"""Named scenarios: each starts its own stack, drives load, disturbs the system, reports.

| scenario        | what it shows                                                           |
|-----------------|-------------------------------------------------------------------------|
| steady          | steady open-loop load: the baseline figures                              |
| burst           | the arrival rate jumps for a while: queueing, then recovery             |
| cold-users      | many more users than adapter slots: adapter cache misses under load     |
| learner-restart | the learner is SIGKILLed mid-run and restarted: updates before/after    |
| kafka-outage    | the broker is stopped for N s and restarted: Generate availability and  |
|                 | events lost (interactions served minus interaction events in Kafka)     |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from loadtests import report
from loadtests.config import Burst, LoadConfig
from loadtests.generator import Action, LoadGenerator, RunResult
from loadtests.stack import Stack, events_lost


@dataclass
class Plan:
    """What a scenario adds to the base load: config changes, actions, stack options."""

    config: dict[str, Any] = field(default_factory=dict)
    stack: dict[str, Any] = field(default_factory=dict)
    actions: Callable[[Stack, LoadConfig], list[Action]] = lambda stack, cfg: []
    windows: Callable[[RunResult], dict[str, tuple[float, float]]] = lambda r: {}
    after: Callable[[Stack, RunResult], dict[str, Any]] = lambda stack, r: {}


def _between(result: RunResult, name: str) -> tuple[float, float]:
    """(start, end) of the action `name` from the run's marks."""
    start = next(t for t, what in result.marks if what == f"{name} start")
    end = next(t for t, what in result.marks if what == f"{name} end")
    return start, end


def _around(name: str) -> Callable[[RunResult], dict[str, tuple[float, float]]]:
    def windows(result: RunResult) -> dict[str, tuple[float, float]]:
        if name in result.actions and "error" in result.actions[name]:
            return {}
        start, end = _between(result, name)
        return {
            "before": (0.0, start),
            "during": (start, end),
            "after": (end, result.issue_seconds),
        }

    return windows


def _user_ids(cfg: LoadConfig) -> list[str]:
    return [f"{cfg.user_prefix}-{i:04d}" for i in range(cfg.users)]


def steady() -> Plan:
    return Plan()


def burst(factor: float = 4.0) -> Plan:
    def config_of(cfg: LoadConfig) -> list[Burst]:
        assert cfg.duration is not None
        return [Burst(at=cfg.duration / 3, seconds=cfg.duration / 6, factor=factor)]

    def windows(result: RunResult) -> dict[str, tuple[float, float]]:
        (b,) = result.config.bursts
        return {
            "before": (0.0, b.at),
            "burst": (b.at, b.at + b.seconds),
            "after": (b.at + b.seconds, result.issue_seconds),
        }

    return Plan(config={"bursts": config_of, "mode": "open"}, windows=windows)


def cold_users(slots: int = 4, users: int = 48) -> Plan:
    """Users >> adapter slots: every feedback makes a new version, and with more users than
    slots almost every batch loads adapters from the store (cache misses)."""
    return Plan(config={"users": users}, stack={"adapter_slots": slots})


def learner_restart(down: float = 2.0) -> Plan:
    def actions(stack: Stack, cfg: LoadConfig) -> list[Action]:
        assert cfg.duration is not None
        return [
            Action(
                cfg.duration / 3,
                "learner-restart",
                lambda: stack.restart_learner(_user_ids(cfg), down),
            )
        ]

    def after(stack: Stack, result: RunResult) -> dict[str, Any]:
        progress = stack.learner_progress(_user_ids(result.config))
        killed = result.actions.get("learner-restart", {})
        return {
            "learner": {
                "updates_at_kill": killed.get("updates_at_kill"),
                "updates_at_end": progress["updates"],
                "updates_after_restart": progress["updates"] - killed.get("updates_at_kill", 0),
                "max_version_at_end": progress["max_version"],
            }
        }

    return Plan(actions=actions, windows=_around("learner-restart"), after=after)


def kafka_outage(seconds: float = 15.0) -> Plan:
    def actions(stack: Stack, cfg: LoadConfig) -> list[Action]:
        assert cfg.duration is not None
        return [Action(cfg.duration / 4, "kafka-outage", lambda: stack.kafka_outage(seconds))]

    def after(stack: Stack, result: RunResult) -> dict[str, Any]:
        assert stack.settings is not None
        served = result.served_request_ids
        fed = {c.request_id for c in result.calls if c.kind == "feedback" and c.code == "OK"}
        s = stack.settings
        return {
            "events": {
                "interactions": events_lost(stack.bootstrap, s.topic_interactions, served),
                "feedback": events_lost(stack.bootstrap, s.topic_feedback, fed),
            }
        }

    return Plan(actions=actions, windows=_around("kafka-outage"), after=after)


SCENARIOS: dict[str, Callable[..., Plan]] = {
    "steady": steady,
    "burst": burst,
    "cold-users": cold_users,
    "learner-restart": learner_restart,
    "kafka-outage": kafka_outage,
}


def run_scenario(
    name: str,
    base: dict[str, Any],
    out: Path,
    console: Console,
    stack_options: dict[str, Any] | None = None,
    scenario_options: dict[str, Any] | None = None,
) -> dict:
    """Start a stack, run scenario `name` with `base` LoadConfig fields, stop everything.

    Returns the summary (also written as `<out>/<name>.json` and `.png`).
    """
    import asyncio

    plan = SCENARIOS[name](**(scenario_options or {}))
    options = {**(stack_options or {}), **plan.stack}
    with console.status(f"[{name}] starting Kafka, server and learner..."):
        stack = Stack(out / name / "stack", **options).start()
    try:
        fields = {**base, "target": stack.target}
        probe = LoadConfig(**fields)
        for key, value in plan.config.items():
            fields[key] = value(probe) if callable(value) else value
        config = LoadConfig(**fields)
        console.print(f"[{name}] stack up: server {stack.target}, Kafka {stack.bootstrap}")
        generator = LoadGenerator(config, plan.actions(stack, config))
        with console.status(f"[{name}] load running ({config.duration or '-'} s)..."):
            result = asyncio.run(generator.run())
        extra = plan.after(stack, result)
        extra["stack"] = {"target": stack.target, **options}
        return report.write(result, out, name, plan.windows(result), console, extra)
    finally:
        with console.status(f"[{name}] stopping..."):
            stack.close()


def scenario_names() -> list[str]:
    return list(SCENARIOS)
