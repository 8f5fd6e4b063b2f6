"""The wheels the GPU check carries to a GPU machine without internet, and which of them to install there.

The lent GPU machine (device README: CPython 3.12, torch 2.11, transformers 5.17, no network, no
package index) has most of what kvprobe needs. This script prepares the rest as wheels in one
folder, `.gpuwheels/` (git-ignored), carried with the working tree, and installs there only what
that machine lacks:

    python benchmarks/gpu_wheels.py prepare            # here, with the network: build and download
    python3 benchmarks/gpu_wheels.py plan .gpuwheels    # there: the `name==version` pins to install

`prepare` builds kvprobe's own wheel (`pip wheel --no-deps`, from a copy of the sources without
the toy checkpoints: those travel in the working tree, which is on PYTHONPATH before the wheel),
and downloads, with their dependencies, kvprobe's requirements that the GPU image lacks
(`IMAGE_HAS` below: today pydantic), for CPython 3.12 manylinux x86_64 (the image) and 3.11
(this machine's, where the local torch wheel lets `benchmarks/gpu_rehearse.sh` rehearse the
check on the same folder). A dependency the image has is kept only when it is pure Python, so
that `plan` can install it where the image's version is older than a carried package needs (a
compiled one is left out, and `prepare` says so). It writes `manifest.json`: every package,
its version, the versions the carried packages and kvprobe need of it, and every file with its
size and SHA-256; then it checks the size limits: the folder and the tracked working tree
travel together, at most 64 MiB (device README).

`plan` runs on the target machine before anything is installed, with the standard library and
`packaging` (or pip's copy of it): it prints one pin per package that is not
installed there or whose installed version is outside what is needed, and says why on stderr.
kvprobe itself is always installed. `gpu_check.sh` feeds the pins to `pip install --no-index
--no-deps --find-links .gpuwheels --target DIR`, which picks each pin's wheel for the running
interpreter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCHEMA = "kvprobe-gpu-wheels/1"
DEFAULT_DIR = ROOT / ".gpuwheels"
PYTHONS = ("3.12", "3.11")  # the GPU image's CPython, and this machine's (the rehearsal's local torch wheel is cp311)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MIB = 2**20
TRAVEL_LIMIT = 64 * MIB  # the working tree and the carried folder together (device README, "Limits")
# What the check needs beyond kvprobe's own requirements: the `train` extra (the gpu tests run the SFT)
# and the pytest step. The `gpu` extra (vllm, flash-attn) is not carried: the vllm step skips without it.
CARRIED_EXTRAS = ("train",)
CHECK_NEEDS = ("pytest>=8",)
# Versions of pure-Python packages the GPU image is known to hold (KINDS.md's pip list, 2026-11): the
# resolution keeps them fixed, so that a carried fallback wheel of one is the image's own version. Compiled
# packages of the image (numpy, pandas, pyarrow) are never carried; fixing their versions here would only
# send pip's resolver backtracking through every pandas release.
IMAGE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "transformers": "5.17.0"}
# The distributions of the GPU image ('cuda'), as the device's KINDS.md lists them ("Python packages
# already there", read on a machine running it on 2026-11-17): torch 2.11.0, transformers 5.17.0 and the rest.
IMAGE_HAS = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name: `Typing_Extensions` -> `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(filename: str) -> tuple[str, str]:
    """(canonical name, version) from a wheel's file name."""
    name, version = filename.split("-")[:2]
    return canonical(name), version


# ----------------------------------------------------------------------------- prepare (here, with the network)


def kvprobe_requirements() -> list[str]:
    """kvprobe's runtime requirements and those of CARRIED_EXTRAS, as pyproject.toml declares them."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for e in CARRIED_EXTRAS for r in project.get("optional-dependencies", {}).get(e, [])]
    return list(dict.fromkeys(project["dependencies"] + extras))


def lacking_requirements() -> list[str]:
    """kvprobe's and the check's requirements that the GPU image does not meet by name (today: pydantic)."""
    from packaging.requirements import Requirement

    return [r for r in kvprobe_requirements() + list(CHECK_NEEDS) if canonical(Requirement(r).name) not in IMAGE_HAS]


def build_kvprobe_wheel(dest: Path) -> Path:
    """kvprobe's wheel, built from a copy of the sources without the toy checkpoints (MBs that travel anyway)."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy2(ROOT / name, src / name)
        shutil.copytree(ROOT / "kvprobe", src / "kvprobe", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copytree(ROOT / "toy_models", src / "toy_models",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "checkpoints"))
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(src)])
    return next(dest.glob("kvprobe-*.whl"))


def run(cmd: list[str], timeout_s: int = 600) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"gpu_wheels: {' '.join(cmd[:6])} ... took over {timeout_s} s") from None
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise SystemExit(f"gpu_wheels: {' '.join(cmd[:6])} ... failed: {tail[0]}")


def pin(requirement: str) -> str:
    """`requirement` pinned to the version installed here, where that satisfies it (the version the tests ran with)."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    try:
        here = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return requirement
    return f"{req.name}=={here}" if req.specifier.contains(here, prereleases=True) else requirement


def pip_target_args(python: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for plat in PLATFORMS:
        args += ["--platform", plat]
    return args


def resolve(requirements: list[str], python: str, work: Path) -> list[dict]:
    """`requirements` and all they need, for CPython `python` on manylinux x86_64, the image's known
    versions held fixed (pip's resolver; nothing downloaded): per package its name, version, wheel
    file name, and the requirements it declares there."""
    constraints = work / "image-constraints.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in IMAGE_VERSIONS.items()))
    report = work / f"resolve-{python}.json"
    run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report),
         "--target", str(work / "unused"), "-c", str(constraints), *pip_target_args(python), *requirements],
        timeout_s=180)
    return [{"name": canonical(i["metadata"]["name"]), "version": i["metadata"]["version"],
             "file": i["download_info"]["url"].rsplit("/", 1)[-1],
             "requires": applicable(i["metadata"].get("requires_dist", []), python)}
            for i in json.loads(report.read_text())["install"]]


def applicable(requirements: list[str], python: str) -> list[str]:
    """The requirements that apply on CPython `python` on Linux x86_64 without extras."""
    from packaging.requirements import Requirement

    env = {"python_version": python, "python_full_version": f"{python}.0", "extra": "",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}
    reqs = [Requirement(r) for r in requirements]
    return [str(r) for r in reqs if r.marker is None or r.marker.evaluate(env)]


def download(pins: list[str], python: str, dest: Path) -> list[Path]:
    """The wheels of `pins` (name==version, no dependencies) for CPython `python` on manylinux x86_64."""
    dest.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), *pip_target_args(python), *pins])
    return sorted(dest.glob("*.whl"))


def is_pure(wheel_file: str) -> bool:
    """A wheel that runs on any CPython 3 (py3-none-any, py2.py3-none-any, py312-none-any, ...)."""
    return wheel_file.endswith("-none-any.whl")


def prepare(folder: Path, pythons: tuple[str, ...]) -> dict:
    """Build and download into `folder` (emptied first); write and return its manifest."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    direct = kvprobe_requirements() + list(CHECK_NEEDS)
    lacking = lacking_requirements()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    kept: dict[str, Path] = {}  # file name -> path in the folder
    left_out: dict[str, str] = {}  # name -> why
    sources = [("kvprobe", r) for r in direct]  # (who, requirement): what is needed of each package
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        kvprobe = build_kvprobe_wheel(work / "kvprobe")
        kept[kvprobe.name] = kvprobe
        for python in pythons:
            try:  # the versions the tests here ran with, where the image's versions allow them
                resolved = resolve([pin(r) for r in lacking], python, work) if lacking else []
            except SystemExit:
                resolved = resolve(lacking, python, work)
            wanted = []
            for item in resolved:
                sources += [(item["name"], r) for r in item["requires"]]
                if item["name"] in IMAGE_HAS and not is_pure(item["file"]):
                    left_out[item["name"]] = f"{item['name']}: the image has it, and its wheels are compiled"
                else:
                    wanted.append(f"{item['name']}=={item['version']}")
            for whl in download(wanted, python, work / python) if wanted else []:
                kept.setdefault(whl.name, whl)
        for name, path in kept.items():
            shutil.copy2(path, folder / name)
    needed: dict[str, SpecifierSet] = {}
    why: dict[str, set[str]] = {}
    for owner, r in sources:
        req = Requirement(r)
        name = canonical(req.name)
        needed[name] = needed.get(name, SpecifierSet()) & req.specifier
        why.setdefault(name, set()).add(owner)
    on_image = {name: {"needed": str(needed.get(name, "")), "needed_by": sorted(why.get(name, set())), "why": w}
                for name, w in sorted(left_out.items())}
    packages = {}
    for whl in sorted(folder.glob("*.whl")):
        name, version = wheel_name(whl.name)
        entry = packages.setdefault(name, {"version": version, "needed": str(needed.get(name, "")),
                                           "needed_by": sorted(why.get(name, {"the check"})),
                                           "in_image": name in IMAGE_HAS, "files": []})
        if entry["version"] != version:
            raise SystemExit(f"gpu_wheels: two versions of {name} ({entry['version']}, {version}): pin one")
        entry["files"].append({"file": whl.name, "bytes": whl.stat().st_size,
                               "sha256": hashlib.sha256(whl.read_bytes()).hexdigest()})
    manifest = {"schema": SCHEMA, "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "made_with": f"Python {platform.python_version()}", "pythons": list(pythons),
                "platforms": list(PLATFORMS), "image_versions": IMAGE_VERSIONS, "lacking_in_image": lacking,
                "packages": packages, "left_out": on_image}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def tracked_bytes() -> int:
    """Bytes of the files git tracks here: the working tree that travels with the folder."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return sum((ROOT / f).stat().st_size for f in files.split("\0") if f and (ROOT / f).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def report(folder: Path, manifest: dict) -> int:
    """Print the folder's contents and sizes; 1 when it breaks a size limit."""
    size, tree = folder_bytes(folder), tracked_bytes()
    print(f"{folder}: {len(list(folder.glob('*.whl')))} wheels, {size / MIB:.1f} MiB "
          f"(for CPython {', '.join(manifest['pythons'])}, manylinux x86_64)")
    for name, p in manifest["packages"].items():
        files = ", ".join(f"{f['file']} ({f['bytes'] / MIB:.2f} MiB)" for f in p["files"])
        note = "  [the image has it; installed only if its version is outside that]" if p["in_image"] else ""
        print(f"  {name} {p['version']}: needed {p['needed'] or 'any'} by {', '.join(p['needed_by'])}{note}")
        print(f"    {files}")
    for name, item in manifest["left_out"].items():
        print(f"  left out: {item['why']}; needed {item['needed'] or 'any'} by {', '.join(item['needed_by'])}")
    print(f"tracked working tree {tree / MIB:.1f} MiB + folder {size / MIB:.1f} MiB = {(tree + size) / MIB:.1f} MiB "
          f"of the {TRAVEL_LIMIT // MIB} MiB a device call carries")
    if tree + size > TRAVEL_LIMIT:
        print(f"gpu_wheels: the folder and the working tree make {(tree + size) / MIB:.1f} MiB, over the "
              f"{TRAVEL_LIMIT // MIB} MiB a device call carries", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- plan (there, before installing)


def plan(folder: Path) -> list[str]:
    """`name==version` for each carried package this interpreter lacks or has outside what is needed."""
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # a bare interpreter: pip's own copy
        from pip._vendor.packaging.specifiers import SpecifierSet

    path = folder / "manifest.json"
    if not path.exists():
        raise SystemExit(f"gpu_wheels: {path} not found: run `python benchmarks/gpu_wheels.py prepare` where "
                         "the network is, and carry the folder")
    manifest = json.loads(path.read_text())
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    if py not in manifest["pythons"]:
        raise SystemExit(f"gpu_wheels: {folder} holds wheels for CPython {', '.join(manifest['pythons'])}, "
                         f"not this Python {py}: prepare it with --python {py}")
    pins = []
    for name, p in manifest["packages"].items():
        try:
            here = metadata.version(name)
        except metadata.PackageNotFoundError:
            here = None
        needed = SpecifierSet(p["needed"])
        if name == "kvprobe":
            why = "always (the working tree's own package: metadata and entry points)"
        elif here is None:
            why = "not installed here"
        elif not needed.contains(here, prereleases=True):
            why = f"{here} here, {p['needed']} needed"
        else:
            print(f"gpu_wheels: {name}: {here} here satisfies {p['needed'] or 'any'}", file=sys.stderr)
            continue
        print(f"gpu_wheels: {name}: installing {p['version']}: {why}", file=sys.stderr)
        pins.append(f"{name}=={p['version']}")
    for name, p in manifest.get("left_out", {}).items():  # compiled, so not carried: the image's must do
        try:
            here = metadata.version(name)
        except metadata.PackageNotFoundError:
            here = None
        if here is None or not SpecifierSet(p["needed"]).contains(here, prereleases=True):
            print(f"gpu_wheels: warning: {name} {here or 'is not installed'} here, {p['needed'] or 'any'} needed by "
                  f"{', '.join(p['needed_by'])}, and the folder has no wheel of it ({p['why']})", file=sys.stderr)
    return pins


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build kvprobe's wheel and download what the GPU image lacks")
    p.add_argument("folder", nargs="?", type=Path, default=DEFAULT_DIR)
    p.add_argument("--python", action="append", help=f"CPython versions to download for (default {' '.join(PYTHONS)})")
    s = sub.add_parser("size", help="print the folder's contents and check the size limits")
    s.add_argument("folder", nargs="?", type=Path, default=DEFAULT_DIR)
    q = sub.add_parser("plan", help="print the pins this interpreter lacks, one per line")
    q.add_argument("folder", nargs="?", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args(argv)
    if args.command == "plan":
        print("\n".join(plan(args.folder)))
        return 0
    if args.command == "prepare":
        manifest = prepare(args.folder, tuple(args.python or PYTHONS))
    else:
        manifest = json.loads((args.folder / "manifest.json").read_text())
    return report(args.folder, manifest)


if __name__ == "__main__":
    sys.exit(main())
