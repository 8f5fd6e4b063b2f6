#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a lent GPU machine, from the repository root, without `pip install`:
# the repo goes on PYTHONPATH, and wheels carried in .whl/ (e.g. pydantic, which only kvprobe's CLI
# and its tests import) are installed into /tmp/site first. The JSON lands in $OUT when it is set
# (the device tool's output folder), else in ./gpu_check.json. Extra arguments go to the script.
#
#   bash benchmarks/gpu_check.sh                    # the whole check, about 8 minutes
#   bash benchmarks/gpu_check.sh --steps toy        # one step
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-.}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null | tee "$out/nvidia_smi.txt"
python3 benchmarks/gpu_check.py --threads 4 --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
