"""The selective over-refusal score (issue 16 item 2) on a constructed model with one shared and one specific feature.

The constructed model: the refusal metric is linear in three SAE features at two hook points,
m = 2 * shared + 1 * trigger (+ 0 * noise), so an attribution (effect = weight x (activation -
baseline), exact for a linear metric) is known per prompt. `shared` (a refusal-output feature)
fires on every refused prompt, `trigger` only on safe prompts with a trigger word, `noise` on
everything. Toxic contrast: toxic (refused, no trigger) vs harmless; over_refusal contrast:
refused safe (trigger) vs answered safe. The selective circuit must hold `trigger` alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from refusal_lab.circuits.selective import selective_nodes, selectivity_scores

WEIGHTS = {"residuals_0": np.array([0.0, 1.0, 0.0]), "residuals_3": np.array([2.0, 0.0, 0.0])}
# per hook: features [a, b, c]; residuals_0 holds the trigger feature (1), residuals_3 the shared one (0)


def acts(shared: float, trigger: float, noise: float = 1.0) -> dict[str, np.ndarray]:
    return {"residuals_0": np.array([noise, trigger, noise]), "residuals_3": np.array([shared, noise, noise])}


def mean_effects(target: list[dict[str, np.ndarray]], contrast: list[dict[str, np.ndarray]], scale: float = 1.0):
    """Mean attribution over the target prompts with the contrast's mean activation as baseline."""
    out = {}
    for hook, w in WEIGHTS.items():
        baseline = np.mean([a[hook] for a in contrast], axis=0)
        out[hook] = scale * np.mean([w * (a[hook] - baseline) for a in target], axis=0)
    return out


@pytest.mark.parametrize("toxic_scale", [1.0, 10.0, 0.1])
def test_only_the_specific_feature_is_selective_whatever_the_metric_scales(toxic_scale):
    toxic = mean_effects([acts(1, 0)] * 4, [acts(0, 0)] * 4, scale=toxic_scale)
    over_refusal = mean_effects([acts(1, 1)] * 4, [acts(0, 0)] * 4)
    scores = selectivity_scores(over_refusal, toxic)
    assert scores["residuals_0"][1] > 0  # the trigger feature
    assert (
        scores["residuals_3"][0] == 0
    )  # the shared refusal-output feature: a larger share of toxic than of over_refusal
    assert np.count_nonzero(np.concatenate(list(scores.values()))) == 1
    assert selective_nodes(over_refusal, toxic, share=1.0, size=8) == [("residuals_0", 1, pytest.approx(1 / 3))]
    # The plain over_refusal ranking puts the shared feature first: what the selective score corrects.
    ranked = sorted(((abs(v), h, f) for h, a in over_refusal.items() for f, v in enumerate(a)), reverse=True)
    assert ranked[0][1:] == ("residuals_3", 0)


def test_a_feature_that_lowers_over_refusal_or_drives_only_toxic_is_never_selective():
    toxic = {"residuals_0": np.array([0.0, 0.0, 3.0])}
    over_refusal = {"residuals_0": np.array([-1.0, 2.0, 1.0])}
    scores = selectivity_scores(over_refusal, toxic)["residuals_0"]
    assert scores[0] == 0 and scores[1] == pytest.approx(0.5) and scores[2] == 0
    assert selective_nodes({"residuals_0": np.zeros(3)}, toxic, 1.0, 4) == []
