"""Circuit size by a faithfulness target (issue 16 item 1) on a constructed additive model.

The constructed model: the metric is a sum of per-feature contributions w_i, so keeping the top n
ranked features recovers faithfulness(n) = sum(w[:n]) / sum(w), and the size a target needs is
known in closed form. The search must find it while measuring far fewer sizes than a full walk.
"""

from __future__ import annotations

import numpy as np
import pytest

from refusal_lab.circuits.config import CircuitsConfig
from refusal_lab.circuits.size import search_size
from refusal_lab.errors import ConfigError


def additive(weights: list[float]):
    share = np.cumsum(weights) / np.sum(weights)
    calls: list[list[int]] = []

    def faithfulness_of(sizes):
        calls.append(list(sizes))
        return {n: float(share[n - 1]) for n in sizes}

    return faithfulness_of, calls, share


@pytest.mark.parametrize("needed", [1, 2, 13, 64, 65, 100])
def test_search_finds_the_fewest_features_that_reach_the_target(needed):
    # `needed` strong features of weight 1 carry 85% of the metric; 200 weak ones share the rest.
    strong, weak = [1.0] * needed, [0.15 * needed / 0.85 / 200] * 200
    faithfulness_of, calls, share = additive(strong + weak)
    want = int(np.argmax(share >= 0.8)) + 1  # closed form: first n whose share reaches the target
    search = search_size(faithfulness_of, len(share), 0.8)
    assert search.met and search.size == want and search.faithfulness == pytest.approx(share[want - 1])
    assert want <= needed  # the construction: the strong features alone carry more than the target
    measured = sum(len(c) for c in calls)
    assert measured <= 2 * int(np.log2(len(share))) + 2, calls  # doubling + bisection, not a walk of 200+ sizes
    entry = search.to_json()
    assert entry["n_nodes"] == want and entry["met"] is True and entry["reason"] is None
    assert entry["searched"][str(want)] == pytest.approx(share[want - 1])


def test_a_target_out_of_reach_keeps_the_best_size_and_says_so():
    # Non-monotone: the top 4 overshoot (0.6), later features pull the metric back down to 0.5.
    curve = {n: (0.6 if n == 4 else 0.15 * min(n, 4) if n < 4 else 0.5) for n in range(1, 41)}
    search = search_size(lambda sizes: {n: curve[n] for n in sizes}, 40, 0.8)
    assert not search.met and search.size == 4 and search.faithfulness == 0.6
    assert "0.600" in search.to_json()["reason"] and "target 0.8" in search.to_json()["reason"]


def test_no_candidates_and_a_flat_metric():
    assert search_size(lambda sizes: {}, 0, 0.8).size == 0
    flat = search_size(lambda sizes: dict.fromkeys(sizes), 10, 0.8)  # m(M) == m(empty): faithfulness undefined
    assert not flat.met and flat.faithfulness is None


@pytest.mark.parametrize("value", [0.0, 1.5, -0.2])
def test_a_bad_target_is_one_error_naming_key_value_and_range(value):
    with pytest.raises(ConfigError, match=rf"circuits.faithfulness_target: {value} must be in \(0, 1\], or null"):
        CircuitsConfig(faithfulness_target=value)
    assert CircuitsConfig(faithfulness_target=None).faithfulness_target is None  # null: the fixed circuit_size
