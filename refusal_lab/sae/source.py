"""Where SAE training reads activations from: the collect stage's store, or arrays in memory.

`open_store` opens the Zarr activation store (refusal_lab.store); `ArraySource` holds the same
tables in memory (tests, benchmarks, notebooks). Both satisfy `ActivationSource`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class ActivationSource(Protocol):
    """The reader API of refusal_lab.store.ActivationStore that the sae stage uses."""

    @property
    def hook_points(self) -> list[str]: ...
    @property
    def d_model(self) -> int: ...
    @property
    def n_tokens(self) -> int: ...
    @property
    def fingerprint(self) -> str: ...
    def read(self, hook: str, start: int, stop: int) -> np.ndarray: ...
    def tokens(self) -> dict[str, np.ndarray]: ...
    def samples(self) -> dict[str, Any]: ...


def open_store(path: Path) -> ActivationSource:
    from refusal_lab.store import ActivationStore

    return ActivationStore.open(path)


@dataclass
class ArraySource:
    """An activation source held in memory, with the store's layout.

    `acts[hook]` is [n_tokens, d_model]; `token_table` has sample_id, position, phase, token_id
    per token; `sample_table` has at least sample_id, label, category per sample.
    """

    acts: dict[str, np.ndarray]
    token_table: dict[str, np.ndarray]
    sample_table: dict[str, Any]
    fingerprint: str = "in-memory"
    reads: list[tuple[str, int, int]] = field(default_factory=list)
    """Every read() call, so tests can check the access pattern."""

    @property
    def hook_points(self) -> list[str]:
        return list(self.acts)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.acts.values())).shape[1])

    @property
    def n_tokens(self) -> int:
        return int(next(iter(self.acts.values())).shape[0])

    def read(self, hook: str, start: int, stop: int) -> np.ndarray:
        self.reads.append((hook, start, stop))
        return np.asarray(self.acts[hook][start:stop], dtype=np.float32)

    def tokens(self) -> dict[str, np.ndarray]:
        return self.token_table

    def samples(self) -> dict[str, Any]:
        return self.sample_table
