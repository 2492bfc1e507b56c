"""The Zarr activation store: layout, append with commit, resume after a kill, read.

Written by the collect stage (through `StoreWriter`, usually behind a `BackgroundWriter`);
read by the sae stage and the summary (through `ActivationStore`). The layout is plain
zarr v3 on local disk, so `zarr.open_group(path, mode="r")` reads it without this module::

    <path>/                      zarr v3 group; attrs {"refusal_lab": {format_version, fingerprint,
                                 hook_points, d_model, encoding, model_dtype, chunk_tokens, ...caller attrs}}
      acts/<hook>                [n_tokens, d_model], chunks (chunk_tokens, d_model), zstd level 1;
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
fsync of the folder). zarr 3.1.6's LocalStore writes every chunk to a temp file and renames it
(`_atomic_write` in zarr/storage/_local.py), so a kill cannot tear the boundary chunk that also
holds committed rows; with `durable=True` the touched chunk files are fsynced before the
manifest, so a node crash cannot leave a manifest pointing at data that never reached disk.
On resume every array is cut back to the manifest's counts.

Strings use zarr's "string" data type (`dtype=str`, vlen-utf8 codec), which has a registered
zarr v3 extension spec: zarr 3.1.6 emits no UnstableSpecificationWarning for it (fixed-width
"U" strings would warn), and tests/unit/test_store.py fails if that changes.

Compression: zstd level 1 (stored/raw size, zstd 1-9 alike to 0.01; level 9 is 2-10x slower):
float16 from a float32 model 0.91-0.94, from a bf16 model 0.76-0.80 (bf16 -> float16 leaves two
mantissa bits zero and is exact inside float16's range), raw bf16 0.77-0.81; measured on Gaussian,
Gaussian with per-dimension scales, a trained tiny Llama's (stories260K) and a random-init Llama's
residual stream. Activations are mostly mantissa noise; only the exponent bits compress.

Shape letters: N tokens of a block, D d_model.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from refusal_lab.config import ConfigError
from refusal_lab.fingerprint import write_json_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ATTRS_KEY = "refusal_lab"
ENCODINGS = ("float16", "raw")
ZSTD_LEVEL = 1
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

    @classmethod
    def concat(cls, blocks: list[TokenBlock]) -> TokenBlock:
        """One block holding `blocks` in order (their pending copies waited for)."""
        if len(blocks) == 1:
            return blocks[0]
        for block in blocks:
            if block.ready is not None:
                block.ready()
        return cls(
            samples=[s for b in blocks for s in b.samples],
            sample_id=np.concatenate([b.sample_id for b in blocks]),
            position=np.concatenate([b.position for b in blocks]),
            phase=np.concatenate([b.phase for b in blocks]),
            token_id=np.concatenate([b.token_id for b in blocks]),
            acts={hook: torch.cat([b.acts[hook] for b in blocks]) for hook in blocks[0].acts},
        )


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
        return  # an all-fill chunk is deleted rather than written
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self._arrays: dict[str, zarr.Array] = {
            name: _array(group, name)
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
        for name, shape, chunks, dtype, arr_attrs in specs:
            group.create_array(
                name, shape=shape, chunks=chunks, dtype=dtype, compressors=ZstdCodec(level=ZSTD_LEVEL),
                fill_value="" if dtype is str else 0, attributes=arr_attrs,
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

    def _encode(self, hook: str, acts_ND: torch.Tensor, n: int) -> tuple[np.ndarray, int]:
        """The stored values of one hook's activations, and how many overflowed float16."""
        acts_ND = acts_ND.detach().cpu()
        if tuple(acts_ND.shape) != (n, self.d_model):
            raise ValueError(f"store: acts[{hook}] has shape {tuple(acts_ND.shape)}, expected [{n}, {self.d_model}]")
        if self.encoding == "raw":
            if _dtype_name(acts_ND.dtype) != self.model_dtype:
                raise ValueError(
                    f"store: acts[{hook}] is {acts_ND.dtype}; raw encoding of this store needs {self.model_dtype}"
                )
            bits = acts_ND.view(torch.uint16) if acts_ND.element_size() == 2 else acts_ND
            return bits.contiguous().numpy(), 0
        if acts_ND.dtype == torch.float16:
            return acts_ND.contiguous().numpy(), 0
        # torch releases the GIL here, so conversion in the writer thread overlaps the compute thread.
        half = acts_ND.to(torch.float16).numpy()
        # Counting on the bits (float16 inf: exponent all ones, mantissa 0) is ~30x faster than torch.isinf on half.
        n_inf = int(np.count_nonzero((half.view(np.uint16) & 0x7FFF) == 0x7C00))
        n_over = n_inf - int(torch.isinf(acts_ND).sum()) if n_inf else 0
        return half, n_over

    def append(self, block: TokenBlock) -> None:
        """Write one block at the committed offsets, then commit it in the manifest."""
        if self.complete:
            raise RuntimeError(f"store: {self.path} is complete; nothing may be appended")
        n = block.n_tokens
        for name in TOKEN_FIELDS:
            if len(getattr(block, name)) != n:
                raise ValueError(f"store: block.{name} has {len(getattr(block, name))} rows, block.sample_id {n}")
        if set(block.acts) != set(self.hook_points):
            raise ValueError(
                f"store: block hooks {sorted(block.acts)} differ from the store's {sorted(self.hook_points)}"
            )
        if block.ready is not None:
            block.ready()
        t0, s0 = self.committed_tokens, self.committed_samples
        t1, s1 = t0 + n, s0 + len(block.samples)
        columns: dict[str, tuple[np.ndarray, int, int]] = {}
        for name, dtype in TOKEN_FIELDS.items():
            columns[f"tokens/{name}"] = (np.asarray(getattr(block, name), dtype=dtype), t0, t1)
        for f in fields(SampleRecord):
            values = [getattr(s, f.name) for s in block.samples]
            dtype = SAMPLE_FIELDS[f.name]
            col = np.array(values, dtype=np.dtypes.StringDType()) if dtype is str else np.array(values, dtype=dtype)
            columns[f"samples/{f.name}"] = (col, s0, s1)
        overflow = dict(self._manifest["overflow_counts"])

        def write(name: str) -> list[Path]:
            arr = self._arrays[name]
            if name.startswith("acts/"):
                hook = name.removeprefix("acts/")
                values, n_over = self._encode(hook, block.acts[hook], n)
                overflow[hook] += n_over
                if n_over and hook not in self._warned:
                    self._warned.add(hook)
                    log.warning("store: %s has %d values beyond float16's range, stored as inf", hook, n_over)
                start, stop = t0, t1
            else:
                values, start, stop = columns[name]
            arr.resize((stop, *arr.shape[1:]))
            if stop > start:
                arr[start:stop] = values
            return self._touched(name, arr, start, stop) if self.durable else []

        # One thread per array: a small block rewrites one boundary chunk per hook, each a decode+encode.
        with ThreadPoolExecutor(max_workers=min(8, len(self._arrays))) as pool:
            touched = [p for paths in pool.map(write, list(self._arrays)) for p in paths]
            if self.durable:  # files, then the folders holding their new names, up to the store's root
                folders = {q for p in touched for q in p.parents if q.is_relative_to(self.path)}
                list(pool.map(_fsync, sorted(set(touched) | folders)))
        blocks = [*self._manifest["blocks"], {"samples": [s0, s1], "tokens": [t0, t1]}]
        self._commit({**self._manifest, "committed_samples": s1, "committed_tokens": t1, "blocks": blocks,
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
    """Runs `StoreWriter.append` in a thread behind a bounded queue, so compute never waits on disk."""

    def __init__(self, writer: StoreWriter, max_queue: int = 4) -> None:
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._error: BaseException | None = None
        self._reported = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stop = False
        while not stop:
            blocks = [self._queue.get()]
            # Coalesce whatever else is already waiting: each append has a fixed cost (one
            # boundary-chunk rewrite per array, a manifest commit), so when the writer falls
            # behind it catches up with fewer, larger appends instead of lagging further.
            while True:
                try:
                    blocks.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if blocks[-1] is _STOP or _STOP in blocks:
                stop = True
                blocks = [b for b in blocks if b is not _STOP]
            if blocks and self._error is None:  # after a failure keep draining, so submit/close never block
                try:
                    self.writer.append(TokenBlock.concat(blocks))
                except BaseException as err:  # handed to the submitting thread
                    self._error = err

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
