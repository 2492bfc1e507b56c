"""Writing the activation store: commits, resume after a kill, and the background writer.

The layout, the integrity rules and the reader live in refusal_lab.store; this module appends
to a store (`StoreWriter`, usually behind a `BackgroundWriter` in the collect stage).

Shape letters: N tokens of a block, D d_model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCname, BloscCodec, BloscShuffle, BytesCodec, ZstdCodec
from zarr.codecs.bytes import Endian

from refusal_lab.errors import ConfigError
from refusal_lab.fingerprint import write_json_atomic
from refusal_lab.store import (
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
    SampleRecord,
    StoreMismatchError,
    TokenBlock,
    dtype_name,
    group_meta,
    open_array,
    raw_dtype,
    read_json,
    store_meta,
)

log = logging.getLogger(__name__)

WRITER_NICE = 10
"""Added to the nice value of the background writer's threads (see BackgroundWriter._run)."""


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # nothing to sync: a resize that dropped a chunk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chunk_indices(arr: zarr.Array, start: int, stop: int) -> range:
    """Indices along the token axis of the chunks that rows [start, stop) touch."""
    rows = arr.chunks[0]
    return range(start // rows, -(-stop // rows))


def _direct_codec(arr: zarr.Array) -> numcodecs.Blosc | None:
    """A numcodecs Blosc that writes exactly this array's chunks, if its layout is the activations' one."""
    meta = arr.metadata
    codecs = getattr(meta, "codecs", ())
    if (
        arr.ndim != 2
        or len(codecs) != 2
        or not isinstance(codecs[0], BytesCodec)
        or codecs[0].endian not in (None, Endian.little)
        or not isinstance(codecs[1], BloscCodec)
        or codecs[1].typesize != arr.dtype.itemsize
        or arr.chunks[1] != arr.shape[1]
        or sys.byteorder != "little"
    ):
        return None
    blosc = codecs[1]
    shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
               "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[BloscShuffle(blosc.shuffle).value]  # fmt: skip
    return numcodecs.Blosc(cname=str(BloscCname(blosc.cname).value), clevel=blosc.clevel, shuffle=shuffle,
                           blocksize=blosc.blocksize)  # fmt: skip


def _write_rows_direct(folder: Path, arr: zarr.Array, codec: numcodecs.Blosc, values: np.ndarray, start: int,
                       stop: int) -> None:  # fmt: skip
    """Write rows [start, stop) of a [tokens, d] array chunk by chunk, as zarr would, without zarr's pipeline.

    A chunk file of this layout is blosc(little-endian C-order bytes of the full-size chunk,
    edge chunks padded with the fill value 0). Writing it here rather than through
    `arr[start:stop] = values` halves the writer's CPU (zarr's async pipeline copies every chunk
    into a new buffer and hops threads per chunk), which on a 2-core machine is taken straight from
    compute. Like zarr's LocalStore, each file is written under a temporary name and renamed, so a
    kill never tears a chunk. tests/unit/test_store.py reads these stores back with plain zarr.
    """
    rows = arr.chunks[0]
    first = start // rows
    if start % rows:  # the boundary chunk holds committed rows: rewrite it with them
        values = np.concatenate([np.asarray(arr[first * rows : start]), values])
    base = first * rows
    for i in _chunk_indices(arr, start, stop):
        chunk = values[i * rows - base : (i + 1) * rows - base]
        if len(chunk) < rows:
            chunk = np.concatenate([chunk, np.zeros((rows - len(chunk), chunk.shape[1]), chunk.dtype)])
        path = folder / arr.metadata.encode_chunk_key((i, 0))  # type: ignore[union-attr]
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(codec.encode(np.ascontiguousarray(chunk)))
        os.replace(tmp, path)


class StoreWriter:
    """Appends committed blocks to a store; `open` creates, resumes or recognises a complete store."""

    def __init__(self, path: Path, group: zarr.Group, manifest: dict, meta: dict, durable: bool) -> None:
        self.path = path
        self.durable = durable
        self._group = group
        self._manifest = manifest
        self.hook_points: list[str] = list(meta["hook_points"])
        self.d_model = int(meta["d_model"])
        self.encoding: str = meta["encoding"]
        self.model_dtype: str = meta["model_dtype"]
        # write_empty_chunks: without it zarr compares every chunk with the fill value before
        # writing it, which costs as much CPU as compressing it; activations are never all zero.
        self._arrays: dict[str, zarr.Array] = {
            name: open_array(group, name).with_config({"write_empty_chunks": True})
            for name in [f"acts/{h}" for h in self.hook_points]
            + [f"tokens/{k}" for k in TOKEN_FIELDS]
            + [f"samples/{k}" for k in SAMPLE_FIELDS]
        }
        # Decided once per array (its codecs never change): the activations' layout is written directly.
        self._direct_codecs = {name: _direct_codec(arr) for name, arr in self._arrays.items()}
        self._warned: set[str] = set()

    @property
    def committed_samples(self) -> int:
        return int(self._manifest["committed_samples"])

    @property
    def committed_tokens(self) -> int:
        return int(self._manifest["committed_tokens"])

    @property
    def complete(self) -> bool:
        return bool(self._manifest["complete"])

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        fingerprint: str,
        hook_points: list[str],
        d_model: int,
        model_dtype: torch.dtype,
        encoding: str = "float16",
        chunk_tokens: int = 1024,
        attrs: dict,
        durable: bool = True,
    ) -> StoreWriter:
        """Create a new store, resume an incomplete one of the same fingerprint, or return a complete one."""
        path = Path(path)
        if encoding not in ENCODINGS:
            raise ConfigError(f"inference.store_dtype: {encoding!r} is not one of {', '.join(ENCODINGS)}")
        if encoding == "raw":
            raw_dtype(model_dtype)
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "hook_points": list(hook_points),
            "d_model": int(d_model),
            "encoding": encoding,
            "model_dtype": dtype_name(model_dtype),
        }
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            existing = store_meta(path) if path.is_dir() else None
            if existing is None:
                raise StoreMismatchError(
                    f"store_path: {path} exists and is not an activation store; pick another store_path or delete it"
                )
            if existing["fingerprint"] != fingerprint:
                raise StoreMismatchError(
                    f"store_path: {path} holds a different run (fingerprint {existing['fingerprint']}, this run "
                    f"{fingerprint}); pick another store_path or delete it"
                )
            manifest = read_json(path / MANIFEST)
            if manifest is not None:
                return cls._resume(path, meta, existing, manifest, durable)
            log.warning("store: %s has no manifest (killed before its first commit); starting it again", path)
            for child in path.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        return cls._create(path, meta, chunk_tokens, attrs, durable)

    @classmethod
    def _create(cls, path: Path, meta: dict, chunk_tokens: int, attrs: dict, durable: bool) -> StoreWriter:
        clash = sorted(k for k in attrs if k in meta or k == "chunk_tokens")
        if clash:
            raise ValueError(f"store attrs: keys {clash} are reserved for the store's own metadata")
        # A JSON round trip turns Paths, enums and versions into what zarr can store, once, here.
        extra = json.loads(json.dumps(attrs, default=str))
        group = zarr.create_group(
            store=path, zarr_format=3, attributes={ATTRS_KEY: {**extra, **meta, "chunk_tokens": chunk_tokens}}
        )
        raw = meta["encoding"] == "raw"
        act_dtype = raw_dtype(getattr(torch, meta["model_dtype"])) if raw else np.dtype(np.float16)
        act_attrs = {"dtype": meta["model_dtype"] if raw else "float16"}
        d = meta["d_model"]
        specs = [(f"acts/{h}", (0, d), (chunk_tokens, d), act_dtype, act_attrs) for h in meta["hook_points"]]
        specs += [(f"tokens/{k}", (0,), (TOKEN_TABLE_CHUNK,), t, {}) for k, t in TOKEN_FIELDS.items()]
        specs += [(f"samples/{k}", (0,), (SAMPLE_CHUNK,), t, {}) for k, t in SAMPLE_FIELDS.items()]
        acts_codec = BloscCodec(
            cname=ACTS_CODEC["cname"], clevel=ACTS_CODEC["clevel"], shuffle=BloscShuffle(ACTS_CODEC["shuffle"])
        )
        for name, shape, chunks, dtype, arr_attrs in specs:
            codec = acts_codec if name.startswith("acts/") else ZstdCodec(level=ZSTD_LEVEL)
            # Chunk keys "c.<i>.0": one folder per array, not one per chunk row, so an append makes
            # no folders and fsyncs one folder per array.
            group.create_array(
                name, shape=shape, chunks=chunks, dtype=dtype, compressors=codec,
                fill_value="" if dtype is str else 0, attributes=arr_attrs,
                chunk_key_encoding={"name": "default", "separator": "."},
            )  # fmt: skip
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": meta["fingerprint"],
            "committed_samples": 0,
            "committed_tokens": 0,
            "blocks": [],
            "overflow_counts": dict.fromkeys(meta["hook_points"], 0),
            "complete": False,
        }
        writer = cls(path, group, manifest, meta, durable)
        writer._commit(manifest)
        log.info("store: created %s (%d hook points, %s)", path, len(meta["hook_points"]), meta["encoding"])
        return writer

    @classmethod
    def _resume(cls, path: Path, meta: dict, existing: dict, manifest: dict, durable: bool) -> StoreWriter:
        differ = {k: (existing.get(k), v) for k, v in meta.items() if existing.get(k) != v}
        if manifest.get("fingerprint") != meta["fingerprint"]:
            differ["manifest fingerprint"] = (manifest.get("fingerprint"), meta["fingerprint"])
        if differ:
            raise StoreMismatchError(
                f"store_path: {path} has this run's fingerprint but differs in (stored, this run): {differ}; "
                "pick another store_path or delete it"
            )
        writer = cls(path, zarr.open_group(path, mode="r+"), manifest, meta, durable)
        if writer.complete:
            return writer
        n_tok, n_smp = writer.committed_tokens, writer.committed_samples
        for name, arr in writer._arrays.items():
            n = n_tok if not name.startswith("samples/") else n_smp
            if arr.shape[0] < n:
                raise RuntimeError(f"store: {path}/{name} has {arr.shape[0]} rows but {n} are committed; delete {path}")
            if arr.shape[0] > n:
                arr.resize((n, *arr.shape[1:]))  # discard what was written after the last commit
        for leftover in path.rglob("*.partial"):  # temp files of chunk writes a kill interrupted
            leftover.unlink(missing_ok=True)
        log.info("store: resuming %s after %d committed samples (%d tokens)", path, n_smp, n_tok)
        return writer

    def committed_sample_ids(self) -> np.ndarray:
        return np.asarray(self._arrays["samples/sample_id"][: self.committed_samples])

    def _encode(self, hook: str, parts: list[torch.Tensor]) -> tuple[np.ndarray, int]:
        """The stored values of one hook's activations over several blocks, and how many overflowed float16.

        Each block is converted straight into its rows of one output array: no concatenated
        copy in the model dtype is ever made.
        """
        for part in parts:
            if part.ndim != 2 or part.shape[1] != self.d_model:
                raise ValueError(f"store: acts[{hook}] has shape {tuple(part.shape)}, expected [n, {self.d_model}]")
            if self.encoding == "raw" and dtype_name(part.dtype) != self.model_dtype:
                raise ValueError(
                    f"store: acts[{hook}] is {part.dtype}; raw encoding of this store needs {self.model_dtype}"
                )
        target = getattr(torch, self.model_dtype) if self.encoding == "raw" else torch.float16
        if len(parts) == 1 and parts[0].dtype == target and parts[0].device.type == "cpu":
            out_ND = parts[0].detach().contiguous()  # already in the stored dtype: no copy
            if self.encoding != "raw":  # a float16 block into a float16 store: float16 rows, as below
                return out_ND.numpy(), 0
            return (out_ND.view(torch.uint16) if out_ND.element_size() == 2 else out_ND).numpy(), 0
        out_ND = torch.empty((sum(len(p) for p in parts), self.d_model), dtype=target)
        row = 0
        for part in parts:
            # torch releases the GIL in copy_, so conversion in the writer overlaps the compute thread.
            out_ND[row : row + len(part)].copy_(part.detach())
            row += len(part)
        if target != torch.float16:
            return (out_ND.view(torch.uint16) if out_ND.element_size() == 2 else out_ND).numpy(), 0
        half = out_ND.numpy()
        # Counting on the bits (float16 inf: exponent all ones, mantissa 0) is ~30x faster than torch.isinf on half.
        n_inf = int(np.count_nonzero((half.view(np.uint16) & 0x7FFF) == 0x7C00))
        if n_inf == 0:
            return half, 0
        # Overflow = finite in the model's dtype, inf once stored. inf the model itself produced is not
        # overflow, whichever dtype its block came in: a float16 block's own inf counts as nothing, as on
        # the single-block path above, which stores it without looking.
        n_inf_in = sum(int(torch.isinf(p).sum()) for p in parts)
        return half, n_inf - n_inf_in

    def append(self, *blocks: TokenBlock) -> None:
        """Write blocks, in order, at the committed offsets, then commit them together in the manifest."""
        if self.complete:
            raise RuntimeError(f"store: {self.path} is complete; nothing may be appended")
        for block in blocks:
            m = block.n_tokens
            for name in TOKEN_FIELDS:
                if len(getattr(block, name)) != m:
                    raise ValueError(f"store: block.{name} has {len(getattr(block, name))} rows, block.sample_id {m}")
            if set(block.acts) != set(self.hook_points):
                raise ValueError(
                    f"store: block hooks {sorted(block.acts)} differ from the store's {sorted(self.hook_points)}"
                )
            if any(len(a) != m for a in block.acts.values()):
                raise ValueError(f"store: a block's activations do not have its {m} token rows")
            if block.ready is not None:
                block.ready()
        n = sum(b.n_tokens for b in blocks)
        samples = [s for b in blocks for s in b.samples]
        t0, s0 = self.committed_tokens, self.committed_samples
        t1, s1 = t0 + n, s0 + len(samples)
        columns: dict[str, tuple[np.ndarray, int, int]] = {}
        for name, dtype in TOKEN_FIELDS.items():
            parts = [np.asarray(getattr(b, name), dtype=dtype) for b in blocks]
            columns[f"tokens/{name}"] = (np.concatenate(parts) if parts else np.zeros(0, dtype), t0, t1)
        for f in fields(SampleRecord):
            values = [getattr(s, f.name) for s in samples]
            dtype = SAMPLE_FIELDS[f.name]
            col = np.array(values, dtype=np.dtypes.StringDType()) if dtype is str else np.array(values, dtype=dtype)
            columns[f"samples/{f.name}"] = (col, s0, s1)
        overflow = dict(self._manifest["overflow_counts"])

        def write(name: str) -> list[Path]:
            arr = self._arrays[name]
            if name.startswith("acts/"):
                hook = name.removeprefix("acts/")
                values, n_over = self._encode(hook, [b.acts[hook] for b in blocks])
                overflow[hook] += n_over
                if n_over and hook not in self._warned:
                    self._warned.add(hook)
                    log.warning("store: %s has %d values beyond float16's range, stored as inf", hook, n_over)
                start, stop = t0, t1
            else:
                values, start, stop = columns[name]
            arr.resize((stop, *arr.shape[1:]))
            codec = self._direct_codecs[name]
            if stop > start and codec is not None:
                _write_rows_direct(self.path / name, arr, codec, values, start, stop)
            elif stop > start:
                arr[start:stop] = values
            return self._touched(name, arr, start, stop) if self.durable else []

        # One thread per array: a small block rewrites one boundary chunk per hook, each a decode+encode.
        with ThreadPoolExecutor(max_workers=min(8, len(self._arrays))) as pool:
            touched = [p for paths in pool.map(write, list(self._arrays)) for p in paths]
            if self.durable:  # files, then the folders holding their new names, up to the store's root
                folders = {q for p in touched for q in p.parents if q.is_relative_to(self.path)}
                list(pool.map(_fsync, sorted(set(touched) | folders)))
        spans = [*self._manifest["blocks"], {"samples": [s0, s1], "tokens": [t0, t1]}]
        self._commit({**self._manifest, "committed_samples": s1, "committed_tokens": t1, "blocks": spans,
                      "overflow_counts": overflow})  # fmt: skip

    def _touched(self, name: str, arr: zarr.Array, start: int, stop: int) -> list[Path]:
        """Files a write of rows [start, stop) replaced: its chunks and the array's metadata."""
        folder = self.path / name
        paths = [folder / "zarr.json"]
        for i in _chunk_indices(arr, start, stop):
            paths.append(folder / arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1)))  # type: ignore[union-attr]
        return paths

    def _commit(self, manifest: dict) -> None:
        write_json_atomic(self.path / MANIFEST, manifest)
        _fsync(self.path)  # the rename itself reaches disk only with its folder
        self._manifest = manifest

    def finalize(self, extra_attrs: dict | None = None) -> None:
        """Record `extra_attrs` and mark the store complete (every block is already on disk)."""
        if self.complete:
            return
        if extra_attrs:
            extra: dict[str, Any] = json.loads(json.dumps(extra_attrs, default=str))
            self._group.attrs[ATTRS_KEY] = {**group_meta(self._group), **extra}
        self._commit({**self._manifest, "complete": True})
        over = {h: n for h, n in self._manifest["overflow_counts"].items() if n}
        if over:
            log.warning("store: values beyond float16's range stored as inf, per hook: %s", over)
        log.info("store: %s complete: %d samples, %d tokens", self.path, self.committed_samples, self.committed_tokens)


_STOP = object()


class BackgroundWriter:
    """Runs `StoreWriter.append` in a thread behind a bounded queue, so compute never waits on disk.

    Blocks are committed in groups: once `commit_tokens` tokens wait, once the oldest waiting
    block is `commit_seconds` old, or at close. Each append has a fixed cost (per array a
    metadata write and a rewrite of the partial boundary chunk, then a manifest commit), which
    on a small CPU model costs as much as the compute when every batch is its own commit. A kill
    loses only uncommitted blocks, and a resume recomputes them. The defaults commit every block
    as it arrives (blocks that queued up behind a slow append still go together); the collect
    stage passes `inference.commit_tokens` and `inference.commit_seconds` (`collect.open_sink`).
    """

    def __init__(
        self, writer: StoreWriter, max_queue: int = 4, commit_tokens: int = 1, commit_seconds: float = 0.0
    ) -> None:
        self.writer = writer
        self.commit_tokens = commit_tokens
        self.commit_seconds = commit_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._error: BaseException | None = None
        self._reported = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Below compute's priority (Linux nice is per thread, inherited by the append pool's threads):
        # on a machine without spare cores the writer fills compute's gaps instead of preempting it.
        # Linux only: elsewhere a thread id is no process id, and setpriority would target a process.
        if sys.platform == "linux":
            with contextlib.suppress(OSError):
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WRITER_NICE))
        pending: list[TokenBlock] = []
        oldest = 0.0
        stop = False
        while not stop:
            timeout = None if not pending else max(0.0, oldest + self.commit_seconds - time.monotonic())
            try:
                items = [self._queue.get(timeout=timeout)]
            except queue.Empty:
                items = []  # the oldest waiting block is due
            # Take whatever else is already waiting: a writer that fell behind catches up with
            # fewer, larger appends instead of lagging further.
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in items
            if self._error is not None:  # after a failure keep draining, so submit/close never block
                pending.clear()
                continue
            if not pending:
                oldest = time.monotonic()
            pending += [b for b in items if b is not _STOP]
            due = (
                stop
                or sum(b.n_tokens for b in pending) >= self.commit_tokens
                or time.monotonic() - oldest >= self.commit_seconds
            )
            if pending and due:
                try:
                    self.writer.append(*pending)
                except BaseException as err:  # handed to the submitting thread
                    self._error = err
                pending = []

    def _raise(self) -> None:
        if self._error is not None:
            self._reported = True
            raise RuntimeError(f"store writer failed on {self.writer.path}: {self._error}") from self._error

    def submit(self, block: TokenBlock) -> None:
        """Queue a block; waits while the queue is full and re-raises a writer failure."""
        if self._closed:
            raise RuntimeError("store: submit after BackgroundWriter.close")
        while True:
            self._raise()
            try:
                self._queue.put(block, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued, stop the thread and re-raise a failure not yet reported."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
        if not self._reported:
            self._raise()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except RuntimeError as err:  # the body's own exception is the one to see
            log.error("store: %s", err)


def disk_write_bandwidth(path: Path, n_bytes: int = 256 * 2**20) -> float:
    """Sequential write speed (bytes/s, fsync included) of the disk holding `path` (or its nearest existing parent)."""
    folder = Path(path)
    while not folder.is_dir():
        folder = folder.parent
    probe = folder / f".write_probe_{os.getpid()}_{threading.get_ident()}"
    piece = np.random.default_rng(0).integers(0, 256, size=8 * 2**20, dtype=np.uint8).tobytes()  # incompressible
    try:
        start = time.perf_counter()
        with probe.open("wb") as f:
            left = n_bytes
            while left > 0:
                left -= f.write(piece[: min(left, len(piece))])
            f.flush()
            os.fsync(f.fileno())
        return n_bytes / (time.perf_counter() - start)
    finally:
        probe.unlink(missing_ok=True)
