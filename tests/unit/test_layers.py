"""The layer-spec language: parsing, expansion, ordering and its errors."""

import pytest

from refusal_lab.layers import HookPoint, LayerSpecError, Site, expand_layer_spec, parse_layer_spec


def names(spec, n=32):
    return [p.name for p in expand_layer_spec(spec, n, "meta-llama/Llama-2-7b-chat-hf")]


def test_single_terms_and_sites():
    assert names(["residuals_3", "mlp_0", "attention_31"]) == ["residuals_3", "mlp_0", "attention_31"]


def test_all_means_every_residual_layer():
    assert names(["all"], 4) == ["residuals_0", "residuals_1", "residuals_2", "residuals_3"]
    assert names(["residuals_all"], 4) == names(["all"], 4)
    assert names(["mlp_all"], 2) == ["mlp_0", "mlp_1"]
    assert names(["attention_all"], 2) == ["attention_0", "attention_1"]


def test_inclusive_range():
    assert names(["residuals_10-21"]) == [f"residuals_{i}" for i in range(10, 22)]
    assert names(["mlp_5-5"]) == ["mlp_5"]


def test_mixed_list_collapses_duplicates_in_first_appearance_order():
    got = names(["mlp_2", "residuals_1-3", "residuals_2", "all", "mlp_2"], 4)
    assert got == ["mlp_2", "residuals_1", "residuals_2", "residuals_3", "residuals_0"]
    assert len(got) == len(set(got))


def test_same_spec_same_order():
    spec = ["attention_all", "residuals_0-3", "mlp_1"]
    assert names(spec, 8) == names(list(spec), 8)


@pytest.mark.parametrize("bad", ["residual_3", "mlp-3", "residuals_", "attention_a", "residuals_5-2", "layers_all", ""])
def test_malformed_spec_shows_valid_forms(bad):
    with pytest.raises(LayerSpecError) as err:
        parse_layer_spec([bad])
    assert "model.activation_layers" in str(err.value)
    assert "residuals_A-B" in str(err.value)


def test_all_bad_terms_reported_at_once():
    with pytest.raises(LayerSpecError) as err:
        parse_layer_spec(["foo", "residuals_1", "bar"])
    assert "'foo'" in str(err.value) and "'bar'" in str(err.value)


def test_out_of_range_names_model_and_depth():
    with pytest.raises(LayerSpecError) as err:
        expand_layer_spec(["residuals_40"], 32, "meta-llama/Llama-2-7b-chat-hf")
    msg = str(err.value)
    assert "residuals_40" in msg and "meta-llama/Llama-2-7b-chat-hf" in msg and "32 layers: 0-31" in msg
    with pytest.raises(LayerSpecError):
        expand_layer_spec(["mlp_10-32"], 32)


def test_empty_spec_is_an_error():
    with pytest.raises(LayerSpecError):
        parse_layer_spec([])


def test_hook_point_name_round_trip():
    for point in [HookPoint(Site.RESIDUALS, 0), HookPoint(Site.MLP, 12), HookPoint(Site.ATTENTION, 31)]:
        assert HookPoint.from_name(point.name) == point
    with pytest.raises(ValueError):
        HookPoint.from_name("resid_post_3")
