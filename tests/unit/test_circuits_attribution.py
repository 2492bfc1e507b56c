"""Node-effect estimates checked against the truth on the organism (a tiny trained Llama) with an SAE spliced in.

Exact effect of a feature: m(model) - m(model with that feature set to its contrast-mean baseline at
every position), one forward per feature. Bounds (measured 0.98 and 0.68 on these prompts):
attribution patching is a first-order estimate of exactly this ablation, so its correlation with
the exact effects must be >= 0.9; integrated gradients attribute the whole baseline-to-actual
change along a shared path rather than one feature's removal, so the bound is looser (>= 0.5), and
IG is checked for completeness instead: at one hook point, all features plus the error node add
up to m(model) - m(hook set to its baseline) within 5%.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from refusal_lab.circuits.attribution import exact_effects, node_effects
from refusal_lab.circuits.baseline import mean_baseline
from refusal_lab.circuits.batches import make_text_batches
from refusal_lab.circuits.config import Method, MetricConfig
from refusal_lab.circuits.metric import metric_spec, refusal_metric
from refusal_lab.circuits.spliced import forward_batch, spliced
from refusal_lab.config import ModelConfig
from refusal_lab.models import ORGANISM_DIR, load_model, load_tokenizer
from refusal_lab.sae.config import Architecture
from refusal_lab.sae.model import Sae

HOOK = "residuals_2"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = ModelConfig()
    tokenizer, model = load_tokenizer(cfg), load_model(cfg)
    model.requires_grad_(False)
    rows = [json.loads(line) for line in (ORGANISM_DIR / "heldout_prompts.jsonl").read_text().splitlines()]
    toxic = [r["prompt"] for r in rows if r["label"] == "toxic"][:4]
    harmless = [r["prompt"] for r in rows if r["label"] == "harmless"][:16]
    d = model.config.hidden_size
    saes = {HOOK: Sae(d, 4 * d, Architecture.topk, k=16).eval().requires_grad_(False)}
    spec = metric_spec(MetricConfig(), tokenizer, cfg.refusal_tokens)
    baseline = mean_baseline(model, saes, make_text_batches(cfg, tokenizer, harmless, 16, 512))
    batch = make_text_batches(cfg, tokenizer, toxic, 8, 512)[0]
    return model, saes, spec, baseline, batch


def test_attribution_patching_and_ig_correlate_with_exact_single_feature_ablations(setup):
    model, saes, spec, baseline, batch = setup
    atp = node_effects(model, saes, [batch], baseline, spec, Method.attribution_patching)
    ig = node_effects(model, saes, [batch], baseline, spec, Method.ig, steps=4)
    strongest = np.argsort(-np.abs(atp.mean_feats(HOOK)))[:20]
    exact = exact_effects(model, saes, batch, baseline, spec, [(HOOK, int(f)) for f in strongest])  # [nodes, B]
    rows = batch.index
    for name, effects, bound in (("attribution patching", atp, 0.9), ("integrated gradients", ig, 0.5)):
        est = np.stack([effects.feats[HOOK][rows, f] for f in strongest])
        r = np.corrcoef(est.ravel(), exact.ravel())[0, 1]
        assert r >= bound, f"{name}: per-prompt correlation with exact ablation {r:.3f} < {bound}"
    assert np.all(np.sign(atp.mean_feats(HOOK)[strongest[:5]]) == np.sign(exact.mean(1)[:5]))


def test_integrated_gradients_are_complete_at_one_hook(setup):
    model, saes, spec, baseline, batch = setup
    ig = node_effects(model, saes, [batch], baseline, spec, Method.ig, steps=16)
    with torch.no_grad():
        with spliced(model, saes):
            clean = refusal_metric(forward_batch(model, batch), batch, spec)

        def to_baseline(hook, f, e):
            bf, be = baseline.expand(hook, batch)
            return bf.to(f), be.to(e)

        with spliced(model, saes, to_baseline):
            base = refusal_metric(forward_batch(model, batch), batch, spec)
    want = (clean - base).numpy()
    got = ig.feats[HOOK].sum(1)[batch.index] + ig.errors[HOOK][batch.index]
    assert np.all(np.abs(want) > 1.0), want  # a real change to attribute
    np.testing.assert_allclose(got, want, rtol=0.05)
    # Padding cells carry no effect, and per-position totals add up to the per-prompt sums.
    for i in batch.index:
        assert len(ig.pos_feats[HOOK][i]) == len(ig.token_ids[i])
        assert np.isclose(ig.pos_feats[HOOK][i].sum(), ig.feats[HOOK][i].sum(), rtol=1e-4, atol=1e-4)
