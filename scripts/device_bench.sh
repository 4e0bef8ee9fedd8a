#!/usr/bin/env bash
# The GPU checks as one command, on any CUDA machine with the project set up (`bash scripts/setup.sh`) and the
# pipeline's outputs present (data/prepared/ and checkpoints/, from `bash scripts/pipeline.sh`):
#   1. `fedmeta bench --device cuda` (meta-training and evaluation against the naive loop),
#   2. the same with the vmap inner loop (FEDMETA_ADAPT=vmap), for the comparison,
#   3. scripts/device_check.py: the same federated round and evaluations on the CPU and the GPU.
# Results go to docs/performance/ (bench_cuda.json, bench_cuda_vmap.json, device_check_cuda.json, gpu.txt and the
# logs), overwriting the committed ones; RESULTS=<folder> writes them elsewhere. PYTHON=<interpreter> replaces
# .venv/bin/python (an environment where `import fedmeta` works, e.g. `pip install -e .` into it).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-docs/performance}
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null || { echo "device_bench: no $PYTHON; run bash scripts/setup.sh first" >&2; exit 1; }
for need in data/prepared/dataset.pt checkpoints/attacked_include.pt; do
  [ -f "$need" ] || { echo "device_bench: $need is missing; run bash scripts/pipeline.sh first" >&2; exit 1; }
done
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/gpu.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$RESULTS/gpu.txt"
"$PYTHON" -m fedmeta bench --device cuda --repeats 5 --out "$RESULTS/bench_cuda.json" 2>&1 | tee "$RESULTS/bench.log"
# the vmap inner loop (the GPU default before "stacked") on the same card, for the comparison
FEDMETA_ADAPT=vmap "$PYTHON" -m fedmeta bench --device cuda --repeats 3 --no-memory --out "$RESULTS/bench_cuda_vmap.json" 2>&1 \
  | tee "$RESULTS/bench_vmap.log"
"$PYTHON" scripts/device_check.py --device cuda | tee "$RESULTS/device_check_cuda.json"
