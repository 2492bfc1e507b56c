"""Recorded activations equal an independent full forward pass, for prompt and generated tokens.

For every row of a left-padded batch we rebuild the unpadded sequence (prompt + the tokens it
generated), run one plain forward with `output_hidden_states=True` and independent module
hooks, and compare cell by cell: residuals_N with hidden_states[N], mlp_N / attention_N with
the modules' outputs. Tiny Llama and Mistral (GQA, sliding window shorter than the sequence)
are loaded through `from_pretrained`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_lab.errors import ConfigError
from refusal_lab.generation import generate_greedy
from refusal_lab.hooks import DECOMPOSITION_VERIFIED, ActivationRecorder, hooks_registered
from refusal_lab.layers import expand_layer_spec

PAD = 2


def left_pad(rows):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def reference(model, sequence, n_layers):
    """hidden_states and module outputs of one unpadded forward, with hooks independent of ours."""
    outputs = {}

    def keep(name):
        def hook(_m, _a, out):
            outputs[name] = (out[0] if isinstance(out, tuple) else out)[0].detach()

        return hook

    handles = []
    for layer in range(n_layers):
        handles.append(model.model.layers[layer].mlp.register_forward_hook(keep(f"mlp_{layer}")))
        handles.append(model.model.layers[layer].self_attn.register_forward_hook(keep(f"attention_{layer}")))
    with torch.no_grad():
        out = model(torch.tensor([sequence]), output_hidden_states=True)
    for handle in handles:
        handle.remove()
    for layer in range(n_layers):
        outputs[f"residuals_{layer}"] = out.hidden_states[layer][0]
    # The decomposition itself: residual_{N+1} = residual_N + attention_N + mlp_N.
    for layer in range(n_layers - 1):
        rebuilt = outputs[f"residuals_{layer}"] + outputs[f"attention_{layer}"] + outputs[f"mlp_{layer}"]
        torch.testing.assert_close(rebuilt, outputs[f"residuals_{layer + 1}"], atol=1e-5, rtol=1e-5)
    return outputs


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_mistral"])
@pytest.mark.parametrize("stop_early", [False, True])
def test_recorded_activations_match_full_forward(kind, stop_early, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(kind)).eval()
    n_layers = len(model.model.layers)
    points = expand_layer_spec(["all", "mlp_all", "attention_all"], n_layers)
    rows = [[1, *range(100, 118)], [1, 300, 301, 302], [1, *range(500, 509)]]
    ids, mask = left_pad(rows)
    max_new = 8
    eos = [PAD]
    if stop_early:
        # Make a token the first row generates early into EOS, so rows finish at different steps.
        probe = generate_greedy(model, ids, mask, max_new, [PAD], PAD)
        eos = [int(probe.tokens_BM[0, 2])]
    recorder = ActivationRecorder(model, points, torch.float32)
    recorder.reset(len(rows), ids.shape[1], max_new)
    with hooks_registered(model, recorder.hook_fns()):
        gen = generate_greedy(model, ids, mask, max_new, eos, PAD, recorder, record_generated=True)

    hf = model.generate(
        ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=PAD, eos_token_id=eos
    )
    for b in range(len(rows)):
        n_gen = int(gen.valid_BM[b].sum())
        assert hf[b, ids.shape[1] : ids.shape[1] + n_gen].tolist() == gen.tokens_BM[b, :n_gen].tolist()
    if stop_early:
        assert int(gen.valid_BM[0].sum()) == 3, "row 0 must stop right after its EOS"
        assert gen.tokens_BM[0, 2] == eos[0]

    width = ids.shape[1]
    for b, prompt in enumerate(rows):
        n_gen = int(gen.valid_BM[b].sum())
        sequence = prompt + gen.tokens_BM[b, :n_gen].tolist()
        want = reference(model, sequence, n_layers)
        for point in points:
            buf = recorder.view(point, len(rows), width + max_new)[b]
            got = torch.cat([buf[width - len(prompt) : width], buf[width : width + n_gen]])
            assert got.shape[0] == len(sequence)
            torch.testing.assert_close(got, want[point.name], atol=2e-5, rtol=1e-4, msg=f"{kind} row {b} {point.name}")


def test_hooks_are_removed_even_on_error(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    points = expand_layer_spec(["residuals_0", "mlp_1"], 3)

    def boom(_acts):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError), hooks_registered(model, dict.fromkeys(points, boom)):
        model(torch.tensor([[1, 5, 6]]))
    assert not model.model.layers[0]._forward_pre_hooks
    assert not model.model.layers[1].mlp._forward_hooks
    model(torch.tensor([[1, 5, 6]]))  # runs without the failing hook


MODEL_FIXTURES = {"llama": "tiny_llama", "mistral": "tiny_mistral"}
"""A tiny model per model type in hooks.DECOMPOSITION_VERIFIED: the verification of that registry."""


def test_every_verified_model_type_has_its_verification():
    assert set(MODEL_FIXTURES) == set(DECOMPOSITION_VERIFIED), "add a model type to the registry only with its test"


@pytest.mark.parametrize("model_type", sorted(MODEL_FIXTURES))
def test_decomposition_is_verified_for_every_registered_model_type(model_type, request):
    """residuals_{N+1} = residuals_N + attention_N + mlp_N, against output_hidden_states (see `reference`)."""
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(MODEL_FIXTURES[model_type])).eval()
    assert model.config.model_type == model_type
    reference(model, [1, *range(200, 230)], len(model.model.layers))


def test_post_norm_model_keeps_residuals_and_refuses_sublayer_hooks(tiny_llama, tmp_path):
    """Gemma-2 normalises each sublayer's output before the residual add: mlp_N would not be what is added."""
    from tests.integration.test_collect_plan import build_tiny_gemma2

    model = AutoModelForCausalLM.from_pretrained(build_tiny_gemma2(tmp_path / "gemma2", tiny_llama)).eval()
    sequence = [1, *range(200, 220)]
    with pytest.raises(AssertionError):
        reference(model, sequence, len(model.model.layers))  # the decomposition does not hold here
    mlp = expand_layer_spec(["mlp_1"], 3)
    refused = pytest.raises(ConfigError, match=r"hook points: mlp_1 not supported .*'gemma2'")
    with refused, hooks_registered(model, dict.fromkeys(mlp, lambda _acts: None)):
        pass
    # residuals_N is the layer input on any decoder: it equals hidden_states[N].
    points = expand_layer_spec(["all"], 3)
    ids = torch.tensor([sequence])
    recorder = ActivationRecorder(model, points, torch.float32)
    recorder.reset(1, ids.shape[1], 0)
    with hooks_registered(model, recorder.hook_fns()):
        generate_greedy(model, ids, torch.ones_like(ids), 1, [PAD], PAD, recorder)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    for point in points:
        torch.testing.assert_close(recorder.view(point, 1, ids.shape[1])[0], hidden[point.layer][0])
