"""Stage orchestration on in-memory activations: skipping, CE availability, grouping, thread scope."""

from __future__ import annotations

import json

import numpy as np
import torch

from refusal_lab.sae.config import Balance, SaeConfig, TokenFilterConfig
from refusal_lab.sae.data import plan_tokens
from refusal_lab.sae.saelens import CFG, METRICS
from refusal_lab.sae.stage import train_saes
from refusal_lab.sae.synthetic import planted_source

HOOKS = ("residuals_0", "residuals_1", "mlp_1")


def quick_cfg(**overrides) -> SaeConfig:
    base = dict(expansion_factor=2, k=4, epochs=1, batch_size=128, hooks_per_group=2, buffer_tokens=512)
    return SaeConfig(**{**base, **overrides})


def test_stage_trains_groups_then_skips_complete_hooks(tmp_path):
    source, _ = planted_source(n_samples=60, tokens_per_sample=20, d=16, n_features=32, hooks=HOOKS)
    threads = torch.get_num_threads()
    first = train_saes(source, quick_cfg(), tmp_path, model_loader=None, seed=0)
    assert torch.get_num_threads() == threads  # sae.cpu_threads applies inside the stage only
    assert sorted(first) == sorted(HOOKS)
    assert all(v["ce_recovered"] is None for v in first.values())
    reason = json.loads((tmp_path / "mlp_1" / METRICS).read_text())["ce_reason"]
    assert "model_loader" in reason
    source.reads.clear()
    assert train_saes(source, quick_cfg(), tmp_path, model_loader=None, seed=0) == first
    assert source.reads == []  # nothing re-read, nothing retrained
    (tmp_path / "residuals_1" / METRICS).unlink()
    again = train_saes(source, quick_cfg(), tmp_path, model_loader=None, seed=0)
    assert {hook for hook, _, _ in source.reads} == {"residuals_1"}  # only the incomplete hook is trained
    assert np.isclose(again["residuals_1"]["fvu"], first["residuals_1"]["fvu"], rtol=1e-5)


def test_ce_is_null_with_a_reason_when_the_store_lacks_full_sequences(tmp_path):
    source, _ = planted_source(n_samples=40, tokens_per_sample=20, d=16, n_features=32)
    source.token_table["position"] = source.token_table["position"] + 100  # e.g. positions=generated
    cfg = quick_cfg(filters=TokenFilterConfig(drop_bos=False))
    calls = []
    result = train_saes(source, cfg, tmp_path, model_loader=lambda: calls.append(1), seed=0)
    metrics = json.loads((tmp_path / "residuals_0" / METRICS).read_text())
    assert result["residuals_0"]["ce_recovered"] is None and "full token sequences" in metrics["ce_reason"]
    assert calls == []  # the model is not loaded when it cannot be used


def test_balanced_training_runs_and_keeps_unweighted_metrics(tmp_path):
    source, _ = planted_source(n_samples=60, tokens_per_sample=20, d=16, n_features=32)
    result = train_saes(source, quick_cfg(balance=Balance.label_category), tmp_path, model_loader=None, seed=0)
    metrics = json.loads((tmp_path / "residuals_0" / METRICS).read_text())
    assert result["residuals_0"]["fvu"] < 1.0 and metrics["eval_tokens"] > 0


def test_nonfinite_rows_are_dropped_counted_and_reported(tmp_path):
    source, _ = planted_source(n_samples=60, tokens_per_sample=20, d=16, n_features=32)
    acts = source.acts["residuals_0"]
    bad = np.arange(3, len(acts), 97)  # float16 overflow, spread over training and held-out samples
    acts[bad, 2] = np.inf
    cfg = quick_cfg(filters=TokenFilterConfig(outlier_factor=None), epochs=2)
    result = train_saes(source, cfg, tmp_path, model_loader=None, seed=0)["residuals_0"]
    metrics = json.loads((tmp_path / "residuals_0" / METRICS).read_text())
    assert np.isfinite(result["fvu"]) and result["fvu"] < 1.0
    scale = json.loads((tmp_path / "residuals_0" / CFG).read_text())["refusal_lab"]["input_scale"]
    assert np.isfinite(scale) and scale > 0
    dropped = result["nonfinite_dropped"]  # summary.json["sae"][hook]
    assert dropped == metrics["nonfinite_dropped"]
    plan = plan_tokens(source, cfg, 0)
    n_train, n_held = np.isin(bad, plan.train_rows).sum(), np.isin(bad, plan.eval_rows).sum()
    assert n_train > 0 and n_held > 0
    assert dropped["held_out_rows"] == n_held and dropped["stats_rows"] == n_train  # stats read every training row
    assert 2 * n_train <= dropped["train_draws"] <= 3 * n_train  # 2 epochs (the last step may start a third)
