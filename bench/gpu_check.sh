#!/usr/bin/env bash
# Issue 9's CUDA checks as one command, for a session lent a GPU (the device tool: one short,
# prepared run). It runs the cuda-marked tests (CPU and CUDA write the same bytes) and the 4-bit
# bench on the GPU (nf4 -> merged_4bit / merged_16bit against cp of the same shards), and leaves
# the reports under $OUT.
#
# The device image has torch, transformers, peft, safetensors and pytest but no bitsandbytes or
# gguf: carry them as wheels. Here, once (pip download reaches the package index from this machine):
#     echo /.whl/ >> .git/info/exclude
#     python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .whl bitsandbytes==0.50.2 gguf==0.19.0
# Then: device run, carry [".whl"], timeout_s 480, command `bash bench/gpu_check.sh`; copy the files
# it returns into bench/results/. A dry run without a GPU: DEVICE=cpu OUT=/tmp/gpu bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

{
    date -u
    nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"
    python3 -c "import torch, bitsandbytes, transformers, peft, safetensors; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0), 'bitsandbytes', bitsandbytes.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'safetensors', safetensors.__version__)"
} > "$OUT/gpu-env.txt" 2>&1
cat "$OUT/gpu-env.txt"

# 1. CPU == CUDA bytes (tests marked cuda skip themselves without a GPU)
timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-pytest-cuda.txt"

# 2. the 4-bit bench on the device: 320M-param NF4 base and a 12-layer one for the steady state (start-up
#    excluded), best of 2, no PEFT
timeout 270 python3 bench/bench_4bit.py --device "$DEVICE" --skip-peft --repeat 2 --steady-layers 12 \
    --results "$OUT" 2>&1 | tee "$OUT/gpu-bench-4bit.txt"
exit 0
