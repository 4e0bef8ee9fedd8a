#!/usr/bin/env bash
# Portable bytes across CPUs: a profile's stages with FEDMETA_KERNELS=portable, in a scratch clone of this commit run
# by this checkout's code, then the md5 of every output it wrote against docs/performance/portable_<profile>.md5,
# which another CPU wrote. The tiny profile runs at width 16, so that the compiled kernels run.
#   bash scripts/portable_check.sh [--profile P] [STAGE ...]          compare (default: tiny; the paper's stages,
#                                                                       Experiment 4 left out)
#   bash scripts/portable_check.sh --write [--profile P] [STAGE ...]  record this CPU's md5s instead
set -euo pipefail
cd "$(dirname "$0")/.."
write=0 profile=tiny
while [ $# -gt 0 ]; do
  case $1 in
    --write) write=1; shift ;;
    --profile) [ $# -ge 2 ] || { echo "portable_check: --profile needs a profile name" >&2; exit 2; }; profile=$2; shift 2 ;;
    *) break ;;
  esac
done
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(ablation continue@exclude continue@include positions@exclude positions@include heads@exclude heads@include)
bash scripts/setup.sh
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true FEDMETA_KERNELS=portable PATH="$PWD/.venv/bin:$PATH"
[ -n "$(ls data/raw/omniglot/*.zip 2>/dev/null)" ] || { echo "portable_check: no archives in data/raw/omniglot/ (run fedmeta prepare once, or link them there)" >&2; exit 1; }
PROFILE=$profile python - <<'EOF'
import os
import sys
import yaml
profile, profiles = os.environ["PROFILE"], yaml.safe_load(open("params.yaml"))["profiles"]
if profile not in profiles:
    sys.exit(f"portable_check: --profile {profile}: not a profile of params.yaml; allowed: {', '.join(profiles)}")
EOF
expected=$PWD/docs/performance/portable_$profile.md5
[ $write = 1 ] || [ -f "$expected" ] || { echo "portable_check: no md5s recorded for profile $profile (docs/performance/portable_$profile.md5); record them with --write" >&2; exit 2; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git clone -q . "$scratch/repo"
mkdir -p "$scratch/repo/data/raw/omniglot"
ln -s "$PWD"/data/raw/omniglot/*.zip "$scratch/repo/data/raw/omniglot/"
cd "$scratch/repo"
PROFILE=$profile python - <<'EOF'
import os
import yaml
params = yaml.safe_load(open("params.yaml"))
params["profile"] = profile = os.environ["PROFILE"]
if profile == "tiny":
    params["profiles"]["tiny"]["width"] = 16
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
EOF
touch "$scratch/start"
dvc repro --quiet "${stages[@]}"
find data/prepared checkpoints metrics -type f -newer "$scratch/start" ! -name '*.png' | sort | xargs md5sum > "$scratch/md5"
if [ $write = 1 ]; then
  cp "$scratch/md5" "$expected"
  echo "portable_check: $(wc -l < "$expected") md5s written to docs/performance/portable_$profile.md5"
  exit 0
fi
common=$(join -1 2 -2 2 <(sort -k2 "$expected") <(sort -k2 "$scratch/md5"))
differ=$(awk '$2 != $3 {print $1}' <<< "$common")
echo "portable_check: $(wc -l <<< "$common") files compared, $(grep -c . <<< "$differ" || true) differ${differ:+:}"
[ -z "$differ" ] || { echo "$differ" | sed 's/^/  /'; exit 1; }
