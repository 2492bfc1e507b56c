"""The selective over-refusal circuit (issue 16 item 2): what makes *safe* prompts get refused, not any prompt.

Reads and writes nothing. The over_refusal circuit (safe refused vs safe answered) is dominated by
the refusal-output features that every refusal uses, so it ablates toxic refusal too. The
selective circuit keeps the features whose share of the over_refusal contrast's attribution is
large relative to their share of the toxic contrast's (toxic vs harmless):

    a_set(h, f) = mean effect of feature f at hook h on the set's discovery prompts / sum over all (h', f') |.|
    score(h, f) = a_over_refusal(h, f) - a_toxic(h, f)          (kept only where a_over_refusal > 0 and score > 0)

Each set's attributions are normalised by their own total |effect| first, so a feature that carries
the same share of both contrasts (a shared refusal-output feature) scores about 0, whatever the
two metrics' scales. The circuit is the top of this ranking, cut as a fixed-count circuit is
(`node_share` of the total positive score, at most `circuit_size`), and validated like any
pooled set, on the over_refusal set's held-out prompts against random same-size sets.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from refusal_lab.circuits.edges import select_nodes

MEANS_FILE = "mean_effects.npz"
"""Per set: hook -> mean node effect per SAE feature on the discovery prompts (what the score reads)."""
NAME = "over_refusal_selective"
"""The selective circuit's set name (its folder under sets/, its summary entry, an edit.source value)."""
SCORING = (
    "score = a_over_refusal - a_toxic, each set's mean feature effects divided by their total |effect| over all "
    "hooks; features with a_over_refusal > 0 and score > 0, by score"
)


def write_means(folder: Path, means: Mapping[str, np.ndarray]) -> None:
    np.savez(folder / MEANS_FILE, **{h: np.asarray(v, np.float32) for h, v in means.items()})  # pyright: ignore[reportArgumentType]


def read_means(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / MEANS_FILE) as npz:
        return {h: np.asarray(npz[h], np.float64) for h in npz.files}


def normalised(means: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    total = sum(float(np.abs(v).sum()) for v in means.values())
    return {
        h: np.asarray(v, np.float64) / total if total > 0 else np.zeros_like(v, np.float64) for h, v in means.items()
    }


def selectivity_scores(
    over_refusal: Mapping[str, np.ndarray], toxic: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """hook -> score per feature (0 where the feature does not raise over-refusal or is not selective)."""
    a_or, a_tox = normalised(over_refusal), normalised(toxic)
    out = {}
    for hook, a in a_or.items():
        score = a - a_tox.get(hook, np.zeros_like(a))
        out[hook] = np.where((a > 0) & (score > 0), score, 0.0)
    return out


def selective_nodes(
    over_refusal: Mapping[str, np.ndarray], toxic: Mapping[str, np.ndarray], share: float, size: int
) -> list[tuple[str, int, float]]:
    """(hook, feature, score) of the selective circuit, strongest first."""
    return select_nodes(selectivity_scores(over_refusal, toxic), 0.0, share, size)
