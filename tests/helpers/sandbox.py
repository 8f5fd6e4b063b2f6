"""The paths of a run's store, and the ways a test damages a copy of a run (of `cli_support.FAST`),
for the bad-input and recovery tests (tests/cli/; their fixtures `tiny_run`, `sandbox` and
`no_network` are in tests/cli/conftest.py).

`DAMAGE` maps a name to a function that damages the run folder it is given.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import h5py

STORE = Path("stores") / "memento"
SHARD0, SHARD1 = STORE / "shards" / "shard_000000.h5", STORE / "shards" / "shard_000001.h5"


NETWORK: list = []  # every attempt to reach the network (a name lookup or a connection)


# ----------------------------------------------------------------------------- damage


def truncate(path: Path, size: int = 2000) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def flip_feature_byte(shard: Path) -> None:
    """Flip one bit inside the first stored chunk of a feature dataset (the data, not metadata)."""
    with h5py.File(shard, "r") as f:
        info = f["features/memento/+0/tail_mean"].id.get_chunk_info(0)
    data = bytearray(shard.read_bytes())
    data[info.byte_offset + info.size // 2] ^= 0x10
    shard.write_bytes(bytes(data))


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def unprobed(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """A store damage, with the probe results removed so that probing must read the store."""
    def setup(run: Path) -> None:
        shutil.rmtree(run / "probes")
        damage(run)
    return setup


def swap_store(run: Path) -> None:
    shutil.rmtree(run / STORE)
    shutil.copytree(run.parent / "other_store", run / STORE)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "shard-truncated": unprobed(lambda run: truncate(run / SHARD0)),
    "shard-deleted": unprobed(lambda run: (run / SHARD1).unlink()),
    "shard-flipped": unprobed(lambda run: flip_feature_byte(run / SHARD0)),
    "shard-header": unprobed(lambda run: (run / SHARD1).write_bytes(b"garbage!" + (run / SHARD1).read_bytes()[8:])),
    "index-truncated": unprobed(lambda run: truncate(run / STORE / "kvstore.h5", 1000)),
    "store-deleted": unprobed(lambda run: shutil.rmtree(run / STORE)),
    "store-swapped": unprobed(swap_store),
    "model-record": unprobed(lambda run: edit_json(run / "model.json", lambda d: d.update(param_hash="0" * 64))),
    "spec-changed": unprobed(lambda run: edit_json(run / "config.json",
                                                   lambda d: d["config"]["capture"].update(max_tokens=2))),
    "samples-changed": unprobed(lambda run: edit_json(run / "config.json",
                                                      lambda d: d["config"]["data"].update(n_samples=400))),
    "config-malformed": lambda run: (run / "config.json").write_text('{"config": {'),
    "config-no-key": lambda run: (run / "config.json").write_text('{"seed": 0}'),
    "config-invalid": lambda run: edit_json(run / "config.json", lambda d: d["config"]["capture"].update(bogus=1)),
    "config-binary": lambda run: (run / "config.json").write_bytes(b"\xff\xfe\x00garbage"),
    "npz-deleted": lambda run: (run / "probes" / "memento.npz").unlink(),
    "npz-truncated": lambda run: truncate(run / "probes" / "memento.npz", 100),
    "json-malformed": lambda run: (run / "probes" / "memento.json").write_text('{"rows": ['),
}
