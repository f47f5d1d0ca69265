"""The Grafana dashboard: every query names metrics that the server or learner exports,
and the dashboard follows the rules of Grafana's dashboard linter (checked here in Python,
and by the linter itself where `dashboard-linter` is installed)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from loraloop.learner.metrics import LearnerMetrics
from loraloop.service.metrics import ServerMetrics
from tests.ops_tools import INSTALL_HINT, find_tool

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "loraloop-dashboard.json"
BUILTIN = {"up"}  # series Prometheus itself adds to every target
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless", "inf", "nan"}
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def exported_names() -> set[str]:
    """Every sample name the server's and the learner's registries can expose."""
    names: set[str] = set()
    for registry in (ServerMetrics().registry, LearnerMetrics().registry):
        for family in registry.collect():
            names.update(family.name + s for s in SAMPLE_SUFFIXES.get(family.type, ("",)))
            names.update(s.name for s in family.samples)
    return names


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.extend(panel.get("panels", []))
        if panel["type"] != "row":
            out.append(panel)
    return out


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (in matchers or in by/without/on lists), strings or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery windows
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\blabel_values\s*\(([^,]*),[^)]*\)", r"(\1)", text)  # Grafana's helper
    found = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        name, call = m.group(1), m.group(2)
        if not call and name not in KEYWORDS:
            found.add(name)
    return found


def test_every_query_uses_exported_metrics() -> None:
    exported = exported_names()
    used: set[str] = set()
    for expr in expressions(load()):
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        used |= names
    unknown = sorted(used - exported - BUILTIN)
    assert not unknown, f"the dashboard queries metrics nobody exports: {unknown}"
    # and the dashboard covers all three areas
    assert any(n.startswith("loraloop_server_") for n in used)
    assert any(n.startswith("loraloop_learner_") for n in used)
    assert "loraloop_learner_consumer_lag" in used


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, method) (rate(a_seconds_bucket{job=~"$job",'
        ' method=~"Generate.*"}[$__rate_interval]))) / on (x) b_total and time() - c'
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c"}
    assert metric_names('label_values(up{job=~".*"}, instance)') == {"up"}


def test_dashboard_follows_the_linter_rules() -> None:
    """The rules of grafana/dashboard-linter, for when the binary is not installed."""
    dash = load()
    assert dash["uid"] and dash["title"] and dash["editable"] is False  # uneditable-rule
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    # template-datasource-rule, template-job-rule, template-instance-rule
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        var = variables[name]
        assert var["datasource"]["uid"] == "${datasource}" and var["multi"] and var["includeAll"]
        assert var["refresh"] == 2  # template-on-time-change-reload-rule
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dash):
        where = f"panel {panel['title']!r}"
        assert panel["title"] and panel.get("description"), where  # title-description-rule
        assert panel["datasource"]["uid"] == "${datasource}", where  # panel-datasource-rule
        assert panel["fieldConfig"]["defaults"].get("unit"), where  # panel-units-rule
        assert panel["targets"], where  # panel-no-targets-rule
        for target in panel["targets"]:
            expr = target["expr"]
            for selector in re.finditer(r"\b(loraloop_\w+)(\{[^}]*\})?", expr):
                matchers = selector.group(2) or ""  # target-job-instance-rule
                assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, (
                    where,
                    expr,
                )
            # target-rate-interval-rule
            for window in re.findall(r"\brate\([^\[]*\[([^\]]*)\]", expr):
                assert window == "$__rate_interval", (where, expr)
            # target-counter-agg-rule: counters only ever through rate()/increase()
            for counter in re.finditer(r"\b\w+_total\b", expr):
                before = expr[: counter.start()]
                assert re.search(r"\b(rate|increase)\(\s*$", before), (where, expr)


def test_grafana_dashboard_linter(tmp_path: Path) -> None:
    linter = find_tool("dashboard-linter")
    if linter is None:
        pytest.skip(
            "dashboard-linter is not installed (its releases need Grafana's AGPL module, which "
            f"the Go proxy here does not serve): {INSTALL_HINT}"
        )
    result = subprocess.run(
        [linter, "lint", "--strict", str(DASHBOARD)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    """promtool parses each query (template variables filled in) as a recording rule."""
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.skip(f"promtool is not installed (Debian package prometheus): {INSTALL_HINT}")
    fill = {"$__rate_interval": "1m", "$job": ".+", "$instance": ".+"}
    rules = []
    for i, expr in enumerate(expressions(load())):
        if expr.startswith("label_values("):  # Grafana's helper, not PromQL
            continue
        for var, value in fill.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"loraloop:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "queries.rules.json"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_request_panels_show_both_protocols() -> None:
    """gRPC and the OpenAI-compatible HTTP API count into the same series, told apart by
    their `protocol` label (service/metrics.py): each request panel splits by it."""
    families = {"requests_total", "requests_in_flight", "request_duration_seconds_bucket"}
    split = []
    for expr in expressions(load()):
        names = {n.removeprefix("loraloop_server_") for n in metric_names(expr)}
        if names & families:
            assert re.search(r"\bby \([^)]*\bprotocol\b", expr), expr
            split.append(expr)
    assert len(split) >= 4  # rate, errors, in flight, latency
    labels = ServerMetrics().requests._labelnames
    assert "protocol" in labels
