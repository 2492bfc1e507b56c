"""The refusal metric reads the right position of each left-padded row, for every kind."""

from __future__ import annotations

import pytest
import torch

from refusal_lab.circuits.batches import build_batch
from refusal_lab.circuits.config import CircuitsConfig, MetricConfig, MetricKind
from refusal_lab.circuits.metric import MetricSpec, refusal_metric
from refusal_lab.errors import ConfigError
from refusal_lab.refusal import refusal_score

V = 11


def _batch_and_logits(responses=None):
    batch = build_batch([[5, 6, 7, 8], [5, 9]], n_post=1, pad_id=0, responses=responses)
    torch.manual_seed(0)
    return batch, torch.randn(batch.size, batch.width, V, dtype=torch.float64, requires_grad=True)


def test_first_token_score_is_the_recorded_score_at_each_rows_last_prompt_token():
    batch, logits = _batch_and_logits()
    got = refusal_metric(logits, batch, MetricSpec(MetricKind.first_token_score, (3, 4)))
    # Row 1 is left padded by two: its last prompt token sits in the last column like row 0's.
    for row in range(2):
        want = refusal_score(logits[row, batch.width - 1][None], [3, 4])[0]
        assert torch.allclose(got[row], want)
    got.sum().backward()  # differentiable: node effects are its gradients
    assert logits.grad is not None and logits.grad[:, :-1].abs().sum() == 0


def test_logit_diff_is_refusal_minus_compliance_logsumexp():
    batch, logits = _batch_and_logits()
    got = refusal_metric(logits, batch, MetricSpec(MetricKind.logit_diff, (3,), (1, 2)))
    last = logits[:, -1]
    assert torch.allclose(got, last[:, 3] - torch.logsumexp(last[:, [1, 2]], -1))


def test_response_score_averages_the_first_k_response_positions():
    batch, logits = _batch_and_logits(responses=[[1, 2, 3], [4]])
    got = refusal_metric(logits, batch, MetricSpec(MetricKind.response_score, (3,), k=2))
    for row, n in ((0, 2), (1, 1)):  # row 1 has one response token: only j = 0
        last = int(batch.last_prompt_index[row])
        want = torch.stack([refusal_score(logits[row, last + j][None], [3])[0] for j in range(n)]).mean()
        assert torch.allclose(got[row], want)


def test_bad_metric_and_circuits_settings_name_the_key():
    with pytest.raises(ConfigError, match="circuits.metric.compliance_tokens"):
        MetricConfig(kind=MetricKind.logit_diff)
    with pytest.raises(ConfigError, match=r"circuits.ig_steps: 0 must be >= 1"):
        CircuitsConfig(ig_steps=0)
    with pytest.raises(ConfigError, match=r"circuits.validation_share"):
        CircuitsConfig(validation_share=1.0)
