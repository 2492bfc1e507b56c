"""SAELens layout: save/load round trip, cfg.json keys, and SAELens's forward recomputed from the files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from refusal_lab.sae.config import Architecture
from refusal_lab.sae.model import Sae
from refusal_lab.sae.saelens import CFG, SPARSITY, WEIGHTS, load_sae, save_sae, transformer_lens_name

EXPECTED_ARCH = {Architecture.topk: "topk", Architecture.relu: "standard", Architecture.batchtopk: "jumprelu"}


def trained_looking_sae(architecture: Architecture) -> Sae:
    torch.manual_seed(1)
    sae = Sae(24, 96, architecture, k=5)
    with torch.no_grad():
        sae.encoder.add_(0.1 * torch.randn_like(sae.encoder))
        sae.b_enc.normal_(std=0.2)
        sae.b_dec.normal_()
        sae.threshold.uniform_(0.05, 0.4)
    return sae.eval()


def saelens_forward(folder, x: np.ndarray) -> np.ndarray:
    """What SAELens 6 computes from cfg.json + sae_weights.safetensors (process_sae_in, encode, decode)."""
    cfg = json.loads((folder / CFG).read_text())
    w = load_file(str(folder / WEIGHTS))
    assert cfg["apply_b_dec_to_input"] and cfg["normalize_activations"] == "none"
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        acts = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=1)[:, : cfg["k"]]
        np.put_along_axis(acts, idx, np.maximum(np.take_along_axis(pre, idx, axis=1), 0), axis=1)
    elif cfg["architecture"] == "jumprelu":
        acts = np.maximum(pre, 0) * (pre > w["threshold"])
    else:
        acts = np.maximum(pre, 0)
    return acts @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("architecture", list(Architecture))
def test_round_trip_gives_identical_outputs(tmp_path, architecture):
    sae = trained_looking_sae(architecture)
    density = np.linspace(0, 0.5, 96)
    save_sae(sae, tmp_path, "residuals_3", "tiny-model", {"store": "/x.zarr", "input_scale": 1.0}, density)
    loaded = load_sae(tmp_path)
    x = torch.randn(40, 24) * 2
    assert torch.equal(loaded(x), sae(x))
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert loaded.architecture == architecture and loaded.k == 5
    np.testing.assert_allclose(saelens_forward(tmp_path, x.numpy()), sae(x).detach().numpy(), atol=1e-4, rtol=1e-4)
    sparsity = load_file(str(tmp_path / SPARSITY))["sparsity"]
    assert sparsity.shape == (96,) and sparsity[0] < -9


@pytest.mark.parametrize("architecture", list(Architecture))
def test_cfg_json_has_the_saelens_keys(tmp_path, architecture):
    save_sae(trained_looking_sae(architecture), tmp_path, "mlp_2", "org/model", {"store": "/s.zarr"})
    cfg = json.loads((tmp_path / CFG).read_text())
    assert cfg["architecture"] == EXPECTED_ARCH[architecture]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (24, 96, "float32")
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["hook_name"] == cfg["hook_name"] == "blocks.2.hook_mlp_out"
    assert cfg["metadata"]["model_name"] == cfg["model_name"] == "org/model"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert cfg["refusal_lab"]["hook_point"] == "mlp_2"
    assert ("k" in cfg) == (architecture == Architecture.topk)
    weights = load_file(str(tmp_path / WEIGHTS))
    assert weights["W_enc"].shape == (24, 96) and weights["W_dec"].shape == (96, 24)
    assert weights["b_enc"].shape == (96,) and weights["b_dec"].shape == (24,)
    assert ("threshold" in weights) == (architecture == Architecture.batchtopk)


def test_transformer_lens_names():
    assert transformer_lens_name("residuals_0") == "blocks.0.hook_resid_pre"
    assert transformer_lens_name("attention_7") == "blocks.7.hook_attn_out"


def test_load_refuses_what_it_cannot_reproduce(tmp_path):
    save_sae(trained_looking_sae(Architecture.relu), tmp_path, "residuals_1", "m", {})
    cfg = json.loads((tmp_path / CFG).read_text())
    (tmp_path / CFG).write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        load_sae(tmp_path)
    (tmp_path / CFG).write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ValueError, match="gated"):
        load_sae(tmp_path)
