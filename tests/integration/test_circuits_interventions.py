"""SAE splicing, baselines and feature edits (ablate, keep, steer, stacked) on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusal_lab.circuits.ablation import Condition, Mode, ablate, ablate_complement, repeat_batch, stacked_edit, steer
from refusal_lab.circuits.baseline import BoundBaseline, mean_baseline, zero_baseline
from refusal_lab.circuits.batches import PromptBatch, make_batches
from refusal_lab.circuits.spliced import forward_batch, spliced
from refusal_lab.hooks import hooks_registered
from refusal_lab.layers import HookPoint
from refusal_lab.store import Phase
from tests.integration.circuits_fixtures import (
    HOOKS,
    N_POST,
    capture_layer_input,
    load_tiny,
    random_prompts,
    random_saes,
    small_batch,
    tiny_pad_id,
)


@pytest.fixture(scope="module")
def model(tiny_llama: Path):
    return load_tiny(tiny_llama)


@pytest.fixture(scope="module")
def pad_id(tiny_llama: Path) -> int:
    return tiny_pad_id(tiny_llama)


@pytest.fixture(scope="module")
def batch(pad_id: int) -> PromptBatch:
    return small_batch(pad_id)


def test_splice_without_edit_reproduces_the_model(model, batch):
    saes = random_saes(model.config.hidden_size)
    with torch.no_grad():
        plain = forward_batch(model, batch)
        with spliced(model, saes) as run:
            spliced_logits = forward_batch(model, batch)
    assert set(run.feats) == set(HOOKS)
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(spliced_logits[mask], plain[mask], atol=1e-4, rtol=1e-4)


def test_the_error_node_makes_even_a_bad_sae_exact(model, batch):
    """Reconstruction alone (error node zeroed) moves the logits a lot; with the error node they match."""
    saes = random_saes(model.config.hidden_size)
    mask = batch.attention_mask.bool()
    with torch.no_grad():
        plain = forward_batch(model, batch)
        with spliced(model, saes) as run:
            exact = forward_batch(model, batch)
        with spliced(model, saes, edit=lambda h, f, e: (f, torch.zeros_like(e))):
            reconstruction_only = forward_batch(model, batch)
    err = run.errors["residuals_1"][mask]
    assert float(err.norm(dim=-1).mean()) > 0.5  # the SAE really is bad: a large error term
    torch.testing.assert_close(exact[mask], plain[mask], atol=1e-4, rtol=1e-4)
    assert float((reconstruction_only[mask] - plain[mask]).abs().max()) > 1e-2


def test_spliced_features_carry_gradients(model, batch):
    saes = random_saes(model.config.hidden_size)

    def keep_grads(hook, f, e):
        f.retain_grad()
        e.retain_grad()
        return f, e

    with spliced(model, saes, edit=keep_grads) as run:
        logits = forward_batch(model, batch, logits_to_keep=1)
        logits[:, -1, 42].sum().backward()
    for hook in HOOKS:
        grad_f, grad_e = run.feats[hook].grad, run.errors[hook].grad
        assert grad_f is not None and grad_e is not None
        assert float(grad_e.abs().sum()) > 0


def test_mean_baseline_is_the_contrast_mean_per_phase(model, pad_id):
    """Template cells get the mean at the same offset from the end; BOS its own mean; text cells the pooled mean."""
    saes = random_saes(model.config.hidden_size)
    prompts = random_prompts(7, seed=2)
    batches = make_batches(prompts, N_POST, pad_id, batch_size=3)
    baseline = mean_baseline(model, saes, batches, n_prefix=1)
    hook = "mlp_1"
    # Independent reference: one unpadded forward per prompt, means by phase in float64.
    text, template, bos = [], [[] for _ in range(N_POST)], []
    for ids in prompts:
        one = make_batches([ids], N_POST, pad_id, batch_size=1)[0]
        with torch.no_grad(), spliced(model, saes) as run:
            forward_batch(model, one)
        feats = run.feats[hook][0].double()
        bos.append(feats[0])
        text.extend(feats[1 : len(ids) - N_POST])
        for j in range(N_POST):
            template[j].append(feats[len(ids) - N_POST + j])
    means = baseline.hooks[hook]
    torch.testing.assert_close(means.feats_GF[0].double(), torch.stack(text).mean(0), atol=1e-5, rtol=1e-5)
    for j in range(N_POST):
        torch.testing.assert_close(
            means.feats_GF[1 + j].double(), torch.stack(template[j]).mean(0), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(means.feats_GF[1 + N_POST].double(), torch.stack(bos).mean(0), atol=1e-5, rtol=1e-5)
    # expand() puts them in the right cells of another batch.
    target = make_batches(random_prompts(3, seed=3), N_POST, pad_id, batch_size=3)[0]
    feats_BTF, err_BTD = baseline.expand(hook, target)
    assert feats_BTF.shape[:2] == target.input_ids.shape and err_BTD.shape[-1] == model.config.hidden_size
    last = target.width - 1
    torch.testing.assert_close(feats_BTF[:, last], means.feats_GF[1 + N_POST - 1].expand(target.size, -1))
    text_cells = (target.phase == int(Phase.PROMPT)) & (target.position_ids > 0)
    torch.testing.assert_close(feats_BTF[text_cells], means.feats_GF[0].expand(int(text_cells.sum()), -1))
    # A one-token call (a decode step) gets the response baseline, the pooled prompt mean.
    bound = BoundBaseline(baseline, target)
    f_step, _ = bound.values(hook, torch.zeros(target.size, 1, means.feats_GF.shape[1]))
    torch.testing.assert_close(f_step[0, 0], means.feats_GF[0])


def test_zero_baseline_shapes(batch):
    saes = random_saes(64)
    feats, err = zero_baseline(saes).expand("mlp_1", batch, torch.tensor([3, 5]))
    assert feats.shape == (batch.size, batch.width, 2) and err.shape == (batch.size, batch.width, 64)
    assert not feats.any() and not err.any()


def test_ablation_replaces_exactly_the_chosen_features_and_nothing_else(model, pad_id):
    saes = random_saes(model.config.hidden_size)
    contrast = make_batches(random_prompts(6, seed=4), N_POST, pad_id, batch_size=6)
    baseline = mean_baseline(model, saes, contrast)
    batch = make_batches(random_prompts(4, seed=5), N_POST, pad_id, batch_size=4)[0]
    hook = "residuals_1"  # the first hook point: nothing upstream is edited
    with torch.no_grad(), spliced(model, saes) as clean:
        seen: dict = {}
        handle = capture_layer_input(model, 1, seen)
        forward_batch(model, batch)
        handle.remove()
    f_clean, e_clean, x_clean = clean.feats[hook].clone(), clean.errors[hook].clone(), seen["x"]
    # Choose features that are active somewhere, and one that is not, to make the change visible.
    active = (f_clean > 0).flatten(0, 1).any(0).nonzero().flatten()
    chosen = torch.cat([active[:3], (~(f_clean > 0).flatten(0, 1).any(0)).nonzero().flatten()[:1]])
    bound = BoundBaseline(baseline, batch)
    with torch.no_grad(), spliced(model, saes, edit=ablate({hook: chosen}, bound)) as run:
        seen = {}
        handle = capture_layer_input(model, 1, seen)
        forward_batch(model, batch)
        handle.remove()
    f_new, e_new, x_new = run.feats[hook], run.errors[hook], seen["x"]
    base_f, _ = baseline.expand(hook, batch)
    others = torch.ones(f_clean.shape[-1], dtype=torch.bool)
    others[chosen] = False
    torch.testing.assert_close(f_new[..., chosen], base_f[..., chosen])
    assert torch.equal(f_new[..., others], f_clean[..., others])
    assert torch.equal(e_new, e_clean)  # the error node is untouched
    # The activation moves by exactly the decoder rows times the change of the chosen features.
    expected = x_clean + (base_f[..., chosen] - f_clean[..., chosen]) @ saes[hook].W_dec[chosen]
    torch.testing.assert_close(x_new, expected, atol=1e-5, rtol=1e-5)
    assert float((x_new - x_clean).abs().max()) > 1e-3


def test_complement_ablation_keeps_the_circuit_and_the_error_node(model, batch, pad_id):
    saes = random_saes(model.config.hidden_size)
    contrast = make_batches(random_prompts(6, seed=4), N_POST, pad_id, batch_size=6)
    baseline = mean_baseline(model, saes, contrast)
    hook = "residuals_1"
    nodes = {hook: torch.tensor([0, 5, 9])}
    with torch.no_grad(), spliced(model, saes) as clean:
        forward_batch(model, batch)
    with torch.no_grad(), spliced(model, saes, edit=ablate_complement(nodes, BoundBaseline(baseline, batch))) as run:
        forward_batch(model, batch)
    base_f, _ = baseline.expand(hook, batch)
    keep = nodes[hook]
    assert torch.equal(run.feats[hook][..., keep], clean.feats[hook][..., keep])
    rest = torch.ones(base_f.shape[-1], dtype=torch.bool)
    rest[keep] = False
    torch.testing.assert_close(run.feats[hook][..., rest], base_f[..., rest])
    assert torch.equal(run.errors[hook], clean.errors[hook])
    # A hook without circuit nodes has every feature ablated.
    base_mlp, _ = baseline.expand("mlp_1", batch)
    torch.testing.assert_close(run.feats["mlp_1"], base_mlp)


def test_steering_adds_alpha_times_the_unit_decoder_direction(model, batch):
    saes = random_saes(model.config.hidden_size)
    with torch.no_grad():
        saes["residuals_1"].W_dec.mul_(2.0)  # non-unit rows: steering must still move by alpha
    hook, feature, alpha = "residuals_1", 7, 3.0
    with torch.no_grad(), spliced(model, saes) as clean:
        seen: dict = {}
        handle = capture_layer_input(model, 1, seen)
        forward_batch(model, batch)
        handle.remove()
    x_clean = seen["x"]
    with torch.no_grad(), spliced(model, saes, edit=steer({hook: torch.tensor([feature])}, alpha, saes)) as run:
        seen = {}
        handle = capture_layer_input(model, 1, seen)
        forward_batch(model, batch)
        handle.remove()
    direction = saes[hook].W_dec[feature] / saes[hook].W_dec[feature].norm()
    torch.testing.assert_close(seen["x"] - x_clean, (alpha * direction).expand_as(x_clean), atol=1e-5, rtol=1e-5)
    assert torch.equal(run.errors[hook], clean.errors[hook])


def test_stacked_conditions_equal_separate_runs(model, batch, pad_id):
    """One forward over a batch repeated per condition gives each condition's own logits."""
    saes = random_saes(model.config.hidden_size)
    contrast = make_batches(random_prompts(6, seed=4), N_POST, pad_id, batch_size=6)
    baseline = mean_baseline(model, saes, contrast)
    bound = BoundBaseline(baseline, batch)
    conditions = [
        Condition({"residuals_1": torch.tensor([1, 2])}, Mode.keep),
        Condition({"mlp_1": torch.tensor([4]), "attention_2": torch.tensor([0, 8])}, Mode.ablate),
        Condition({}, Mode.keep, ablate_errors=True),
        Condition({"mlp_1": torch.tensor([3])}, Mode.steer, alpha=2.0),
    ]
    with torch.no_grad(), spliced(model, saes, edit=stacked_edit(conditions, bound, saes)):
        stacked = forward_batch(model, repeat_batch(batch, len(conditions)))
    for r, cond in enumerate(conditions):
        with torch.no_grad(), spliced(model, saes, edit=stacked_edit([cond], bound, saes)):
            alone = forward_batch(model, batch)
        rows = slice(r * batch.size, (r + 1) * batch.size)
        torch.testing.assert_close(stacked[rows], alone, atol=1e-4, rtol=1e-4)
    assert float((stacked[: batch.size] - stacked[batch.size : 2 * batch.size]).abs().max()) > 1e-3


def test_feature_and_error_gradients_are_the_models_at_every_hook(model, batch):
    """d m/d err = the unspliced model's gradient at the hook; d m/d f = that gradient through the decoder,
    at downstream hooks too (a feature gradient must not cancel against the error node)."""
    saes = random_saes(model.config.hidden_size)
    hooks = ["residuals_1", "mlp_1", "attention_2"]

    def metric(logits):
        return logits[:, -1, 42].sum() - logits[:, -1, 7].sum()

    # Reference: the plain model, with the first hook's input made a leaf and the later activations retained.
    seen: dict[str, torch.Tensor] = {}

    def keep(hook):
        def fn(x):
            if hook == "residuals_1":
                x = x.detach().requires_grad_(True)
            x.retain_grad()
            seen[hook] = x
            return x

        return fn

    with torch.enable_grad(), hooks_registered(model, {HookPoint.from_name(h): keep(h) for h in hooks}):
        metric(forward_batch(model, batch, logits_to_keep=1)).backward()
    with torch.enable_grad(), spliced(model, saes) as run:
        out = metric(forward_batch(model, batch, logits_to_keep=1))
        grads = torch.autograd.grad(out, [t for h in hooks for t in (run.feats[h], run.errors[h])], retain_graph=True)
    for i, hook in enumerate(hooks):
        true = seen[hook].grad
        assert true is not None
        grad_f, grad_e = grads[2 * i], grads[2 * i + 1]
        torch.testing.assert_close(grad_e, true, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(grad_f, true @ saes[hook].W_dec.T, atol=1e-4, rtol=1e-3)
        assert float(grad_f.abs().max()) > 1e-4
    # The encoder output stays connected upstream (edges differentiate it).
    (edge,) = torch.autograd.grad(run.encoded["mlp_1"].sum(), [run.feats["residuals_1"]], allow_unused=True)
    assert edge is not None and float(edge.abs().sum()) > 0
