"""The Zarr activation store: layout, append with commit, resume after a kill, read.

Written by the collect stage (through `StoreWriter`, usually behind a `BackgroundWriter`);
read by the sae stage and the summary (through `ActivationStore`). The layout is plain
zarr v3 on local disk, so `zarr.open_group(path, mode="r")` reads it without this module::

    <path>/                      zarr v3 group; attrs {"refusal_lab": {format_version, fingerprint,
                                 hook_points, d_model, encoding, model_dtype, chunk_tokens, ...caller attrs}}
      acts/<hook>                [n_tokens, d_model], chunks (chunk_tokens, d_model), blosc lz4 bitshuffle;
                                 float16, or (encoding "raw") uint16 holding the bf16/fp16 bits or float32
                                 as is; attrs {"dtype": what the stored values mean: float16|bfloat16|float32}
      tokens/sample_id           [n_tokens] int32  which sample each token belongs to
      tokens/position            [n_tokens] int32  position in the unpadded sequence (0 = first real token, BOS)
      tokens/phase               [n_tokens] int8   0 prompt, 1 post-instruction template, 2 generated
      tokens/token_id            [n_tokens] int32
      samples/sample_id          [n_samples] int32 in processing order; indexes the prompt list
      samples/{prompt,category,label,response}  [n_samples] variable-length UTF-8 strings
      samples/refused            [n_samples] bool     keyword judge
      samples/refusal_score      [n_samples] float32  first-token log-odds
      samples/{n_prompt_tokens,n_generated_tokens}  [n_samples] int32
      manifest.json              the commit marker (see below), replaced atomically after each block

manifest.json: {"format_version": 1, "fingerprint", "committed_samples", "committed_tokens",
"blocks": [{"samples": [start, end), "tokens": [start, end)}, ...], "overflow_counts": {hook: int},
"complete": bool}. Only rows below the committed counts are valid: arrays may be longer after a kill.

Integrity: each append writes data first and the manifest last (temp file, fsync, os.replace,
fsync of the folder). Every chunk file is written under a temporary name and renamed (by zarr's
LocalStore, `_atomic_write` in zarr/storage/_local.py, or by `_write_rows_direct` here), so a
kill cannot tear the boundary chunk that also holds committed rows; with `durable=True` the
touched chunk files are fsynced before the manifest, so a node crash cannot leave a manifest
pointing at data that never reached disk. On resume every array is cut back to the manifest's
counts. Chunk keys use "." (`c.<i>.0`), so each array is one folder.

Strings use zarr's "string" data type (`dtype=str`, vlen-utf8 codec), which has a registered
zarr v3 extension spec: zarr 3.1.6 emits no UnstableSpecificationWarning for it (fixed-width
"U" strings would warn), and tests/unit/test_store.py fails if that changes.

Compression: activations are mostly mantissa noise and only their exponent bits compress. Blosc
lz4 after a bit shuffle (which lines those bits up) matches or beats zstd level 1's ratio
(1.4x) at 1.2-1.5x its encode and about 2x its decode speed; token tables and sample columns
use zstd level 1.
`benchmarks/bench_codecs.py` measures both on the organism and a random-init bf16 Llama.

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from enum import IntEnum
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCname, BloscCodec, BloscShuffle, BytesCodec, ZstdCodec
from zarr.codecs.bytes import Endian

from refusal_lab.config import ConfigError
from refusal_lab.fingerprint import write_json_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ATTRS_KEY = "refusal_lab"
ENCODINGS = ("float16", "raw")
ZSTD_LEVEL = 1
ACTS_CODEC = {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}
"""Blosc lz4 after a bit shuffle, for activations: see "Compression" above."""
WRITER_NICE = 10
TOKEN_TABLE_CHUNK = 65536
"""Rows per chunk of the small per-token arrays (4 bytes a row: 1024-row chunks would mean many tiny files)."""
SAMPLE_CHUNK = 1024
TOKEN_FIELDS: dict[str, type] = {"sample_id": np.int32, "position": np.int32, "phase": np.int8, "token_id": np.int32}
SAMPLE_FIELDS: dict[str, Any] = {
    "sample_id": np.int32,
    "prompt": str,
    "category": str,
    "label": str,
    "response": str,
    "refused": np.bool_,
    "refusal_score": np.float32,
    "n_prompt_tokens": np.int32,
    "n_generated_tokens": np.int32,
}


class Phase(IntEnum):
    PROMPT = 0
    POST_INSTRUCTION = 1
    GENERATED = 2


@dataclass
class SampleRecord:
    sample_id: int
    prompt: str
    category: str
    label: str
    response: str
    refused: bool
    refusal_score: float
    n_prompt_tokens: int
    n_generated_tokens: int


@dataclass
class TokenBlock:
    """What one batch produces: its samples and, per kept token, its table row and activations."""

    samples: list[SampleRecord]
    sample_id: np.ndarray
    position: np.ndarray
    phase: np.ndarray
    token_id: np.ndarray
    acts: dict[str, torch.Tensor]
    """hook name -> [N, D] CPU tensor in the model dtype; may still be filled by an async copy (see `ready`)."""
    ready: Callable[[], None] | None = None
    """Called by the writer before it reads `acts` (e.g. a CUDA event's synchronize)."""

    @property
    def n_tokens(self) -> int:
        return len(self.sample_id)


class StoreMismatchError(ValueError):
    """The path holds something other than this run's store."""


class StoreIncompleteError(RuntimeError):
    """The store has not been committed complete."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _raw_dtype(model_dtype: torch.dtype) -> np.dtype:
    if model_dtype in (torch.bfloat16, torch.float16):
        return np.dtype(np.uint16)
    if model_dtype == torch.float32:
        return np.dtype(np.float32)
    raise ConfigError(f"model.torch_dtype: raw encoding supports bfloat16, float16 and float32, not {model_dtype}")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _store_meta(path: Path) -> dict | None:
    """The refusal_lab group attributes of the store at `path`, or None when it is not one."""
    group = _read_json(path / "zarr.json")
    if not group or group.get("node_type") != "group":
        return None
    meta = group.get("attributes", {}).get(ATTRS_KEY)
    return meta if isinstance(meta, dict) and "fingerprint" in meta else None


def _array(group: zarr.Group, name: str) -> zarr.Array:
    arr = group[name]
    assert isinstance(arr, zarr.Array), name
    return arr


def _group_meta(group: zarr.Group) -> dict[str, Any]:
    meta = group.attrs[ATTRS_KEY]
    assert isinstance(meta, dict)
    return dict(meta)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # nothing to sync: a resize that dropped a chunk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    for i in range(first, -(-stop // rows)):
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
            name: _array(group, name).with_config({"write_empty_chunks": True})
            for name in [f"acts/{h}" for h in self.hook_points]
            + [f"tokens/{k}" for k in TOKEN_FIELDS]
            + [f"samples/{k}" for k in SAMPLE_FIELDS]
        }
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
            _raw_dtype(model_dtype)
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "hook_points": list(hook_points),
            "d_model": int(d_model),
            "encoding": encoding,
            "model_dtype": _dtype_name(model_dtype),
        }
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            existing = _store_meta(path) if path.is_dir() else None
            if existing is None:
                raise StoreMismatchError(
                    f"store_path: {path} exists and is not an activation store; pick another store_path or delete it"
                )
            if existing["fingerprint"] != fingerprint:
                raise StoreMismatchError(
                    f"store_path: {path} holds a different run (fingerprint {existing['fingerprint']}, this run "
                    f"{fingerprint}); pick another store_path or delete it"
                )
            manifest = _read_json(path / MANIFEST)
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
        act_dtype = _raw_dtype(getattr(torch, meta["model_dtype"])) if raw else np.dtype(np.float16)
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
            if self.encoding == "raw" and _dtype_name(part.dtype) != self.model_dtype:
                raise ValueError(
                    f"store: acts[{hook}] is {part.dtype}; raw encoding of this store needs {self.model_dtype}"
                )
        target = getattr(torch, self.model_dtype) if self.encoding == "raw" else torch.float16
        if len(parts) == 1 and parts[0].dtype == target and parts[0].device.type == "cpu":
            out_ND = parts[0].detach().contiguous()  # already in the stored dtype: no copy
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
        n_inf_in = sum(int(torch.isinf(p).sum()) for p in parts if p.dtype != torch.float16)  # inf before storing
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
            codec = _direct_codec(arr)
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
        rows = arr.chunks[0]
        folder = self.path / name
        paths = [folder / "zarr.json"]
        for i in range(start // rows, -(-stop // rows)):
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
            self._group.attrs[ATTRS_KEY] = {**_group_meta(self._group), **extra}
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
    loses only uncommitted blocks, and a resume recomputes them.
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
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
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


class ActivationStore:
    """Read-only view of a committed store (only committed rows are exposed)."""

    def __init__(self, path: Path, group: zarr.Group, manifest: dict) -> None:
        self.path = path
        self._group = group
        self._manifest = manifest
        self.attrs = _group_meta(group)
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
        path = Path(path)
        if _store_meta(path) is None:
            raise FileNotFoundError(f"store: {path} is not an activation store (no zarr group with {ATTRS_KEY} attrs)")
        manifest = _read_json(path / MANIFEST)
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
            self._acts[hook] = _array(self._group, f"acts/{hook}")  # opened once: each open reads zarr.json
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
        return {k: np.asarray(_array(self._group, f"tokens/{k}")[: self.n_tokens]) for k in TOKEN_FIELDS}

    def samples(self) -> dict[str, np.ndarray | list]:
        """Columnar sample table; string columns are lists of str."""
        out: dict[str, np.ndarray | list] = {}
        for name, dtype in SAMPLE_FIELDS.items():
            values = np.asarray(_array(self._group, f"samples/{name}")[: self.n_samples])
            out[name] = [str(v) for v in values.tolist()] if dtype is str else values
        return out

    def overflow_counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._manifest["overflow_counts"].items()}


def estimate_store_bytes(
    n_tokens: int, n_hooks: int, d_model: int, encoding: str, model_dtype: torch.dtype | None = None
) -> int:
    """Uncompressed size: activations plus the 13-byte token table row (samples are negligible)."""
    if encoding not in ENCODINGS:
        raise ConfigError(f"inference.store_dtype: {encoding!r} is not one of {', '.join(ENCODINGS)}")
    width = 4 if encoding == "raw" and model_dtype == torch.float32 else 2
    return n_tokens * (n_hooks * d_model * width + 13)


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
