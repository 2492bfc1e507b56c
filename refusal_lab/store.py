"""The Zarr activation store: layout, append with commit, resume after a kill, read.

Written by the collect stage (through refusal_lab.store_writer: `StoreWriter`, usually behind a
`BackgroundWriter`);
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
LocalStore, `_atomic_write` in zarr/storage/_local.py, or by `_write_rows_direct` in refusal_lab.store_writer), so a
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

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from refusal_lab.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ATTRS_KEY = "refusal_lab"
ENCODINGS = ("float16", "raw")
ZSTD_LEVEL = 1
ACTS_CODEC = {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}
"""Blosc lz4 after a bit shuffle, for activations: see "Compression" above."""
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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def raw_dtype(model_dtype: torch.dtype) -> np.dtype:
    if model_dtype in (torch.bfloat16, torch.float16):
        return np.dtype(np.uint16)
    if model_dtype == torch.float32:
        return np.dtype(np.float32)
    raise ConfigError(f"model.torch_dtype: raw encoding supports bfloat16, float16 and float32, not {model_dtype}")


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def store_meta(path: Path) -> dict | None:
    """The refusal_lab group attributes of the store at `path`, or None when it is not one."""
    group = read_json(path / "zarr.json")
    if not group or group.get("node_type") != "group":
        return None
    meta = group.get("attributes", {}).get(ATTRS_KEY)
    return meta if isinstance(meta, dict) and "fingerprint" in meta else None


def open_array(group: zarr.Group, name: str) -> zarr.Array:
    arr = group[name]
    assert isinstance(arr, zarr.Array), name
    return arr


def group_meta(group: zarr.Group) -> dict[str, Any]:
    meta = group.attrs[ATTRS_KEY]
    assert isinstance(meta, dict)
    return dict(meta)


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
        if (path / "parts.json").is_file():
            from refusal_lab.store_parts import JoinedStore  # store_parts builds on this module

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


def estimate_store_bytes(
    n_tokens: int, n_hooks: int, d_model: int, encoding: str, model_dtype: torch.dtype | None = None
) -> int:
    """Uncompressed size: activations plus the 13-byte token table row (samples are negligible)."""
    if encoding not in ENCODINGS:
        raise ConfigError(f"inference.store_dtype: {encoding!r} is not one of {', '.join(ENCODINGS)}")
    width = 4 if encoding == "raw" and model_dtype == torch.float32 else 2
    return n_tokens * (n_hooks * d_model * width + 13)
