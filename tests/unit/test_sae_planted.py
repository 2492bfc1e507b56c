"""Training recovers a planted dictionary: the test a broken trainer (wrong gradients, no decoder
normalisation, a data pipeline that scrambles rows) fails.

Data: every token is a nonnegative combination of 4 of 128 random unit directions in 32 dimensions,
plus 1% noise (refusal_lab.sae.synthetic). A TopK SAE with 256 latents and k=4 must put a decoder row
on each direction: mean best cosine > 0.9 (an untrained SAE scores about 0.6 here).
"""

from __future__ import annotations

import numpy as np
import pytest

from refusal_lab.sae.config import Architecture, SaeConfig
from refusal_lab.sae.saelens import load_sae
from refusal_lab.sae.stage import train_saes
from refusal_lab.sae.synthetic import max_cosine, planted_source

BOUND = {Architecture.topk: 0.9, Architecture.batchtopk: 0.8}


@pytest.mark.parametrize("architecture", [Architecture.topk, Architecture.batchtopk])
def test_sae_recovers_planted_directions(tmp_path, architecture):
    source, directions = planted_source(n_samples=240, tokens_per_sample=50, d=32, n_features=128, active=4)
    cfg = SaeConfig(
        architecture=architecture, expansion_factor=8, k=4, epochs=5, batch_size=128, lr=1e-2, ce_max_samples=0
    )
    result = train_saes(source, cfg, tmp_path, model_loader=None, seed=0)["residuals_0"]
    sae = load_sae(tmp_path / "residuals_0")
    cosines = max_cosine(directions["residuals_0"], sae.W_dec.numpy())
    untrained = max_cosine(directions["residuals_0"], np.random.default_rng(123).normal(size=(256, 32)))
    assert untrained.mean() < 0.7
    assert cosines.mean() > BOUND[architecture], f"mean max-cosine {cosines.mean():.3f}"
    assert result["fvu"] < 0.35
    assert 3.0 <= result["l0"] <= 4.0
