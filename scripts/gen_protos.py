"""Generate the Python code and type stubs of protos/ into loraloop/core/gen/ (one command).

    python scripts/gen_protos.py            # regenerate in place
    python scripts/gen_protos.py --out DIR  # write elsewhere (the staleness test uses this)

protoc names imports after the proto package (`from loraloop.v1 import ...`); they are
rewritten to the package the code lives in (`loraloop.core.gen.loraloop.v1`), so the generated code
imports without touching sys.path.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "loraloop" / "core" / "gen"
IMPORT_PREFIX = "loraloop.core.gen."


def _plugin(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = path if path.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: pip install -e '.[dev]' (mypy-protobuf)")
    return str(found)


def generate(out: Path) -> list[Path]:
    """Run protoc over every .proto and return the files written."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = sorted(p for p in out.rglob("*") if p.suffix in {".py", ".pyi"})
    pattern = re.compile(r"^(from|import) loraloop\.", re.MULTILINE)
    for path in written:
        text = pattern.sub(lambda m: f"{m.group(1)} {IMPORT_PREFIX}loraloop.", path.read_text())
        path.write_text(text)
    for pkg in {p.parent for p in written} | {out / "loraloop"}:
        while pkg != out.parent and pkg.is_relative_to(out):
            (pkg / "__init__.py").touch()
            pkg = pkg.parent
    return sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in {".py", ".pyi"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ns = parser.parse_args()
    files = generate(ns.out)
    print(f"wrote {len(files)} files under {ns.out}")


if __name__ == "__main__":
    main()
