"""The Prometheus alerting rules (ops/prometheus/alerts.yml): promtool checks them and runs
their unit tests (ops/prometheus/alerts.test.yml), every metric they name is exported, and
the Prometheus configurations load them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ops_tools import INSTALL_HINT, find_tool
from tests.unit.test_dashboard import BUILTIN, exported_names, metric_names

OPS = Path(__file__).resolve().parents[2] / "ops"
RULES = OPS / "prometheus" / "alerts.yml"
RULE_TESTS = OPS / "prometheus" / "alerts.test.yml"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.skip(f"promtool is not installed (Debian package prometheus): {INSTALL_HINT}")
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, cwd=RULES.parent, check=False
    )


def test_promtool_checks_the_rules_and_the_config() -> None:
    for args in (("check", "rules", RULES.name), ("check", "config", "prometheus.yml")):
        result = _promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_fire_when_they_should_and_only_then() -> None:
    result = _promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_uses_exported_metrics_and_has_a_test() -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    used = set().union(*(metric_names(r["expr"]) for r in rules))
    assert not used - exported_names() - BUILTIN, used - exported_names()
    assert {"loraloop_learner_committed_lag", "loraloop_learner_unwritten_samples"} <= used
    tested = RULE_TESTS.read_text()
    for rule in rules:
        assert f"alertname: {rule['alert']}" in tested, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_stacks_load_the_rules() -> None:
    config = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    compose = yaml.safe_load((OPS / "compose.yaml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes
    stack = (OPS.parent / "scripts" / "local-stack.sh").read_text()
    assert "$ROOT/ops/prometheus/alerts.yml" in stack
