"""The Zarr activation store's on-disk format: layout, records, errors and small readers of its metadata.

The layer under every store module: refusal_lab.store (the readers `ActivationStore` and, for a
sharded collect, `JoinedStore`; it re-exports everything here), refusal_lab.store_parts (the
parts index) and refusal_lab.store_writer build on it and it imports none of them.

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


def estimate_store_bytes(
    n_tokens: int, n_hooks: int, d_model: int, encoding: str, model_dtype: torch.dtype | None = None
) -> int:
    """Uncompressed size: activations plus the 13-byte token table row (samples are negligible)."""
    if encoding not in ENCODINGS:
        raise ConfigError(f"inference.store_dtype: {encoding!r} is not one of {', '.join(ENCODINGS)}")
    width = 4 if encoding == "raw" and model_dtype == torch.float32 else 2
    return n_tokens * (n_hooks * d_model * width + 13)
