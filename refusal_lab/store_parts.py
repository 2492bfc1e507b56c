"""A store written in parts (sharded collection): the parts index and how the run is split into parts.

A sharded collect (`inference.shards=N`, one job per `inference.shard=i`) cuts the single run's
processing order into batches of the fixed `inference.batch_size` and gives global batch `k` to
shard `k % N`. Each shard writes its batches, in order, into its own store part (a complete
store of its own, refusal_lab.store's layout) wherever `inference.part_dir` points, and
registers it in the parts index: `parts.json` inside the folder where the single store would
be (`<artifacts>/collect/<fingerprint>.zarr/`)::

    {"format": "refusal_lab.store_parts", "format_version": 1,
     "fingerprint": parent fingerprint (the single run's collect fingerprint),
     "shards": N, "batch_size": b, "n_samples": samples of the whole run,
     "parts": {"<i>": {"path": absolute path of part i, "fingerprint": part i's fingerprint}, ...}}

A part's fingerprint is `part_fingerprint(parent, N, i, b)`, and the part's own attrs carry the
parent fingerprint, N, i and b, so a part of another run (or another split) is refused.

refusal_lab.store's `JoinedStore` presents the parts through the `ActivationStore` reader API as
the single run's store: rows in the single run's order (global batch 0 from part 0, batch 1 from
part 1, ...), read straight from the parts without copying. `ActivationStore.open` returns one
when the path holds a parts index, so every reader (sae, summary, circuits) takes either. A
missing or incomplete part is an error naming the part, its path and the command that writes it.
This module sits under refusal_lab.store (which reads the index) and imports only its format.

The layout of a part's rows is known without reading it: global batch k holds the samples
order[k*b : (k+1)*b], part i holds batches i, i+N, i+2N, ... in that order, so part i's local
batch j is global batch j*N + i. Tokens per sample come from each part's token table.
"""

from __future__ import annotations

import fcntl
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_lab.fingerprint import fingerprint, write_json_atomic
from refusal_lab.store_format import StoreIncompleteError, StoreMismatchError, read_json

log = logging.getLogger(__name__)

PARTS_INDEX = "parts.json"
INDEX_FORMAT = "refusal_lab.store_parts"
INDEX_VERSION = 1
SPLIT_VERSION = 1
"""How the processing order is cut into parts; part fingerprints change when this does."""
PART_ATTRS = "parts"
"""Key of a part's own attrs {parent_fingerprint, shards, shard, batch_size} in the store's refusal_lab attrs."""


class MissingPartError(StoreIncompleteError):
    """A part of a sharded store has not been written (or not finished)."""


def global_batches(n_samples: int, batch_size: int) -> int:
    return -(-n_samples // batch_size)


def shard_batches(n_samples: int, batch_size: int, shards: int, shard: int) -> list[int]:
    """Global batch numbers of part `shard`, in its processing order."""
    return list(range(shard, global_batches(n_samples, batch_size), shards))


def shard_order(order: list[int], batch_size: int, shards: int, shard: int) -> list[int]:
    """The prompt indices part `shard` processes: its whole batches of `order`, in order."""
    return [
        i for k in shard_batches(len(order), batch_size, shards, shard) for i in order[k * batch_size :][:batch_size]
    ]


def part_fingerprint(parent: str, shards: int, shard: int, batch_size: int) -> str:
    return fingerprint(
        {"parent": parent, "shards": shards, "shard": shard, "batch_size": batch_size, "split": SPLIT_VERSION}
    )


def part_attrs(parent: str, shards: int, shard: int, batch_size: int) -> dict[str, Any]:
    return {"parent_fingerprint": parent, "shards": shards, "shard": shard, "batch_size": batch_size}


def index_path(store_path: Path) -> Path:
    return Path(store_path) / PARTS_INDEX


def is_parts_index(store_path: Path) -> bool:
    return index_path(store_path).is_file()


def part_command(shards: int, shard: int) -> str:
    return f"python -m refusal_lab 'stages=[collect]' inference.shards={shards} inference.shard={shard} (same config)"


@dataclass(frozen=True)
class PartsIndex:
    fingerprint: str
    shards: int
    batch_size: int
    n_samples: int
    parts: dict[int, dict[str, str]]
    """shard -> {"path", "fingerprint"} of every registered part."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "format_version": INDEX_VERSION,
            "fingerprint": self.fingerprint,
            "shards": self.shards,
            "batch_size": self.batch_size,
            "n_samples": self.n_samples,
            "parts": {str(k): v for k, v in sorted(self.parts.items())},
        }

    @classmethod
    def load(cls, store_path: Path) -> PartsIndex:
        path = index_path(store_path)
        data = read_json(path)
        if data is None or data.get("format") != INDEX_FORMAT:
            raise StoreMismatchError(f"store: {path} is not a parts index")
        if data.get("format_version") != INDEX_VERSION:
            raise StoreMismatchError(
                f"store: {path} has parts index version {data.get('format_version')}; this code reads {INDEX_VERSION}"
            )
        parts = {int(k): dict(v) for k, v in data["parts"].items()}
        return cls(data["fingerprint"], int(data["shards"]), int(data["batch_size"]), int(data["n_samples"]), parts)


def register_part(
    store_path: Path, *, parent: str, shards: int, shard: int, batch_size: int, n_samples: int, part: Path
) -> None:
    """Add (or confirm) part `shard`'s location in the index at `store_path`, creating the index if needed.

    Shard jobs start at about the same time, so the read-modify-write holds an flock on the
    index folder's lock file. An index of another split (shards, batch size) or run is refused.
    """
    store_path = Path(store_path)
    if (store_path / "zarr.json").exists():
        raise StoreMismatchError(
            f"store_path: {store_path} holds a single (unsharded) store; a sharded collect cannot add parts to it"
        )
    store_path.mkdir(parents=True, exist_ok=True)
    entry = {"path": str(Path(part).resolve()), "fingerprint": part_fingerprint(parent, shards, shard, batch_size)}
    with (store_path / ".parts.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_parts_index(store_path):
                index = PartsIndex.load(store_path)
                ours = (parent, shards, batch_size, n_samples)
                theirs = (index.fingerprint, index.shards, index.batch_size, index.n_samples)
                if ours != theirs:
                    raise StoreMismatchError(
                        f"store_path: {index_path(store_path)} indexes another split "
                        f"(fingerprint, shards, batch_size, samples) = {theirs}, this job {ours}; "
                        "use the same inference.shards and inference.batch_size for every shard, or delete the index"
                    )
                parts = dict(index.parts)
            else:
                parts = {}
            old = parts.get(shard)
            if old is not None and old != entry:
                log.warning("store parts: part %d moves from %s to %s", shard, old["path"], entry["path"])
            parts[shard] = entry
            write_json_atomic(
                index_path(store_path), PartsIndex(parent, shards, batch_size, n_samples, parts).to_json()
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
