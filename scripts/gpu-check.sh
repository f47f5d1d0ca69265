#!/usr/bin/env bash
# GPU check: run on a host with an NVIDIA GPU and torch 2.13 (CUDA build) installed, even
# one that cannot reach a package registry (the other wheels travel in .whl/).
#
# 1. The hf engine's batched multi-LoRA decode on the GPU (benchmarks/bench_mixed_lora.py):
#    mixed per-user adapters vs the base model vs peft, at Llama sizes of about 0.2B and 1B
#    parameters (random weights), bf16, then float32 for the token-for-token check.
#    transformers/peft at this project's pins travel as wheels in .whl/ (see below).
# 2. The hf engine and the learner's batched step on CUDA through the settings, as `serve`
#    and `learn` load them (device=cuda, dtype auto = bfloat16; benchmarks/bench_device.py):
#    32 requests on 32 adapters, tok/s; 32 users' REINFORCE step, seconds; a random Llama of
#    hidden 1024 x 8 layers with the tiny model's tokenizer (.whl/tiny-model).
# 3. The vllm engine's contract tests and the vLLM serving benchmark, where a CUDA build of
#    vllm is importable (`pip install '.[vllm]'`); otherwise this part says why it skipped.
#
# Prepare the wheels and the tokenizer on a machine with registry access, copy the checkout
# with .whl/ to the GPU host, and run `bash scripts/gpu-check.sh` there (OUT= sets where
# the figures go, /tmp/gpu-check by default):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl transformers==5.19.0 \
#     peft==0.21.2 tokenizers==0.23.3 safetensors==0.8.0 huggingface_hub==2.4.0 \
#     pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 python-dotenv==1.2.4
#   (plus huggingface_hub's own requirements: pip download without --no-deps lists them)
#   cp -r "$(loraloop build-model)" .whl/tiny-model   # 5 MiB: config and tokenizer
# On an H200 (2026-11-26) the two benchmark runs took about 3.5 minutes; peft's mixed batch
# is the slow part (~11 s a run), hence 32 tokens and 3 repeats.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-$(command -v python3)}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 4
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), '| transformers', transformers.__version__, '| peft', peft.__version__)"
status=0
bench() { timeout "$1" "$PY" benchmarks/bench_mixed_lora.py --device cuda --threads 8 "${@:2}" \
  2>&1 | tee -a "$OUT/bench_mixed_lora_gpu.txt" || status=1; }
bench 170 --dtype bfloat16 --sizes 1024x8,2048x16 --tokens 32 --repeats 3
bench 120 --dtype float32 --sizes 2048x16 --tokens 32 --repeats 3
if [ -f .whl/tiny-model/config.json ]; then
  timeout 150 "$PY" benchmarks/bench_device.py --model .whl/tiny-model --device cuda \
    --hidden 1024 --layers 8 2>&1 | tee -a "$OUT/bench_device_gpu.txt" || status=1
else
  echo "gpu-check: no .whl/tiny-model (see the top of this script): device checks skipped"
  status=1
fi
if "$PY" -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  LORALOOP_DTYPE=float32 timeout 300 "$PY" -m pytest tests/integration/test_engine_contract.py \
    -m vllm -q -rs -p no:cacheprovider || status=$?
  timeout 240 "$PY" benchmarks/bench_vllm_serving.py --hidden 2048 --layers 16 --repeats 5 \
    || status=$?
else
  echo "gpu-check: vllm (CUDA build) is not importable here: vllm engine GPU checks skipped"
fi
exit $status
