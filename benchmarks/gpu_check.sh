#!/usr/bin/env bash
# The GPU check on a lent GPU machine (no internet, no package index), from the repository root:
# installs what that machine lacks from the carried wheel folder, then runs benchmarks/gpu_check.py.
#
#   python benchmarks/gpu_wheels.py prepare        # first, here, with the network: fills .gpuwheels/
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpuwheels"], timeout_s=480)   # the device call
#   bash benchmarks/gpu_check.sh --steps flex32k   # one step; extra arguments go to gpu_check.py
#
# `gpu_wheels.py plan` names the carried packages this Python lacks (or has too old); pip installs
# those alone, --no-index, into $GPU_SITE (default /tmp/site), which goes on PYTHONPATH after the
# repository. The JSON report, the check's log and each step's output land in $OUT where it is set
# (the device tool's output folder), else in out/gpu_check/ (git-ignored). Exit status: the check's.
# Time: the install takes seconds; the check's steps have 420 s in all (gpu_check.py's BUDGET_S).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu_check}"
export GPU_WHEELS="${GPU_WHEELS:-.gpuwheels}"
wheels=$GPU_WHEELS
site="${GPU_SITE:-/tmp/site}"
py="${PYTHON:-python3}"
mkdir -p "$out"
if [ -d "$wheels" ]; then
    need=$("$py" benchmarks/gpu_wheels.py plan "$wheels") || { echo "gpu_check.sh: gpu_wheels.py plan failed" >&2; exit 2; }
    if [ -n "$need" ]; then
        # shellcheck disable=SC2086  # one pin per word
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --upgrade --find-links "$wheels" --target "$site" $need \
            || { echo "gpu_check.sh: installing $need from $wheels failed" >&2; exit 2; }
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_check.sh: no $wheels folder: nothing installed (prepare it with 'python benchmarks/gpu_wheels.py prepare' and carry it)" >&2
fi
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia_smi.txt"
fi
"$py" benchmarks/gpu_check.py --threads "${GPU_CHECK_THREADS:-4}" --out "$out/gpu_check.json" "$@" 2>&1 \
    | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
