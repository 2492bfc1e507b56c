"""The sae config group: every YAML option parses into SaeConfig; bad values name their key."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from refusal_lab.config import ConfigError
from refusal_lab.sae.config import Architecture, Balance, SaeConfig, TokenFilterConfig

CONF = Path(__file__).resolve().parents[2] / "conf" / "sae"


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_yaml_option_extends_the_schema_and_parses(path):
    text = path.read_text()
    assert text.startswith("#") and "python -m refusal_lab" in text.split("defaults")[0]
    raw = OmegaConf.load(path)
    assert list(raw.pop("defaults")) == ["/schema/sae/base@_here_", "_self_"]
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SaeConfig), raw))
    assert isinstance(cfg, SaeConfig)


def test_presets():
    def load(name):
        raw = OmegaConf.load(CONF / f"{name}.yaml")
        raw.pop("defaults")
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SaeConfig), raw))

    default, balanced = load("default"), load("sae_balanced")
    assert default.architecture == Architecture.topk and default.balance == Balance.none
    assert balanced.balance == Balance.label_category


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"k": 0}, "sae.k: 0"),
        ({"train_tokens": 1000}, "set exactly one"),
        ({"held_out_share": 1.0}, "sae.held_out_share: 1.0"),
        ({"buffer_tokens": 10, "batch_size": 64}, "sae.buffer_tokens: 10"),
        ({"filters": TokenFilterConfig(phases=[])}, "sae.filters.phases: empty"),
        ({"filters": TokenFilterConfig(outlier_factor=0.5)}, "sae.filters.outlier_factor: 0.5"),
        ({"lr_warmup_fraction": 0.6, "lr_decay_fraction": 0.6}, "exceeds 1"),
    ],
)
def test_invalid_values_name_the_key(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        SaeConfig(**kwargs)


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as err:
        SaeConfig(k=0, lr=-1.0)
    assert "sae.k" in str(err.value) and "sae.lr" in str(err.value)


def test_sae_fingerprint_ignores_only_output_neutral_fields():
    from dataclasses import replace

    from refusal_lab.config import RunConfig
    from refusal_lab.sae.config import OUTPUT_NEUTRAL_FIELDS
    from refusal_lab.sae.spec import sae_fingerprint

    base = RunConfig()
    fp = sae_fingerprint(base, "store-a")
    neutral = replace(base.sae, log_every=7, checkpoint_every=3, cpu_threads=2, hooks=["residuals_0"])
    assert set(OUTPUT_NEUTRAL_FIELDS) == {"log_every", "checkpoint_every", "cpu_threads", "hooks"}
    assert sae_fingerprint(replace(base, sae=neutral), "store-a") == fp, "a log or checkpoint setting must not retrain"
    for changed in [
        replace(base, sae=replace(base.sae, k=base.sae.k + 1)),
        replace(base, sae=replace(base.sae, filters=TokenFilterConfig(drop_bos=False))),
        replace(base, seed=base.seed + 1),
    ]:
        assert sae_fingerprint(changed, "store-a") != fp
    assert sae_fingerprint(base, "store-b") != fp


def test_sae_fingerprint_carries_the_algorithm_version(monkeypatch):
    from refusal_lab.config import RunConfig
    from refusal_lab.sae import spec

    fp = spec.sae_fingerprint(RunConfig(), "store-a")
    monkeypatch.setattr(spec, "ALGORITHM_VERSION", spec.ALGORITHM_VERSION + 1)
    assert spec.sae_fingerprint(RunConfig(), "store-a") != fp  # a changed trainer never reuses old SAEs
