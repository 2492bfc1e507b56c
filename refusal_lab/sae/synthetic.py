"""Synthetic activations with a known sparse structure (a planted dictionary), in the store's layout.

Reads and writes nothing. Used by the tests (dictionary recovery, data plumbing) and by
benchmarks/bench_sae.py: every token is a sparse nonnegative combination of a few random unit
directions plus small noise, so a working SAE must find those directions.
"""

from __future__ import annotations

import numpy as np

from refusal_lab.sae.source import ArraySource

LABELS = ("harmless", "safe", "toxic")
CATEGORIES = ("illegal", "privacy", "violence", "hate")


def planted_codes(
    n: int, d: int, n_features: int, active: int, rng: np.random.Generator, noise: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """(x [n, d] float32, directions [n_features, d]): `active` random features per row, magnitudes in [0.5, 2]."""
    directions = rng.normal(size=(n_features, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n, n_features)), axis=1)[:, :active]
    magnitude = rng.uniform(0.5, 2.0, size=(n, active))
    x = np.einsum("na,nad->nd", magnitude, directions[idx]) + noise * rng.normal(size=(n, d))
    return x.astype(np.float32), directions


def planted_source(
    n_samples: int = 240,
    tokens_per_sample: int = 50,
    d: int = 32,
    n_features: int = 128,
    active: int = 4,
    hooks: tuple[str, ...] = ("residuals_0",),
    seed: int = 0,
    bos_scale: float = 50.0,
) -> tuple[ArraySource, dict[str, np.ndarray]]:
    """A store-shaped source whose hooks hold planted-dictionary activations, and each hook's directions.

    Each sample is `tokens_per_sample` tokens: position 0 is BOS (its activation scaled by
    `bos_scale`, like a real attention sink), the last 5 prompt tokens are post-instruction
    template tokens, and the final 10 are generated. Labels and categories cycle.
    """
    rng = np.random.default_rng(seed)
    n = n_samples * tokens_per_sample
    position = np.tile(np.arange(tokens_per_sample), n_samples)
    phase = np.where(position < tokens_per_sample - 15, 0, np.where(position < tokens_per_sample - 10, 1, 2))
    acts, directions = {}, {}
    for hook in hooks:
        x, dirs = planted_codes(n, d, n_features, active, rng)
        x[position == 0] *= bos_scale
        acts[hook], directions[hook] = x.astype(np.float16), dirs
    samples = np.arange(n_samples)
    tokens = {
        "sample_id": np.repeat(samples, tokens_per_sample).astype(np.int32),
        "position": position.astype(np.int32),
        "phase": phase.astype(np.int8),
        "token_id": rng.integers(3, 200, n).astype(np.int32),
    }
    table = {
        "sample_id": samples.astype(np.int32),
        "prompt": [f"planted prompt {i}" for i in samples],
        "label": [LABELS[i % len(LABELS)] for i in samples],
        "category": [CATEGORIES[(i // len(LABELS)) % len(CATEGORIES)] for i in samples],
    }
    return ArraySource(acts, tokens, table, fingerprint=f"planted-{seed}"), directions


def max_cosine(directions: np.ndarray, decoder: np.ndarray) -> np.ndarray:
    """For each planted direction, its best cosine with any decoder row ([n_features])."""
    rows = decoder / np.linalg.norm(decoder, axis=1, keepdims=True)
    return (directions @ rows.T).max(axis=1)
