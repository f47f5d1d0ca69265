"""Settings: typed choices refused at start-up with a message, defaults written once, and a
warning for LORALOOP_* variables that nothing reads."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from loraloop.core.settings import Settings, cache_dir, default_of, unknown_env
from loraloop.learner.algos.reinforce import ReinforceConfig
from loraloop.learner.guard import GuardConfig


@pytest.mark.parametrize(
    ("field", "bad", "accepted"),
    [
        ("engine", "vlm", "'hf' or 'vllm'"),
        ("bandit", "ucb", "'thompson' or 'linucb'"),
        ("dtype", "fp16", "'float32', 'bfloat16' or 'float16'"),
        ("log_level", "loud", "'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'"),
    ],
)
def test_choices_are_refused_with_what_is_accepted(field: str, bad: str, accepted: str) -> None:
    with pytest.raises(ValidationError, match=accepted):
        Settings(**{field: bad})


def test_log_level_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORALOOP_LOG_LEVEL", "info")
    assert Settings().log_level == "INFO"


def test_cache_dir_is_a_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORALOOP_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache" and (tmp_path / "cache").is_dir()


def test_learner_configs_take_their_defaults_from_settings() -> None:
    """Each default lives once, in Settings; the config objects mirror it."""
    pairs = {
        ReinforceConfig: {f: f for f in ("learning_rate", "max_grad_norm", "baseline_decay")}
        | {f: f for f in ("kl_coef", "is_truncation", "loo_baseline")},
        GuardConfig: {"kl_limit": "kl_limit", "window": "guard_window", "drop": "guard_drop"},
    }
    for config, fields in pairs.items():
        defaults = {f.name: f.default for f in dataclasses.fields(config)}  # type: ignore[arg-type]
        for mine, setting in fields.items():
            assert defaults[mine] == default_of(setting), (config.__name__, mine)
    settings = Settings(learning_rate=0.1, guard_window=3)
    assert ReinforceConfig.from_settings(settings).learning_rate == 0.1
    assert GuardConfig.from_settings(settings).window == 3


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    environ = {
        "LORALOOP_ADAPTER_STORE_URL": "s3://bucket/adapters",
        "LORALOOP_ADAPTER_STORE_URI": "s3://bucket/adapters",  # a setting
        "LORALOOP_MODLE": "x",
        "LORALOOP_PORT": "50051",
        "LORALOOP_API_KEY": "the Python client's own",
        "LORALOOP_XYZZY": "1",
        "PATH": "/usr/bin",
    }
    assert unknown_env(environ) == [
        "LORALOOP_ADAPTER_STORE_URL (did you mean LORALOOP_ADAPTER_STORE_URI?)",
        "LORALOOP_MODLE (did you mean LORALOOP_MODEL?)",
        "LORALOOP_XYZZY",
    ]


def _cli(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraloop.cli", *args],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_refuses_bad_settings_at_start_up(tmp_path: Path) -> None:
    """A bad choice, or no model at all, ends `serve` with exit code 2 and one line that
    names the variable; an unknown variable is warned about."""
    bad = _cli(tmp_path, {"LORALOOP_ENGINE": "vlm"}, "serve")
    assert bad.returncode == 2, bad.stderr
    assert "LORALOOP_ENGINE='vlm': Input should be 'hf' or 'vllm'" in bad.stderr
    assert "Traceback" not in bad.stderr
    unset = _cli(tmp_path, {"LORALOOP_MODLE": "typo", "LORALOOP_PORT": "0"}, "serve")
    assert unset.returncode == 2, unset.stderr
    assert "no base model: set LORALOOP_MODEL" in unset.stderr
    assert "LORALOOP_MODLE (did you mean LORALOOP_MODEL?) is set but no" in unset.stderr


def test_auth_required_refuses_a_published_request_id_secret(tmp_path: Path) -> None:
    """With auth_required the request-id secret must be the operator's own: the default
    (`loraloop-dev-secret`), the chart's `change-me` or an empty one stop `serve` and
    `learn` with exit code 2 and a line that names the variable, never echoing the keys."""
    key = "k-admin-0123456789abcdef"
    env = {"LORALOOP_AUTH_REQUIRED": "true", "LORALOOP_API_KEYS": f"{key}=*"}
    for secret in (None, "change-me", " "):
        extra = {} if secret is None else {"LORALOOP_REQUEST_ID_SECRET": secret}
        for command in ("serve", "learn"):
            run = _cli(tmp_path, {**env, **extra}, command)
            assert run.returncode == 2, run.stderr
            assert f"loraloop {command}: invalid settings:" in run.stderr
            assert "LORALOOP_REQUEST_ID_SECRET is " in run.stderr
            assert "while LORALOOP_AUTH_REQUIRED is true" in run.stderr
            assert "Traceback" not in run.stderr and key not in run.stderr
    with pytest.raises(ValidationError, match="the published default 'loraloop-dev-secret'"):
        Settings(auth_required=True)
    assert Settings(auth_required=True, request_id_secret="a-real-secret").auth_required
    assert Settings().request_id_secret.get_secret_value() == "loraloop-dev-secret"  # demo


def test_a_taken_http_port_stops_serve_before_the_model_loads(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _cli(tmp_path, {"LORALOOP_HTTP_PORT": str(port), "LORALOOP_PORT": "0"}, "serve")
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{port} for the HTTP API" in done.stderr
    assert "LORALOOP_HTTP_PORT" in done.stderr and "Traceback" not in done.stderr


def test_every_start_up_misconfiguration_is_one_line(tmp_path: Path) -> None:
    """Refusals raised deep in start-up (here: auth required without keys) derive from
    StartupError, which the CLI answers with one line and exit code 2."""
    env = {
        "LORALOOP_AUTH_REQUIRED": "true",
        "LORALOOP_REQUEST_ID_SECRET": "a-real-one-0123456789",
        "LORALOOP_PORT": "0",
    }
    done = _cli(tmp_path, env, "serve")
    assert done.returncode == 2, done.stderr
    assert "LORALOOP_API_KEYS is empty" in done.stderr and "Traceback" not in done.stderr
