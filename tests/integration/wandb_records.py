"""Read an offline W&B run back: the records of its `.wandb` file, parsed with wandb's own protobuf classes.

The file is wandb's LevelDB-style log (the Go core writes it; wandb 0.31 ships no Python reader):
a 7-byte header (b":W&B", magic 0xBEE1 little-endian, version 0), then 32 KiB blocks of chunks,
each chunk a 7-byte header (CRC-32C, length uint16 LE, type: 1 full, 2 first, 3 middle, 4 last)
and its bytes; a block's tail shorter than a chunk header is zero padding. Each record is one
serialized `wandb.proto.wandb_internal_pb2.Record`. pyproject pins the wandb version whose
format and protobuf definitions this relies on.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[: len(HEADER)] == HEADER, f"{path}: not a .wandb file of the pinned format (header {data[:7]!r})"
    records: list[wandb_internal_pb2.Record] = []
    pos, pending = len(HEADER), b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero fill at the end of a block (or of a file cut by a kill)
            pos += left_in_block
            continue
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def of_type(records: list[wandb_internal_pb2.Record], kind: str) -> list[Any]:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(records: list[wandb_internal_pb2.Record]) -> list[dict[str, Any]]:
    """Every logged step as {key: value} (values decoded from their JSON)."""
    steps = []
    for h in of_type(records, "history"):
        steps.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in h.item})
    return steps


def summary(records: list[wandb_internal_pb2.Record]) -> dict[str, Any]:
    """The run summary as its last summary records leave it."""
    out: dict[str, Any] = {}
    for s in of_type(records, "summary"):
        for item in s.update:
            out["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return out
