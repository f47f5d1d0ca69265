"""The wheel as a user gets it: built from this checkout, installed into a fresh virtual
environment, and run from an empty directory outside the checkout.

The fresh environment holds only the wheel; its dependencies come from the suite's own
environment through a site directory added after its own (installing torch and the rest
again would take minutes and change nothing that is tested here). The checks make sure
the installed copy is the one that runs, never the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def _source_copy(dest: Path) -> Path:
    """The checkout's files (tracked, and new ones git does not ignore), links kept as
    links: a build in the checkout itself would leave build/ there, whose stale files a
    later wheel would ship."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source, target = ROOT / name, dest / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree, not yet in the index
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = _source_copy(tmp_path_factory.mktemp("source"))
    subprocess.run(
        [*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("loraloop-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed (and the suite's packages behind it)."""
    env_dir = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    main_site = sysconfig.get_paths()["purelib"]
    Path(site, "_suite_packages.pth").write_text(f"import site; site.addsitedir({main_site!r})\n")
    subprocess.run(
        [*PIP, "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return env_dir


@pytest.fixture
def outside(tmp_path: Path, venv: Path) -> Iterator[dict[str, str]]:
    """The environment of a user's shell in an empty directory: no PYTHONPATH, no
    LORALOOP_* variable but the model and a cache of its own for what it builds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORALOOP_", "PYTHON"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["LORALOOP_MODEL"] = os.environ["LORALOOP_MODEL"]
    yield env


def test_wheel_ships_one_namespace_and_its_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"loraloop", "loraloop-0.1.0.dist-info"}
    for data in (
        "loraloop/configs/demo-arms.toml",
        "loraloop/devtools/kafka-pom.xml",
        "loraloop/core/gen/loraloop/v1/api_pb2.pyi",
        "loraloop/py.typed",
        "loraloop/service/server.py",
        "loraloop/learner/loop.py",
    ):
        assert data in names, data
    assert not [n for n in names if re.match(r"loraloop/(loadtests|tests|benchmarks)/", n)]


def _run(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["loraloop", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_installed_cli_runs_from_an_empty_directory(
    outside: dict[str, str], tmp_path: Path, venv: Path
) -> None:
    shown = _run(outside, tmp_path, "--help")
    assert shown.returncode == 0, shown.stderr
    for command in ("serve", "learn", "kafka", "demo", "build-model"):
        assert command in shown.stdout
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import loraloop.service.server as s; print(s.__file__)"],
        env=outside,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where


def _until(proc: subprocess.Popen[str], pattern: str, timeout: float = 120) -> str:
    """Lines of `proc` up to one matching `pattern` (fails with the output if it ends)."""
    import select
    import time

    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(seen)}")


def _start(env: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["loraloop", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stop(proc: subprocess.Popen[str], sig: int) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_installed_kafka_and_serve(outside: dict[str, str], tmp_path: Path) -> None:
    """`loraloop kafka` starts a broker from the packaged pom; `loraloop serve` serves on it;
    both stop on a signal."""
    kafka = _start(outside, tmp_path, "kafka", "--port", "0", "--data-dir", str(tmp_path / "k"))
    try:
        started = _until(kafka, r"Kafka ready at")
        bootstrap = re.search(r"Kafka ready at (\S+)", started).group(1)  # type: ignore[union-attr]
        env = {**outside, "LORALOOP_KAFKA_BOOTSTRAP": bootstrap, "LORALOOP_PORT": "0"}
        server = _start(env, tmp_path, "serve")
        try:
            _until(server, r"loraloop server listening on [\d.]+:\d+")
        finally:
            assert _stop(server, signal.SIGTERM) == 0
    finally:
        assert _stop(kafka, signal.SIGINT) == 0
    assert (tmp_path / "out" / "event-spill").is_dir()  # the server's files: in the cwd


def test_installed_demo(outside: dict[str, str], tmp_path: Path) -> None:
    """The demo's whole loop from the wheel alone (one user, a few interactions)."""
    done = subprocess.run(
        ["loraloop", "demo", "--users", "2", "--rounds", "4", "--out", str(tmp_path / "demo")],
        env=outside,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "personalized" in done.stdout
