"""A store written in parts (sharded collection) and read as one: the parts index and the joined reader.

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

`JoinedStore` presents the parts through the `ActivationStore` reader API as the single run's
store: rows in the single run's order (global batch 0 from part 0, batch 1 from part 1, ...),
read straight from the parts without copying. `ActivationStore.open` returns one when the path
holds a parts index, so every reader (sae, summary, circuits) takes either. A missing or
incomplete part is an error naming the part, its path and the command that writes it.

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

import numpy as np

from refusal_lab.fingerprint import fingerprint, write_json_atomic
from refusal_lab.store import (
    SAMPLE_FIELDS,
    ActivationStore,
    StoreIncompleteError,
    StoreMismatchError,
    read_json,
)

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


class JoinedStore(ActivationStore):
    """The parts of a sharded store read as one committed store, in the single run's row order.

    Nothing is copied: `read` maps a range of global rows to one contiguous range per part
    (consecutive global batches of one part are adjacent in it) and scatters them into place.
    `acts(hook)` (the raw zarr array) has no joined equivalent; use `read`.
    """

    def __init__(self, path: Path, index: PartsIndex, parts: list[ActivationStore]) -> None:  # noqa: PLW0231
        # No super().__init__: there is no single zarr group; every attribute the readers use is set here.
        self.path = path
        self.index = index
        self.parts = parts
        first = parts[0]
        self.attrs = {k: v for k, v in first.attrs.items() if k != PART_ATTRS}
        self.attrs["fingerprint"] = index.fingerprint
        self.hook_points = list(first.hook_points)
        self.d_model = first.d_model
        self.encoding = first.encoding
        self.fingerprint = index.fingerprint
        self.complete = True
        self._acts = {}
        self._tokens = [p.tokens() for p in parts]
        self._layout()

    def _layout(self) -> None:
        """Global batch k -> (part, local sample range, local token range), in global order."""
        b, n, shards = self.index.batch_size, self.index.n_samples, self.index.shards
        sample_seg: list[tuple[int, int, int]] = []
        token_seg: list[tuple[int, int, int]] = []
        local_sample = [0] * shards
        local_token = [0] * shards
        counts = []
        for p, part in enumerate(self.parts):
            ids = part.samples_column("sample_id")
            tok_ids, tok_counts = np.unique(self._tokens[p]["sample_id"], return_counts=True)
            per = dict(zip(tok_ids.tolist(), tok_counts.tolist(), strict=True))
            counts.append(np.cumsum([0] + [per.get(s, 0) for s in ids.tolist()]))
        for k in range(global_batches(n, b)):
            p = k % shards
            size = min(b, n - k * b)
            s0 = local_sample[p]
            t0, t1 = int(counts[p][s0]), int(counts[p][s0 + size])
            sample_seg.append((p, s0, s0 + size))
            token_seg.append((p, t0, t1))
            local_sample[p] += size
            local_token[p] = t1
        for p, part in enumerate(self.parts):
            if local_sample[p] != part.n_samples or local_token[p] != part.n_tokens:
                raise StoreMismatchError(
                    f"store: part {p} ({part.path}) holds {part.n_samples} samples and {part.n_tokens} tokens, "
                    f"but the split expects {local_sample[p]} samples and {local_token[p]} tokens"
                )
        self._sample_seg = sample_seg
        self._token_seg = token_seg
        self._token_starts = np.cumsum([0] + [t1 - t0 for _, t0, t1 in token_seg])
        self.n_samples = n
        self.n_tokens = int(self._token_starts[-1])

    @classmethod
    def open_parts(cls, path: Path) -> JoinedStore:
        path = Path(path)
        index = PartsIndex.load(path)
        problems: list[str] = []
        parts: list[ActivationStore] = []
        for shard in range(index.shards):
            entry = index.parts.get(shard)
            what = f"part {shard} of {index.shards}"
            if entry is None:
                command = part_command(index.shards, shard)
                problems.append(f"{what} is missing (not registered in {index_path(path)}; {command} writes it)")
                continue
            part_path = Path(entry["path"])
            try:
                part = ActivationStore.open(part_path)
            except FileNotFoundError:
                problems.append(f"{what} is missing at {part_path} ({part_command(index.shards, shard)} writes it)")
                continue
            except StoreIncompleteError:
                manifest = read_json(part_path / "manifest.json") or {}
                problems.append(
                    f"{what} at {part_path} is incomplete ({manifest.get('committed_samples', 0)} samples committed; "
                    f"{part_command(index.shards, shard)} finishes it)"
                )
                continue
            expected = part_fingerprint(index.fingerprint, index.shards, shard, index.batch_size)
            own = part.attrs.get(PART_ATTRS)
            if part.fingerprint != expected or own != part_attrs(
                index.fingerprint, index.shards, shard, index.batch_size
            ):
                raise StoreMismatchError(
                    f"store: {what} at {part_path} belongs to another run or split (fingerprint {part.fingerprint}, "
                    f"attrs {own}); expected fingerprint {expected} under parent {index.fingerprint}"
                )
            parts.append(part)
        if problems:
            raise MissingPartError(
                f"store: {path} (sharded, {index.shards} parts) cannot be read: " + "; ".join(problems)
            )
        for part in parts[1:]:
            same = (part.hook_points, part.d_model, part.encoding) == (
                parts[0].hook_points,
                parts[0].d_model,
                parts[0].encoding,
            )
            if not same:
                raise StoreMismatchError(
                    f"store: parts {parts[0].path} and {part.path} differ in hook points, d_model or encoding"
                )
        return cls(path, index, parts)

    def acts(self, hook: str) -> Any:  # a JoinedArray: the zarr-array calls readers use, across the parts
        """The stored (undecoded) values of `hook` across the parts, as a read-only array-like (see JoinedArray)."""
        if hook not in self.hook_points:
            raise KeyError(f"store: no hook point {hook!r} in {self.path}; it has {self.hook_points}")
        return JoinedArray(self, hook)

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part, row inside the part) of each global token row."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_tokens):
            raise IndexError(f"store: rows outside the {self.n_tokens} tokens of {self.path}")
        seg = np.searchsorted(self._token_starts, rows, side="right") - 1
        part = np.array([p for p, _, _ in self._token_seg], dtype=np.int64)[seg]
        first = np.array([t0 for _, t0, _ in self._token_seg], dtype=np.int64)[seg]
        return part, first + rows - self._token_starts[seg]

    def decode(self, hook: str, values: np.ndarray) -> np.ndarray:
        return self.parts[0].decode(hook, values)

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """(part, part_start, part_stop, out_offset) pieces of global token rows [start, stop)."""
        first = int(np.searchsorted(self._token_starts, start, side="right")) - 1
        pieces = []
        k = max(first, 0)
        while k < len(self._token_seg) and self._token_starts[k] < stop:
            p, t0, t1 = self._token_seg[k]
            g0 = int(self._token_starts[k])
            lo, hi = max(start, g0), min(stop, g0 + t1 - t0)
            if hi > lo:
                pieces.append((p, t0 + lo - g0, t0 + hi - g0, lo - start))
            k += 1
        return pieces

    def read(self, hook: str, start: int, stop: int) -> np.ndarray:
        if hook not in self.hook_points:
            raise KeyError(f"store: no hook point {hook!r} in {self.path}; it has {self.hook_points}")
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"store: rows [{start}, {stop}) outside the {self.n_tokens} tokens of {self.path}")
        out = np.empty((stop - start, self.d_model), dtype=np.float32)
        pieces = self._pieces(start, stop)
        # One contiguous read per part: a part's global batches inside [start, stop) are adjacent in it.
        for p in sorted({piece[0] for piece in pieces}):
            mine = [piece for piece in pieces if piece[0] == p]
            lo, hi = mine[0][1], mine[-1][2]
            rows = self.parts[p].read(hook, lo, hi)
            for _, a, b, offset in mine:
                out[offset : offset + b - a] = rows[a - lo : b - lo]
        return out

    def tokens(self) -> dict[str, np.ndarray]:
        return {
            name: np.concatenate([self._tokens[p][name][t0:t1] for p, t0, t1 in self._token_seg])
            for name in self._tokens[0]
        }

    def samples(self) -> dict[str, np.ndarray | list]:
        tables = [part.samples() for part in self.parts]
        out: dict[str, np.ndarray | list] = {}
        for name, dtype in SAMPLE_FIELDS.items():
            pieces = [tables[p][name][s0:s1] for p, s0, s1 in self._sample_seg]
            if dtype is str:
                out[name] = [v for piece in pieces for v in piece]
            else:
                out[name] = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
        return out

    def samples_column(self, name: str) -> np.ndarray:
        return np.asarray(self.samples()[name])

    def overflow_counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for part in self.parts:
            for hook, n in part.overflow_counts().items():
                total[hook] = total.get(hook, 0) + n
        return total


class JoinedArray:
    """`JoinedStore.acts(hook)`: what callers of a single store's zarr array use, read across the parts.

    Supports `[start:stop]` (rows) and `get_orthogonal_selection((rows, slice(None)))`, returning
    the stored values (decode them with the store's `decode`), plus `shape`, `dtype` and `attrs`.
    """

    def __init__(self, store: JoinedStore, hook: str) -> None:
        self._store = store
        self._hook = hook
        first = store.parts[0].acts(hook)
        self.attrs = first.attrs
        self.dtype = first.dtype
        self.shape = (store.n_tokens, store.d_model)

    def get_orthogonal_selection(self, selection: tuple[Any, ...]) -> np.ndarray:
        rows, columns = selection
        rows = np.asarray(rows, dtype=np.int64)
        part, local = self._store.locate(rows)
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        for p in np.unique(part).tolist():
            mine = np.flatnonzero(part == p)
            order = np.argsort(local[mine], kind="stable")
            picked = self._store.parts[p].acts(self._hook).get_orthogonal_selection((local[mine][order], slice(None)))
            out[mine[order]] = np.asarray(picked)
        return out[:, columns]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("JoinedArray: index rows with a slice, or use get_orthogonal_selection")
        return self.get_orthogonal_selection((np.arange(self.shape[0])[key], slice(None)))
