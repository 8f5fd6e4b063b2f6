#!/usr/bin/env bash
# Rehearse the GPU check on CPU as it will run on a bare GPU machine without internet (issue 25):
#
#   bash benchmarks/gpu_rehearse.sh          # about 3-5 minutes on 2 cores; exit 0 and "rehearsal passed"
#
# With the network (preparing, as on this side of a device call):
#   1. `gpu_wheels.py prepare` fills .gpuwheels/ (kvprobe's wheel and what the GPU image lacks), run
#      by the project's .venv where there is one (it pins the versions installed there);
#   2. a fresh virtual environment gets torch and transformers, less what the folder carries for the
#      image (transformers pulls pydantic in through typer here; the image has no pydantic);
#   3. the working tree is copied as a device call sends it (tracked and untracked-not-ignored files,
#      and the carried .gpuwheels/), so nothing ignored here (an egg-info, a build) can help;
#   4. the GPU image's other packages that the check imports (h5py, scipy, scikit-learn, pytest), and
#      those the carried datasets imports (pandas, pyarrow, xxhash), are downloaded as wheels, to stand
#      in for the image later.
# Without the network (`unshare -n`: a new network namespace with only a loopback, checked first),
# in the copied tree:
#   5. bare: gpu_check.sh on the environment holding torch, transformers and .gpuwheels alone; every
#      step must end skipped, naming the modules it lacks, and the report must be written;
#   6. as the image: the stand-ins installed with --no-index, then gpu_check.sh --rehearse; flex32k,
#      flex, qwen3, toy and pytest must pass, vllm must be skipped naming vllm, every package the folder
#      carries must have been found where gpu_check.sh installed it, and they must import there
#      (datasets, pydantic, kvprobe.config, the SFT's tokenised table);
#   7. the folder's CPython 3.12 wheels (the GPU image's Python) installed with --no-index into a
#      bare 3.12 and imported, where a python3.12 is on this machine.
# gpu_check.sh installs the wheels exactly as on the GPU machine (`gpu_wheels.py plan`, then
# `pip install --no-index --no-deps --find-links .gpuwheels --target DIR`). This machine's CPython is
# 3.11 (its offline torch 2.13.0 CPU wheel is cp311), so steps 5-6 run CPython 3.11; the folder holds
# pydantic-core for both. The work folder is $REHEARSE_DIR (default /tmp/kvprobe-gpu-rehearse).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work="${REHEARSE_DIR:-/tmp/kvprobe-gpu-rehearse}"
python="${REHEARSE_PYTHON:-python3}"   # the fresh environment's interpreter
prepare_python="${REHEARSE_PREPARE_PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
python312="${REHEARSE_PYTHON312:-}"
if [ -z "$python312" ]; then  # a python3.12 that runs (a pyenv shim may not), else pyenv's own
    for candidate in "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
        if [ -n "$candidate" ] && "$candidate" --version >/dev/null 2>&1; then python312=$candidate; break; fi
    done
fi
torch_pin="torch==2.13.0"                 # this machine's offline CPU build (the GPU image has 2.11.0+cu130)
transformers_pin="transformers==5.17.0"   # the GPU image's
# the image's packages (KINDS.md lists them) that the check imports, and those the carried datasets needs
image_pins="h5py scipy scikit-learn pytest pandas pyarrow xxhash"
say() { printf '\n[rehearse] %s\n' "$*"; }
pip_quiet() {  # pip, without its warnings about this machine's configured local index folders
    "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

unset PYTHONPATH PIP_FIND_LINKS
export PYTHONNOUSERSITE=1 PYTHONUNBUFFERED=1
rm -rf "$work"
mkdir -p "$work"

say "1. preparing .gpuwheels/"
"$prepare_python" benchmarks/gpu_wheels.py prepare

say "2. a fresh virtual environment with $torch_pin and $transformers_pin only ($("$python" --version))"
"$python" -m venv "$work/venv"
venv="$work/venv/bin/python"
pip_quiet "$venv" -m pip install -q --disable-pip-version-check "$torch_pin" "$transformers_pin"
# transformers pulls in pydantic here (through typer); the GPU image has none of the packages the folder
# carries for it (KINDS.md's list), so they go: the folder alone must supply them, as it will there
lacking=$("$venv" -c "import json; m = json.load(open('.gpuwheels/manifest.json'))['packages']
print(' '.join(n for n, p in m.items() if not p['in_image'] and n != 'kvprobe'))")
[ -z "$lacking" ] || "$venv" -m pip uninstall -y -q --disable-pip-version-check $lacking
"$venv" -m pip list --disable-pip-version-check --format=freeze > "$work/venv-packages.txt"
echo "  removed $lacking; the environment holds: $(tr '\n' ' ' < "$work/venv-packages.txt")"

say "3. the working tree as a device call sends it (tracked and untracked-not-ignored files) and .gpuwheels/"
tree="$work/tree"
mkdir -p "$tree"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -f "$f" ] && printf '%s\0' "$f"
done | xargs -0 cp --parents -t "$tree"
cp -r .gpuwheels "$tree/"
echo "  $(du -sh "$tree" | cut -f1) in $tree"

say "4. the image's other packages, as wheels: $image_pins"
pip_quiet "$venv" -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$work/image-wheels" \
    $image_pins

say "5-7. without the network, in the copied tree"
export REHEARSE_WORK="$work" REHEARSE_VENV="$venv" REHEARSE_IMAGE_PINS="$image_pins" REHEARSE_PY312="$python312"
cd "$tree"
unshare -n bash -euo pipefail <<'OFFLINE'
say() { printf '\n[rehearse] %s\n' "$*"; }
work=$REHEARSE_WORK
venv=$REHEARSE_VENV
export PIP_CONFIG_FILE=/dev/null   # no index, no find-links from this machine's pip config: only the folders named
interfaces=$("$venv" -c "import socket; print(' '.join(n for _, n in socket.if_nameindex()))")
[ "$interfaces" = "lo" ] || { echo "network interfaces besides lo: $interfaces" >&2; exit 1; }
if "$venv" -c "import socket; socket.create_connection(('pypi.org', 443), timeout=5)" 2>/dev/null; then
    echo "pypi.org is reachable: the network is not off" >&2; exit 1
fi
say "network off: the only interface is '$interfaces', pypi.org is unreachable"

expect() {  # expect REPORT MODE SITE: check a report with the venv's python
    "$venv" -m pip list --disable-pip-version-check --format=freeze > "$3.before"
    "$venv" - "$@" <<'PY'
import json, re, sys
path, mode, site = sys.argv[1:]
report = json.load(open(path))
steps, versions = report["steps"], report["environment"]["versions"]
status = {k: v["status"] for k, v in steps.items()}
there = {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower() for line in open(site + ".before")}
carried = [n for n, p in json.load(open(".gpuwheels/manifest.json"))["packages"].items()
           if not p["in_image"] and n not in there]
for name in carried:  # what the environment lacked came from the folder, through gpu_check.sh's install
    print(f"  {name} {versions[name]}")
    if site not in versions[name]:
        sys.exit(f"rehearsal: {name} was not installed from the wheel folder into {site}: {versions[name]}")
if mode == "bare":
    bad = {k: s for k, s in status.items() if not s.startswith("skipped: needs ")}
else:
    bad = {k: s for k, s in status.items() if k != "vllm" and s != "ok"}
    if status["vllm"] != "skipped: needs vllm (not installed)":
        bad["vllm"] = status["vllm"]
    bad.update({f"{k} check {c}": "false" for k, v in steps.items() for c, ok in v.get("checks", {}).items() if not ok})
for k, s in status.items():
    print(f"  {k}: {s}")
if bad:
    sys.exit(f"rehearsal: unexpected {mode} results: {bad}")
PY
}

say "5. bare: torch, transformers and .gpuwheels only"
OUT="$work/bare" GPU_SITE="$work/site-bare" PYTHON="$venv" GPU_CHECK_THREADS=2 \
    bash benchmarks/gpu_check.sh --rehearse > "$work/bare.txt" 2>&1 || { cat "$work/bare.txt"; exit 1; }
expect "$work/bare/gpu_check.json" bare "$work/site-bare"

say "6. as the GPU image: the stand-ins installed with --no-index, then the check"
"$venv" -m pip install -q --no-index --find-links "$work/image-wheels" $REHEARSE_IMAGE_PINS
OUT="$work/image" GPU_SITE="$work/site-image" PYTHON="$venv" GPU_CHECK_THREADS=2 \
    bash benchmarks/gpu_check.sh --rehearse || { echo "gpu_check.sh exited non-zero" >&2; exit 1; }
expect "$work/image/gpu_check.json" image "$work/site-image"
PYTHONPATH="$PWD:$work/site-image" "$venv" -c "
import datasets, pydantic, kvprobe.config, kvprobe.training.tokenized
print(f'  the carried packages import beside the image\'s: datasets {datasets.__version__}, pydantic {pydantic.VERSION}')"

if [ -n "$REHEARSE_PY312" ]; then
    say "7. the CPython 3.12 wheels on $("$REHEARSE_PY312" --version)"
    pins=$("$REHEARSE_PY312" benchmarks/gpu_wheels.py plan .gpuwheels)
    "$REHEARSE_PY312" -m pip install -q --no-index --no-deps --disable-pip-version-check --root-user-action=ignore --target "$work/site-312" \
        --find-links .gpuwheels $pins
    PYTHONPATH="$work/site-312" "$REHEARSE_PY312" -c "
import importlib.metadata as md, pydantic, pydantic_core
kinds = sorted(e.name for e in md.entry_points(group='kvprobe.model_kinds'))
print(f'  cp312: pydantic {pydantic.VERSION}, pydantic-core {pydantic_core.__version__}, kvprobe {md.version(\"kvprobe\")}, model kinds {kinds}')
assert kinds == ['toy']"
else
    say "7. skipped: no python3.12 here (set REHEARSE_PYTHON312) - the CPython 3.12 wheels were not installed"
fi
OFFLINE

say "rehearsal passed: reports in $work/bare and $work/image"
