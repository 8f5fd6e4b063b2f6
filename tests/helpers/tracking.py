"""Reading tracking logs back: TensorBoard event files and W&B offline run files (`kvprobe --log-to`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

__all__ = ["tensorboard_log", "wandb_log"]


def tensorboard_log(run: Path) -> tuple[dict[str, float], dict[str, str], list[str]]:
    """One TensorBoard sub-run: ({scalar tag: value at step 0}, {text tag: text}, [image tags])."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {}
    for tag in tags["scalars"]:
        (event,) = acc.Scalars(tag)
        assert event.step == 0
        scalars[tag] = event.value
    texts = {t.removesuffix("/text_summary"): acc.Tensors(t)[0].tensor_proto.string_val[0].decode()
             for t in tags["tensors"]}
    return scalars, texts, list(tags["images"])


def _records(data: bytes):
    """The records of a W&B `.wandb` file: a 7-byte header, then LevelDB log blocks of 32 KiB, each record
    split into chunks with a 7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield pending
            pending = b""


def wandb_log(run: Path) -> tuple[dict, dict[str, object]]:
    """One W&B offline run directory: (its config, {key: value} of every history row logged, merged)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run.glob("run-*.wandb")
    config, history = {}, {}
    for data in _records(log.read_bytes()):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history[key] = json.loads(item.value_json)
    return config, history
