"""The Zarr activation store's readers: `ActivationStore` (one store) and `JoinedStore` (a sharded one).

Written by the collect stage (through refusal_lab.store_writer: `StoreWriter`, usually behind a
`BackgroundWriter`); read by the sae, judge and circuits stages and the summary. The on-disk
layout, the records, the errors and the metadata readers are in refusal_lab.store_format and
re-exported here, so `refusal_lab.store` is the one name to import a store from. The parts
index of a sharded collect is refusal_lab.store_parts; `ActivationStore.open` reads a folder
holding one as a `JoinedStore`, so every reader takes either.

Shape letters: N tokens, D d_model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from refusal_lab.store_format import (
    ACTS_CODEC,
    ATTRS_KEY,
    ENCODINGS,
    FORMAT_VERSION,
    MANIFEST,
    SAMPLE_CHUNK,
    SAMPLE_FIELDS,
    TOKEN_FIELDS,
    TOKEN_TABLE_CHUNK,
    ZSTD_LEVEL,
    Phase,
    SampleRecord,
    StoreIncompleteError,
    StoreMismatchError,
    TokenBlock,
    dtype_name,
    estimate_store_bytes,
    group_meta,
    open_array,
    raw_dtype,
    read_json,
    store_meta,
)
from refusal_lab.store_parts import (
    PART_ATTRS,
    MissingPartError,
    PartsIndex,
    global_batches,
    index_path,
    is_parts_index,
    part_attrs,
    part_command,
    part_fingerprint,
)

__all__ = [
    "ACTS_CODEC",
    "ATTRS_KEY",
    "ENCODINGS",
    "FORMAT_VERSION",
    "MANIFEST",
    "SAMPLE_CHUNK",
    "SAMPLE_FIELDS",
    "TOKEN_FIELDS",
    "TOKEN_TABLE_CHUNK",
    "ZSTD_LEVEL",
    "ActivationStore",
    "JoinedArray",
    "JoinedStore",
    "Phase",
    "SampleRecord",
    "StoreIncompleteError",
    "StoreMismatchError",
    "TokenBlock",
    "dtype_name",
    "estimate_store_bytes",
    "group_meta",
    "open_array",
    "raw_dtype",
    "read_json",
    "store_meta",
]


class ActivationStore:
    """Read-only view of a committed store (only committed rows are exposed)."""

    def __init__(self, path: Path, group: zarr.Group, manifest: dict) -> None:
        self.path = path
        self._group = group
        self._manifest = manifest
        self.attrs = group_meta(group)
        self.hook_points: list[str] = list(self.attrs["hook_points"])
        self.d_model = int(self.attrs["d_model"])
        self.encoding: str = self.attrs["encoding"]
        self.fingerprint: str = manifest["fingerprint"]
        self.n_tokens = int(manifest["committed_tokens"])
        self.n_samples = int(manifest["committed_samples"])
        self.complete = bool(manifest["complete"])
        self._acts: dict[str, zarr.Array] = {}

    @classmethod
    def open(cls, path: Path, *, allow_incomplete: bool = False) -> ActivationStore:
        """The store at `path`; a folder holding a parts index (sharded collect) opens as one joined store."""
        path = Path(path)
        if is_parts_index(path):
            return JoinedStore.open_parts(path)
        if store_meta(path) is None:
            raise FileNotFoundError(f"store: {path} is not an activation store (no zarr group with {ATTRS_KEY} attrs)")
        manifest = read_json(path / MANIFEST)
        if manifest is None or not (manifest["complete"] or allow_incomplete):
            done = 0 if manifest is None else manifest["committed_samples"]
            raise StoreIncompleteError(
                f"store: {path} is incomplete ({done} samples committed); run the collect stage to finish it"
            )
        return cls(path, zarr.open_group(path, mode="r"), manifest)

    def acts(self, hook: str) -> zarr.Array:
        """The stored array; rows at and beyond `n_tokens` are not committed, and raw values need `decode`."""
        if hook not in self._acts:
            if hook not in self.hook_points:
                raise KeyError(f"store: no hook point {hook!r} in {self.path}; it has {self.hook_points}")
            self._acts[hook] = open_array(self._group, f"acts/{hook}")  # opened once: each open reads zarr.json
        return self._acts[hook]

    def decode(self, hook: str, values: np.ndarray) -> np.ndarray:
        """Stored values of `hook` -> float32."""
        meaning = self.acts(hook).attrs["dtype"]
        if meaning == "bfloat16":
            return (values.astype(np.uint32) << 16).view(np.float32)
        if meaning == "float16" and values.dtype == np.uint16:
            return values.view(np.float16).astype(np.float32)
        return values.astype(np.float32, copy=False)

    def read(self, hook: str, start: int, stop: int) -> np.ndarray:
        """float32 [stop-start, D] activations of committed tokens [start, stop)."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(
                f"store: rows [{start}, {stop}) outside the {self.n_tokens} committed tokens of {self.path}"
            )
        return self.decode(hook, np.asarray(self.acts(hook)[start:stop]))

    def tokens(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(open_array(self._group, f"tokens/{k}")[: self.n_tokens]) for k in TOKEN_FIELDS}

    def samples_column(self, name: str) -> np.ndarray:
        """One column of the sample table (committed rows), without reading the others."""
        return np.asarray(open_array(self._group, f"samples/{name}")[: self.n_samples])

    def samples(self) -> dict[str, np.ndarray | list]:
        """Columnar sample table; string columns are lists of str."""
        out: dict[str, np.ndarray | list] = {}
        for name, dtype in SAMPLE_FIELDS.items():
            values = np.asarray(open_array(self._group, f"samples/{name}")[: self.n_samples])
            out[name] = [str(v) for v in values.tolist()] if dtype is str else values
        return out

    def overflow_counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._manifest["overflow_counts"].items()}


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
