#!/usr/bin/env bash
# GPU check, for a session that is lent a device machine: the vllm engine's contract tests
# and the vLLM serving benchmark (mixed LoRA vs base) on the GPU. The device machine cannot
# reach a package registry: it must already have vllm (the GPU build, same torch) importable
# from $PY; this script never installs. Run from the repository root, e.g.
#   run(command="bash scripts/gpu-check.sh", timeout_s=540)
# Budget: engine start ~1 min, contract tests ~1 min, benchmark ~2-3 min.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(command -v python3)}
[ -x .venv-vllm/bin/python ] && PY=.venv-vllm/bin/python
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"
if ! "$PY" -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu-check: vllm with CUDA is not importable by $PY; nothing to run" >&2
  exit 3
fi
status=0
LORALOOP_DTYPE=float32 timeout 300 "$PY" -m pytest tests/integration/test_engine_contract.py \
  -m vllm -q -rs -p no:cacheprovider || status=$?
timeout 240 "$PY" benchmarks/bench_vllm_serving.py --hidden 2048 --layers 16 --repeats 5 \
  || status=$?
exit $status
