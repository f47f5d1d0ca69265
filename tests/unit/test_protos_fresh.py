"""The checked-in generated code must be exactly what protos/ generates today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    checked_in = ROOT / "loraloop" / "core" / "gen"
    fresh = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    current = {
        p.relative_to(checked_in): p.read_bytes()
        for p in checked_in.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(fresh) == sorted(current), "files differ: run `make protos`"
    stale = [str(name) for name, data in fresh.items() if current[name] != data]
    assert not stale, f"stale generated code {stale}: run `make protos` and commit"
