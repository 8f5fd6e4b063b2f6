"""`kvprobe export`: a run's stores (or one store) as a Hugging Face `datasets` dataset or safetensors files."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import NETWORK_OPT_IN, UsageError, add_parser, network_allowed

__all__ = ["NETWORK_OPT_IN", "register"]

FORMATS = ("datasets", "safetensors")  # kvprobe.export.FORMATS, named here so --help loads no library


def _stores(path: Path, condition: str | None) -> dict[str, Path]:
    """What to export: {"": the store} for a store, {condition: its store} for a run's stores/."""
    from ..store import is_store

    if not path.is_dir():
        raise UsageError(f"{path}: no such run directory or store")
    if is_store(path):
        if condition is not None:
            raise UsageError(f"--condition: {path} is a single store, not a run directory; drop --condition")
        return {"": path}
    found = {p.name: p for p in sorted((path / "stores").glob("*")) if is_store(p)}
    if not found:
        raise UsageError(f"{path}: holds no KV store (neither a store nor a run directory with stores/)")
    if condition is None:
        return found
    if condition not in found:
        raise UsageError(f"--condition: {path} has no condition {condition!r} (its conditions: {', '.join(found)})")
    return {condition: found[condition]}


def _check_push(repo: str | None) -> None:
    """--push-to-hub needs the network opt-in too; refused before anything is written."""
    if repo is None:
        return
    if not network_allowed():
        raise UsageError(f"--push-to-hub: pushing to the hub reaches the network; set {NETWORK_OPT_IN}=1 to allow it")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UsageError(f"--push-to-hub: {repo!r} is not a hub repository id (OWNER/NAME)")


def _export(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise UsageError(f"--format: unknown format {args.format!r} (known: {', '.join(FORMATS)})")
    _check_push(args.push_to_hub)
    stores = _stores(Path(args.path), args.condition)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: --out already exists and is not an empty folder; choose a new output path")
    from ..export import export_stores  # datasets, safetensors and h5py: only for the command itself

    export_stores(stores, out, args.format, progress=not args.quiet)
    names = ", ".join(name for name in stores if name) or str(args.path)
    print(f"exported {names} as {args.format} to {out}")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.push_to_hub, repo_type="dataset", exist_ok=True)
        api.upload_folder(repo_id=args.push_to_hub, folder_path=str(out), repo_type="dataset")
        print(f"pushed {out} to the hub dataset {args.push_to_hub}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub, "export", "write KV stores as a Hugging Face `datasets` dataset (Arrow) or safetensors files",
        "  kvprobe export runs/repro --format datasets --out export/repro\n"
        "  kvprobe export runs/repro --condition memento --format safetensors --out export/memento\n"
        "  kvprobe export runs/repro/stores/memento --format safetensors --out export/memento\n"
        f"  {NETWORK_OPT_IN}=1 kvprobe export runs/repro --format datasets --out export/repro --push-to-hub me/kv",
    )
    p.add_argument("path", help="a run directory (every condition's store under stores/) or one store")
    p.add_argument("--format", required=True, metavar="FORMAT",
                   help=f"{' or '.join(FORMATS)} (docs/store.md, 'Exporting', names the columns and files)")
    p.add_argument("--out", required=True, help="a new folder (or an empty one); a run's conditions go to OUT/NAME")
    p.add_argument("--condition", default=None, metavar="NAME", help="export only this condition of a run")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help=f"then upload OUT to this hub dataset repository (OWNER/NAME); needs {NETWORK_OPT_IN}=1")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_export)
