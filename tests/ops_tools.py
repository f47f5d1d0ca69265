"""Where the operators' tools (promtool, prometheus, helm, kubeconform, dashboard-linter)
are found: on PATH, or where `scripts/install-ops-tools.sh` puts the Go ones."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

INSTALL_HINT = "run scripts/install-ops-tools.sh"


def find_tool(name: str) -> str | None:
    """The path of `name`, or None when it is not installed."""
    found = shutil.which(name)
    if found:
        return found
    gobin = os.environ.get("GOBIN") or ""
    gopath = os.environ.get("GOPATH") or str(Path.home() / "go")
    for folder in (gobin, os.path.join(gopath, "bin")):
        candidate = Path(folder) / name
        if folder and candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    """A TCP port free on loopback right now (for tools that cannot be told to pick one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
