"""Edges between feature nodes of successive hook points: present, and equal to a finite difference.

The edge u -> d is sum over positions of dm/dd * d(d)/d(u) * (u - u_baseline); with a zero baseline and
every other input held fixed, that is the derivative of S(t) = sum_pos g_d * d(f_up + t * delta_u) at t = 0,
where g_d is dm/dd from the unedited forward. TopK encoders are piecewise linear, so a small step is exact
up to float error unless it moves a feature across the top-k boundary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusal_lab.circuits.baseline import zero_baseline
from refusal_lab.circuits.config import MetricKind
from refusal_lab.circuits.edges import ERROR, _batch_edges, hook_order
from refusal_lab.circuits.metric import MetricSpec, logits_needed, refusal_metric
from refusal_lab.circuits.spliced import forward_batch, spliced
from tests.integration.circuits_fixtures import load_tiny, random_saes, small_batch, tiny_pad_id

SPEC = MetricSpec(MetricKind.first_token_score, (306, 1724))


@pytest.fixture(scope="module")
def model(tiny_llama: Path):
    return load_tiny(tiny_llama)


@pytest.fixture(scope="module")
def batch(tiny_llama: Path):
    return small_batch(tiny_pad_id(tiny_llama))


def _active_features(model, saes, batch, hook: str, n: int) -> list[int]:
    with torch.no_grad(), spliced(model, saes) as run:
        forward_batch(model, batch)
    counts = (run.feats[hook] > 0).sum(dim=(0, 1))
    return torch.argsort(counts, descending=True)[:n].tolist()


def test_feature_to_feature_edges_exist_and_match_a_finite_difference(model, batch):
    saes = random_saes(model.config.hidden_size)
    up, down = hook_order(list(saes))[:2]
    nodes = {up: _active_features(model, saes, batch, up, 4), down: _active_features(model, saes, batch, down, 4)}
    edges = _batch_edges(model, saes, batch, zero_baseline(saes), SPEC, nodes, [(up, down)])

    feature_edges = {k: v for k, v in edges.items() if k[0][1] != ERROR and k[1][1] != ERROR}
    assert len(feature_edges) == len(nodes[up]) * len(nodes[down])
    assert any(abs(v) > 1e-6 for v in feature_edges.values()), "no feature -> feature edge carries any effect"

    # dm/dd from one plain spliced forward (the leaf features' gradient).
    with torch.enable_grad(), spliced(model, saes) as run:
        m = refusal_metric(forward_batch(model, batch, logits_needed(batch, SPEC)), batch, SPEC)
        (g_down,) = torch.autograd.grad(m.sum(), [run.feats[down]])
    real = (batch.phase >= 0)[..., None].float()

    (_, u), (_, d) = max(feature_edges, key=lambda k: abs(feature_edges[k]))
    value = feature_edges[((up, u), (down, d))]

    def s_of(t: float) -> float:
        def edit(hook, f, e):
            if hook == up:
                f = f.clone()
                f[..., u] = f[..., u] + t * f[..., u] * real[..., 0]  # delta_u = f_u - 0 (zero baseline)
            return f, e

        with torch.no_grad(), spliced(model, saes, edit) as run:
            forward_batch(model, batch)
        return float((g_down[..., d] * run.encoded[down][..., d]).sum())

    eps = 1e-3
    finite = (s_of(eps) - s_of(-eps)) / (2 * eps)
    assert value == pytest.approx(finite, rel=2e-2, abs=1e-5)
