#!/usr/bin/env bash
# The paper's stages once per seed, as queued DVC experiments (each in its own temporary copy; the workspace is not
# touched), then the summary across seeds (fedmeta seeds) in metrics/seeds/<profile>/:
#   bash scripts/seeds.sh quick 1 2    # seeds 1 and 2 beside the workspace's own run (params.yaml: quick, seed 0)
#   bash scripts/seeds.sh long 0       # the long profile; the workspace's run is included only when it is that profile
# Experiments are named <profile>-seed<N>; an existing one of that name is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: bash scripts/seeds.sh PROFILE SEED [SEED ...]" >&2; exit 2; }
profile=$1
shift
for seed in "$@"; do
    [[ $seed =~ ^[0-9]+$ ]] || { echo "seeds: SEED must be a non-negative integer, got '$seed'" >&2; exit 2; }
done
bash scripts/setup.sh
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true PATH="$PWD/.venv/bin:$PATH"
git rev-parse --git-dir >/dev/null 2>&1 || { echo "seeds: run it inside the git clone of fedmeta" >&2; exit 1; }
python -c 'import sys, yaml; sys.exit(sys.argv[1] not in yaml.safe_load(open("params.yaml"))["profiles"])' "$profile" ||
    { echo "seeds: PROFILE '$profile' is not under profiles: in params.yaml" >&2; exit 2; }

# What the claims read: Experiments 1-3 and where the target sits, with everything upstream of them.
stages=(continue@exclude continue@include finetune@exclude finetune@include defend@exclude defend@include
    positions@exclude positions@include)
names=()
for seed in "$@"; do
    name="$profile-seed$seed"
    dvc exp remove "$name" >/dev/null 2>&1 || true
    dvc exp run --queue -n "$name" -S "profile=$profile" -S "seed=$seed" "${stages[@]}"
    names+=("$name")
done
PYTHONPATH=. dvc queue start -j 1 >/dev/null  # each stage imports its own experiment folder's code (docs/depth.md)
state() { dvc queue status | awk -v n="$1" '$2 == n {s = $NF} END {print s}'; }
for name in "${names[@]}"; do
    while [[ $(state "$name") =~ ^(Queued|Running)$ ]]; do sleep 30; done
    [ "$(state "$name")" = Success ] || { echo "seeds: experiment $name failed (dvc queue logs $name)" >&2; exit 1; }
    echo "seeds: $name done"
done

workspace=--no-workspace
if python - "$profile" "$@" <<'EOF'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
sys.exit(0 if p["profile"] == sys.argv[1] and str(p["seed"]) not in sys.argv[2:] else 1)
EOF
then workspace=--workspace; fi
fedmeta seeds "metrics/seeds/$profile" $workspace "${names[@]/#/--exp=}"
