"""`kvprobe verify`: check every byte of a run's stores against the checksums recorded at capture."""

from __future__ import annotations

import argparse

from .common import UsageError, add_parser

__all__ = ["register"]


def _verify(args: argparse.Namespace) -> int:
    from ..experiment import verify_run
    from ..store import REPAIR, KVStore  # h5py: only for the command itself

    results = verify_run(args.path)
    bad = {store: problems for store, problems in results.items() if problems}
    for store, problems in results.items():
        n_shards = len(list((store / "shards").glob("shard_*.h5")))
        size = sum(p.stat().st_size for p in (store / "shards").glob("shard_*.h5"))
        status = "DAMAGED" if problems else "ok"
        print(f"{status:8} {store}  ({n_shards} shard(s), {size / 1e6:,.1f} MB)")
        for problem in problems:
            print(f"         {problem}")
    if bad:
        first = next(iter(bad.values()))[0]
        n = sum(len(p) for p in bad.values())
        raise UsageError(f"{n} problem(s) in {len(bad)} store(s), first: {first}; {REPAIR}")
    legacy, unrecorded = [], []  # no shard checksums; shard checksums but none of the index
    for store in results:
        with KVStore(store) as opened:
            if not opened.checksummed:
                legacy.append(store)
            elif not opened.index_checksummed:
                unrecorded.append(store)
    if legacy:
        print(f"{len(legacy)} store(s) predate checksums (written by an older kvprobe): their shards are present and "
              f"of HDF5 form, but their bytes cannot be checked: {', '.join(map(str, legacy))}")
    if unrecorded:
        print(f"note: {len(unrecorded)} store(s) predate index checksums (written by an older kvprobe): every shard "
              f"matches its checksum and the index opens, but its bytes cannot be checked: "
              f"{', '.join(map(str, unrecorded))}")
    print(f"every byte of {len(results) - len(legacy) - len(unrecorded)} store(s) matches its checksum")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub, "verify", "check every byte of a run's KV stores against the checksums recorded at capture",
        "  kvprobe verify runs/repro\n  kvprobe verify runs/repro/stores/memento",
    )
    p.add_argument("path", help="a run directory (every store under stores/ and sweep/) or one store")
    p.set_defaults(func=_verify)
