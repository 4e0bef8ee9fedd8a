#!/usr/bin/env bash
# The GPU checks as one command, for a machine with CUDA and PyTorch already installed (it installs
# nothing from the network): `fedmeta bench --device cuda`, again with the vmap inner loop, then
# scripts/device_check.py (the same evaluations on the CPU and the GPU). Wheels in .whl/ are
# installed first if pydantic is missing;
# data/prepared and checkpoints/ must be present (from `dvc repro`). Results go to $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/fedmeta-device}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
if ! python3 -c "import pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
python3 -m fedmeta bench --device cuda --repeats 5 --out "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench.log"
# the vmap inner loop (the GPU default before "stacked") on the same card, for the comparison
FEDMETA_ADAPT=vmap python3 -m fedmeta bench --device cuda --repeats 3 --no-memory --out "$OUT/bench_cuda_vmap.json" 2>&1 | tee "$OUT/bench_vmap.log"
python3 scripts/device_check.py --device cuda | tee "$OUT/device_check.json"
