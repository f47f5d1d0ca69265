"""Where the operators' tools (promtool, prometheus, helm, kubeconform, grpcurl,
dashboard-linter) are found: on PATH, or where `scripts/install-ops-tools.sh` puts the Go
ones."""

from __future__ import annotations

import json
import os
import re
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


def kubernetes_schemas(version: str = "1.33.0") -> Path | None:
    """A folder in kubeconform's layout (`v<version>-standalone-strict/<kind>-<group>-<v>.json`)
    built offline from the JSON schemas the `kubernetes-validate` package ships (None when
    that package is not installed). Those files `$ref` a shared `/api/_definitions.json`;
    each copy here carries the definitions it reaches instead, so it stands alone."""
    try:
        import kubernetes_validate
    except ImportError:
        return None
    source = (
        Path(kubernetes_validate.__file__).parent
        / "kubernetes-json-schema"
        / f"v{version}-local-strict"
    )
    if not source.is_dir():
        return None
    from loraloop.core.settings import cache_dir

    root = cache_dir() / "k8s-schemas"
    target = root / f"v{version}-standalone-strict"
    if (target / ".complete").exists():
        return root
    prefix = "/api/_definitions.json#/$defs/"
    defs = json.loads((source / "_definitions.json").read_text())["$defs"]
    tmp = root / f".v{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in source.glob("*.json"):
        if path.name == "_definitions.json":
            continue
        text = path.read_text().replace(f'"{prefix}', '"#/$defs/')
        schema = json.loads(text)
        needed: dict[str, object] = {}
        todo = re.findall(r'"#/\$defs/([^"]+)"', text)
        while todo:
            name = todo.pop()
            if name in needed or name not in defs:
                continue
            body = json.dumps(defs[name]).replace(f'"{prefix}', '"#/$defs/')
            needed[name] = json.loads(body)
            todo.extend(re.findall(r'"#/\$defs/([^"]+)"', body))
        schema["$defs"] = needed
        (tmp / path.name).write_text(json.dumps(schema))
    (tmp / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return root
