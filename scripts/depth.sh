#!/usr/bin/env bash
# The attacker's depth sweep (docs/depth.md): one queued DVC experiment per attacker, from the long profile (quick's
# pretrained models and budgets, the paper's horizons: Experiment 1 over 50 rounds, measured every 5). Then
# `fedmeta depth` collects the finished ones into metrics/depth/.
#   bash scripts/depth.sh                       # the whole sweep, deepest fixed attacker first
#   bash scripts/depth.sh 5000x2 1000x50-random # some runs: EPISODESxEPOCHS, then -random (attack.target_output:
#                                               # random), -seedN, -paperlr (the continuation at the paper's ε, η)
#   bash scripts/depth.sh --attack 50000x2      # only the attack and positions stages (the rest reuses them later)
#   bash scripts/depth.sh --exp1 50000x2        # those and Experiment 1, without Experiments 2 and 3
# Experiments are named depth-<run> (depth-<run>-attack, depth-<run>-exp1); an existing one of that name is replaced.
# Parts finish, and are collected, one at a time: a sweep stopped midway keeps what it had finished.
# Runs use FEDMETA_KERNELS=portable unless it is set, so that their bytes are the same on every CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true PATH="$PWD/.venv/bin:$PATH"
export FEDMETA_KERNELS=${FEDMETA_KERNELS:-portable}
git rev-parse --git-dir >/dev/null 2>&1 || { echo "depth: run it inside the git clone of fedmeta" >&2; exit 1; }

deepest=50000x2
part=
runs=()
for arg in "$@"; do
    case $arg in
        --attack) part=attack ;;
        --exp1) part=exp1 ;;
        *) runs+=("$arg") ;;
    esac
done
if [ ${#runs[@]} -eq 0 ]; then  # the sweep in the order that answers most first (docs/depth.md)
    runs=("$deepest" 5000x2 500x2 50x2 1000x50 "$deepest-random" 5000x2-random 1000x50-random
        "$deepest-seed1" "$deepest-seed2" "$deepest-paperlr")
fi

stages=(positions@exclude positions@include)
[ "$part" = attack ] || stages+=(continue@exclude continue@include)
[ -n "$part" ] || stages+=(finetune@exclude finetune@include defend@exclude defend@include)
flags_of() {  # RUN → the -S overrides that make it, or a one-line error
    local run=$1 rest episodes epochs
    [[ $run =~ ^([0-9]+)x([0-9]+)((-random|-seed[0-9]+|-paperlr)*)$ ]] ||
        { echo "depth: RUN must be EPISODESxEPOCHS[-random][-seedN][-paperlr], got '$run'" >&2; return 2; }
    episodes=${BASH_REMATCH[1]} epochs=${BASH_REMATCH[2]} rest=${BASH_REMATCH[3]}
    local out=(-S profile=long -S "profiles.long.attack_episodes=$episodes"
        -S "profiles.long.attack_inner_epochs=$epochs")
    # Experiments 2 and 3 at the paper's 500 steps for the deepest fixed attacker only; 50 (quick's) elsewhere.
    if [[ ${run%%-*} != "$deepest" || $rest == *-random* ]]; then
        out+=(-S profiles.long.finetune_steps=50 -S profiles.long.record_every=10)
    fi
    [[ $rest == *-random* ]] && out+=(-S attack.target_output=random)
    [[ $rest =~ -seed([0-9]+) ]] && out+=(-S "seed=${BASH_REMATCH[1]}")
    [[ $rest == *-paperlr* ]] && out+=(-S +profiles.long.continuation_outer_step=0.1
        -S +profiles.long.continuation_inner_lr=0.001)
    printf '%s\n' "${out[@]}"
}
for run in "${runs[@]}"; do flags_of "$run" >/dev/null || exit 2; done

for run in "${runs[@]}"; do
    name="depth-$run${part:+-$part}"
    mapfile -t flags < <(flags_of "$run")
    targets=("${stages[@]}")
    # The paper's ε and η change only Experiment 1: the other stages are those of the run without -paperlr.
    [[ $run == *-paperlr* ]] && targets=(continue@exclude continue@include)
    dvc exp remove "$name" >/dev/null 2>&1 || true
    dvc exp run --queue -n "$name" "${flags[@]}" "${targets[@]}"
done
# One worker: a second would run another experiment beside the first, on the same cores. PYTHONPATH=. makes each stage
# import the code of its own experiment folder (.dvc/tmp/exps/...), not this checkout's editable install, so that
# editing the checkout while a sweep runs cannot enter a queued run.
pgrep -f "dvc exp queue-worker" >/dev/null || PYTHONPATH=. dvc queue start -j 1 >/dev/null
echo "depth: queued ${#runs[@]} run(s); follow with 'dvc queue status', collect with 'fedmeta depth'"
