"""The over-refusal edit (issue 16 items 3, 4) on tiny random Llama and Mistral models.

The edited checkpoint, saved with save_pretrained and loaded back with from_pretrained, gives the
logits of the hook-based writer projection to float tolerance; the SAE clamp rewrites exactly the
selected features; the whole stage runs in the pipeline; bad input fails before any model loads.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from refusal_lab.circuits.config import DiscoverySet
from refusal_lab.circuits.spliced import forward_batch
from refusal_lab.config import ConfigError, Stage
from refusal_lab.edit.config import EditConfig
from refusal_lab.edit.intervene import projected, sae_clamped, writer_bases, writers_of
from refusal_lab.edit.weights import save_edited
from refusal_lab.pipeline import run
from refusal_lab.sae.config import Architecture
from refusal_lab.sae.model import Sae
from tests.integration.circuits_fixtures import capture_layer_input, load_tiny, small_batch, tiny_pad_id
from tests.integration.test_circuits_stage import make_cfg

NODES = {"residuals_0": [3, 7], "residuals_2": [1, 5, 9], "mlp_1": [2], "attention_0": [4, 6]}


def _saes(d_model: int, hooks, seed: int = 0) -> dict[str, Sae]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for hook in hooks:
        sae = Sae(d_model, 64, Architecture.topk, k=8)
        sae.reset_parameters(gen)
        out[hook] = sae.requires_grad_(False)
    return out


def test_writers_follow_the_residual_stream_order():
    assert [p.name for p in writers_of("residuals_0", 3)] == ["residuals_0"]
    assert [p.name for p in writers_of("residuals_2", 3)] == [
        "residuals_0", "attention_0", "mlp_0", "attention_1", "mlp_1",
    ]  # fmt: skip
    assert [p.name for p in writers_of("attention_1", 3)] == ["residuals_0", "attention_0", "mlp_0", "attention_1"]


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_checkpoint_from_pretrained_equals_the_hook_based_edit(kind, tiny_llama, tiny_mistral, tmp_path):
    path = tiny_llama if kind == "llama" else tiny_mistral
    model = load_tiny(path)
    saes = _saes(model.config.hidden_size, NODES)
    bases = writer_bases(model, saes, NODES)
    # The embedding is projected against every selected direction (it writes into every hook).
    assert bases[writers_of("residuals_0", 3)[0]].shape[1] == 8
    save_edited(model, AutoTokenizer.from_pretrained(path), bases, tmp_path / "ckpt")
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert AutoTokenizer.from_pretrained(tmp_path / "ckpt").chat_template  # the chat template travels with it
    batch = small_batch(tiny_pad_id(path))
    real = batch.attention_mask.bool()
    with torch.no_grad():
        plain = forward_batch(model, batch)
        with projected(model, bases):
            hooked = forward_batch(model, batch)
        loaded = forward_batch(edited, batch)
    assert (hooked - plain)[real].abs().max() > 1e-2  # the edit does something
    torch.testing.assert_close(loaded[real], hooked[real], atol=2e-5, rtol=1e-4)
    # The live model is untouched by saving.
    with torch.no_grad():
        torch.testing.assert_close(forward_batch(model, batch), plain)
    # Behind the edit nothing along residuals_2's selected directions reaches layer 2.
    seen: dict = {}
    handle = capture_layer_input(edited, 2, seen)
    with torch.no_grad():
        forward_batch(edited, batch)
    handle.remove()
    along = seen["x"][real] @ saes["residuals_2"].W_dec[NODES["residuals_2"]].T
    assert along.abs().max() < 1e-4 * seen["x"][real].abs().max()


def test_sae_clamp_sets_exactly_the_selected_features(tiny_llama):
    model = load_tiny(tiny_llama)
    sae = _saes(model.config.hidden_size, ["residuals_1"])["residuals_1"]
    feats, value = [0, 5, 11], 0.25
    batch = small_batch(tiny_pad_id(tiny_llama))
    before, after = {}, {}
    with torch.no_grad():
        handle = capture_layer_input(model, 1, before)
        forward_batch(model, batch)
        handle.remove()
        with sae_clamped(model, {"residuals_1": sae}, {"residuals_1": feats}, value):
            handle = capture_layer_input(model, 1, after)
            forward_batch(model, batch)
            handle.remove()
    x = before["x"]
    f = sae.encode(x)[..., feats]
    torch.testing.assert_close(after["x"], x + (value - f) @ sae.W_dec[feats])


def _edit_cfg(tiny, shared_data, tmp_path, **edit):
    cfg = make_cfg(tiny, shared_data, tmp_path, sets=[DiscoverySet.toxic, DiscoverySet.safe])
    base = EditConfig(source="toxic", n_random=2, max_new_tokens=2, max_prompts=8, batch_size=8)
    return replace(
        cfg,
        edit=replace(base, **edit),
        stages=[Stage.collect, Stage.sae, Stage.circuits, Stage.edit],
    )


def test_whole_edit_stage_on_a_tiny_model(tiny_llama, shared_data, tmp_path):
    cfg = _edit_cfg(tiny_llama, shared_data, tmp_path)
    entry = run(cfg, tmp_path / "run", tmp_path)["edit"]
    table = entry["table"]
    assert {"unedited", "edit", "sae_clamp", "random"} <= table.keys()
    assert table["unedited"]["kl_harmless"] == 0 and table["random"]["n"] == 2
    for row in ("edit", "sae_clamp"):
        assert set(table[row]) >= {"refusal_refused_safe", "refusal_toxic", "refusal_harmless", "kl_harmless"}
        assert table[row]["kl_harmless"] >= 0
    check = entry["checkpoint"]["logit_check"]
    assert check["max_abs_diff"] <= 1e-4 * max(1.0, check["max_abs_logit"]), check
    again = run(cfg, tmp_path / "run", tmp_path)["edit"]  # done.json: skipped, the same entry
    assert again["seconds"] == entry["seconds"]


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"source": "over_refusals"}, "edit.source: 'over_refusals' is not a circuits set of this run; valid: "),
        ({"hooks": ["residuals_7"]}, "edit.hooks: ['residuals_7'] are not hook points of the circuits; valid: "),
    ],
)
def test_bad_edit_input_fails_before_any_model_loads(edit, needle, tiny_llama, shared_data, tmp_path, monkeypatch):
    import refusal_lab.pipeline as pipeline

    def no_model(*_a, **_k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    with pytest.raises(ConfigError) as err:
        run(_edit_cfg(tiny_llama, shared_data, tmp_path, **edit), tmp_path / "run", tmp_path)
    assert needle in str(err.value)


def test_edit_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"edit.max_features: 0 must be >= 1 or null"):
        EditConfig(max_features=0)
