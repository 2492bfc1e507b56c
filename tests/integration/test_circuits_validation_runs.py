"""Circuit validation end to end on a tiny random Llama: metric faithfulness and random sets, stacked generation,
behaviour (refusal-rate drops, KL), validate_circuit, and the difference-in-means direction."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from refusal_lab.circuits.ablation import CLEAN, Condition, Mode, ablate, ablate_complement, repeat_batch
from refusal_lab.circuits.baseline import BoundBaseline, mean_baseline
from refusal_lab.circuits.batches import PromptBatch, make_batches
from refusal_lab.circuits.behaviour import behaviour_validation, feature_interventions, generate_under, kl_under
from refusal_lab.circuits.direction import (
    decoder_cosines,
    direction_ablation,
    directions_from_model,
    directions_from_store,
    projection_interventions,
)
from refusal_lab.circuits.held_out import ablation_summary, validate_circuit
from refusal_lab.circuits.size import model_faithfulness, search_size
from refusal_lab.circuits.spliced import forward_batch, spliced
from refusal_lab.circuits.validate import metric_validation
from refusal_lab.store import ActivationStore, Phase, SampleRecord, TokenBlock
from refusal_lab.store_writer import StoreWriter
from tests.integration.circuits_fixtures import (
    N_POST,
    capture_layer_input,
    first_token_metric,
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


def test_metric_validation_faithfulness_completeness_and_random_sets(model, pad_id):
    saes = random_saes(model.config.hidden_size)
    baseline = mean_baseline(model, saes, make_batches(random_prompts(6, seed=4), N_POST, pad_id, batch_size=6))
    batches = make_batches(random_prompts(6, seed=6), N_POST, pad_id, batch_size=4)
    ranked = [("residuals_1", 3), ("mlp_1", 10), ("residuals_1", 40), ("attention_2", 7), ("mlp_1", 2), ("mlp_1", 99)]
    out = metric_validation(
        model, saes, baseline, batches, ranked, size=4, metric_fn=first_token_metric, sizes=(1, 2, 8), n_random=10,
        max_rows=8,  # several chunks of conditions per batch
    )  # fmt: skip

    # Independent references: the plain model, and every feature and error node set to the baseline.
    def mean_metric(edit_for):
        values = []
        for b in batches:
            with torch.no_grad(), spliced(model, saes, edit=edit_for(b)):
                values.append(first_token_metric(forward_batch(model, b), b))
        return float(torch.cat(values).mean())

    def everything_ablated(b):
        return lambda h, f, e: tuple(t.to(f.dtype) for t in baseline.expand(h, b))

    with torch.no_grad():
        full = float(torch.cat([first_token_metric(forward_batch(model, b), b) for b in batches]).mean())
    empty = mean_metric(everything_ablated)
    circuit = {"residuals_1": torch.tensor([3, 40]), "mlp_1": torch.tensor([10]), "attention_2": torch.tensor([7])}
    kept = mean_metric(lambda b: ablate_complement(circuit, BoundBaseline(baseline, b)))
    without = mean_metric(lambda b: ablate(circuit, BoundBaseline(baseline, b)))
    assert out["metric_full"] == pytest.approx(full, abs=1e-4)
    assert out["metric_empty"] == pytest.approx(empty, abs=1e-4)
    assert abs(full - empty) > 1e-3
    assert out["faithfulness"] == pytest.approx((kept - empty) / (full - empty), abs=1e-3)
    assert out["completeness"] == pytest.approx((without - empty) / (full - empty), abs=1e-3)
    assert set(out["faithfulness_curve"]) == {"1", "2", "4"}  # sizes beyond the ranking are dropped; 4 added
    assert out["faithfulness_curve"]["4"] == out["faithfulness"]
    assert "error nodes are kept unablated" in out["error_nodes"]
    rnd = out["random"]
    assert rnd["n_random"] == 10 and len(rnd["random_effects"]) == 10
    assert rnd["effect"] == pytest.approx(full - without, abs=1e-4)
    assert rnd["per_hook_counts"] == {"residuals_1": 2, "mlp_1": 1, "attention_2": 1}
    assert all({h: len(v) for h, v in s.items()} == rnd["per_hook_counts"] for s in out["random_sets"])
    assert 0 <= rnd["percentile"] <= 100 and 0 < rnd["p_value"] <= 1


def test_size_search_on_the_model_stops_where_the_measured_curve_first_crosses_the_target(model, pad_id):
    """The known size: the full faithfulness curve measured independently (metric_validation at every n)."""
    saes = random_saes(model.config.hidden_size)
    baseline = mean_baseline(model, saes, make_batches(random_prompts(6, seed=4), N_POST, pad_id, batch_size=6))
    batches = make_batches(random_prompts(6, seed=6), N_POST, pad_id, batch_size=4)
    ranked = [(h, f) for f in range(0, 120, 5) for h in ("residuals_1", "mlp_1", "attention_2")]
    sizes = list(range(1, len(ranked) + 1))
    curve = metric_validation(
        model, saes, baseline, batches, ranked, size=len(ranked), metric_fn=first_token_metric, sizes=sizes,
        random_sets=[],
    )["faithfulness_curve"]  # fmt: skip
    target = 0.5 * (min(curve.values()) + max(curve.values()))
    search = search_size(
        model_faithfulness(model, saes, baseline, batches, ranked, first_token_metric), len(ranked), target
    )
    assert search.met and curve[str(search.size)] >= target
    assert search.size == 1 or curve[str(search.size - 1)] < target  # bisection's neighbour below misses it
    assert search.faithfulness == pytest.approx(curve[str(search.size)], abs=1e-4)
    assert len(search.tried) < len(ranked) // 2


def test_stacked_generation_equals_one_generation_per_condition(model, tiny_llama, pad_id):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    saes = random_saes(model.config.hidden_size)
    baseline = mean_baseline(model, saes, make_batches(random_prompts(6, seed=4), N_POST, pad_id, batch_size=6))
    batches = make_batches(random_prompts(5, seed=7), N_POST, pad_id, batch_size=3)
    nodes = {"residuals_1": torch.arange(0, 128, 2), "mlp_1": torch.arange(64)}
    conditions = [CLEAN, Condition(nodes, Mode.ablate), Condition(nodes, Mode.steer, alpha=3.0)]
    stacked = generate_under(
        model, batches, 3, feature_interventions(model, saes, baseline, conditions), tokenizer, max_new_tokens=5
    ).responses
    for r, cond in enumerate(conditions):
        alone = generate_under(
            model, batches, 1, feature_interventions(model, saes, baseline, [cond]), tokenizer, max_new_tokens=5
        ).responses
        assert alone[0] == stacked[r]
    assert stacked[1] != stacked[0]  # ablating half of the features changes what is generated
    # Unedited (spliced) generation is the model's own greedy generation.
    plain = generate_under(
        model, batches, 1, lambda b, rng: contextlib.nullcontext(), tokenizer, max_new_tokens=5
    ).responses
    assert plain[0] == stacked[0]
    kl = kl_under(model, batches, 3, feature_interventions(model, saes, baseline, conditions))
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 1e-3 and kl[2] > 1e-3


def test_behaviour_validation_reports_drops_by_label_and_against_random_sets(model, tiny_llama, pad_id):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    saes = random_saes(model.config.hidden_size)
    baseline = mean_baseline(model, saes, make_batches(random_prompts(6, seed=4), N_POST, pad_id, batch_size=6))
    prompts = make_batches(random_prompts(6, seed=8), N_POST, pad_id, batch_size=4)
    harmless = make_batches(random_prompts(3, seed=9), N_POST, pad_id, batch_size=4)
    circuit = {"residuals_1": torch.arange(0, 128, 2)}
    randoms = [{"residuals_1": torch.arange(1, 128, 2)}] * 3
    before = generate_under(
        model, prompts, 1, lambda b, rng: contextlib.nullcontext(), tokenizer, max_new_tokens=4
    ).responses[0]

    # A judge that "refuses" exactly the unedited responses: any change of response counts as a drop.
    def judge(responses):
        return [r == before[i] for i, r in enumerate(responses)]

    labels = ["toxic", "safe"] * 3
    directions = {"residuals_2": 10 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))}
    out = behaviour_validation(
        model, saes, baseline, prompts, labels, harmless, circuit, randoms, judge, tokenizer,
        is_target=[True, False] * 3, max_new_tokens=4, steer_alpha=5.0, directions=directions,
        metric_fn=first_token_metric,
    )  # fmt: skip
    assert out["refusal_rate_before"] == 1.0
    assert out["refusal_rate_drop"] == pytest.approx(out["refusal_rate_before"] - out["refusal_rate_after"])
    assert out["n_prompts"] == 3 and out["n_random"] == 3 and out["max_new_tokens"] == 4
    assert set(out["refusal_rate_drop_by_label"]) == {"toxic", "safe"}
    assert out["by_label"]["toxic"]["n"] == 3
    assert out["kl_harmless"] > 0 and out["kl_harmless_steered"] > 0
    assert 0 <= out["percentile"] <= 100 and out["p_value"] == pytest.approx(
        (1 + sum(d >= out["refusal_rate_drop"] for d in out["random_refusal_rate_drops"])) / 4
    )
    # The direction's row, stacked with the others, equals its ablation run on its own.
    alone = direction_ablation(
        model, directions, prompts, labels, harmless, judge, tokenizer, is_target=[True, False] * 3, max_new_tokens=4
    )
    assert out["direction"]["refusal_rate_drop"] == pytest.approx(alone["refusal_rate_drop"])
    assert out["direction"]["refusal_rate_drop_by_label"] == pytest.approx(alone["refusal_rate_drop_by_label"])
    assert out["direction"]["kl_harmless"] == pytest.approx(alone["kl_harmless"], rel=1e-3, abs=1e-6)
    assert out["metric_random"]["n_random"] == 3
    # Random sets generate for the target prompts alone (sub-batches, less padding): same drops as on the full batches.
    conds = [Condition(dict(r), Mode.ablate) for r in randoms]
    full = generate_under(
        model, prompts, 3, feature_interventions(model, saes, baseline, conds), tokenizer, max_new_tokens=4
    ).responses
    rates = [np.mean([judge(r)[i] for i in (0, 2, 4)]) for r in full]
    assert out["random_refusal_rate_drops"] == pytest.approx([out["refusal_rate_before"] - x for x in rates])


def test_validate_circuit_reads_the_metric_random_sets_from_the_generations(model, tiny_llama, pad_id):
    """With a last-position metric the random sets' metric comes from the ablation generations' first-token
    logits; it must equal the separate stacked metric pass that runs without generation."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    saes = random_saes(model.config.hidden_size)
    baseline = mean_baseline(model, saes, make_batches(random_prompts(6, seed=4), N_POST, pad_id, batch_size=6))
    prompts = make_batches(random_prompts(5, seed=14), N_POST, pad_id, batch_size=3)
    harmless = make_batches(random_prompts(2, seed=15), N_POST, pad_id, batch_size=4)
    ranked = [("residuals_1", i) for i in range(0, 40, 4)] + [("mlp_1", i) for i in range(0, 30, 3)]
    common: dict[str, Any] = dict(size=12, sizes=(2, 12, 20), n_random=4, seed=7)
    with_generation = validate_circuit(
        model, saes, baseline, ranked, first_token_metric, prompts, labels=["toxic"] * 5, harmless_batches=harmless,
        judge=lambda rs: [r.startswith("a") for r in rs], tokenizer=tokenizer, max_new_tokens=2,
        logits_to_keep=lambda b: 1, **common,
    )  # fmt: skip
    metric_only = validate_circuit(
        model, saes, baseline, ranked, first_token_metric, prompts, generation=False, **common
    )
    a, b = with_generation["metric"]["random"], metric_only["metric"]["random"]
    assert "first-token logits" in a["source"] and "source" not in b
    assert a["per_hook_counts"] == b["per_hook_counts"] == {"residuals_1": 10, "mlp_1": 2}
    assert a["random_effects"] == pytest.approx(b["random_effects"], abs=1e-4)
    assert a["effect"] == pytest.approx(b["effect"], abs=1e-4)
    assert with_generation["metric"]["random_sets"] == metric_only["metric"]["random_sets"]
    assert set(with_generation["faithfulness_curve"]) == {"2", "12", "20"}
    assert with_generation["ablation"]["n_random"] == 4 and metric_only["ablation"] is None
    # Other prompts riding along (is_target False) leave the metric's random comparison unchanged.
    extra = random_prompts(3, seed=16)
    mixed_prompts = [p for b in prompts for r in range(b.size) for p in [b.prompt_ids(r)]] + extra
    mixed = make_batches(mixed_prompts, N_POST, pad_id, batch_size=4)
    riding = validate_circuit(
        model, saes, baseline, ranked, first_token_metric, prompts, prompt_batches=mixed,
        labels=["toxic"] * 5 + ["safe"] * 3, is_target=[True] * 5 + [False] * 3, harmless_batches=harmless,
        judge=lambda rs: [r.startswith("a") for r in rs], tokenizer=tokenizer, max_new_tokens=2,
        logits_to_keep=lambda b: 1, **common,
    )  # fmt: skip
    assert "first-token logits" in riding["metric"]["random"]["source"]
    assert riding["metric"]["random"]["random_effects"] == pytest.approx(b["random_effects"], abs=1e-4)
    summary = ablation_summary(with_generation)
    assert summary is not None and set(summary) == {
        "refusal_rate_drop", "refusal_rate_drop_by_label", "random_refusal_rate_drop_median", "percentile",
        "p_value", "n_random", "kl_harmless",
    }  # fmt: skip


def write_store(model, path: Path, prompts: list[list[int]]) -> ActivationStore:
    """A real store of the prompts' activations at every position (positions=prompt), float16 encoded."""
    hooks = ["residuals_1", "residuals_2"]
    writer = StoreWriter.open(
        path, fingerprint="direction-test", hook_points=hooks, d_model=model.config.hidden_size,
        model_dtype=torch.float32, chunk_tokens=16, attrs={}, durable=False,
    )  # fmt: skip
    with torch.no_grad():
        for s, ids in enumerate(prompts):
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            n = len(ids)
            phase = [int(Phase.PROMPT)] * (n - N_POST) + [int(Phase.POST_INSTRUCTION)] * N_POST
            record = SampleRecord(s, f"p{s}", "c", "toxic", "r", True, 0.0, n, 0)
            writer.append(
                TokenBlock([record], np.full(n, s), np.arange(n), np.array(phase), np.array(ids),
                           {h: hidden[int(h.split("_")[1])][0] for h in hooks})
            )  # fmt: skip
    writer.finalize()
    return ActivationStore.open(path)


def test_difference_in_means_direction_from_store_and_model_agree(model, pad_id, tmp_path):
    refused, answered = random_prompts(5, seed=10), random_prompts(4, seed=11)
    hooks = ["residuals_1", "residuals_2"]
    store = write_store(model, tmp_path / "store", refused + answered)
    from_store = directions_from_store(store, hooks, list(range(5)), list(range(5, 9)))
    from_model = directions_from_model(
        model, hooks, make_batches(refused, N_POST, pad_id, 2), make_batches(answered, N_POST, pad_id, 3)
    )
    # Independent reference: unpadded forwards, hidden_states[N] at the last token, float64 means.
    with torch.no_grad():
        last = [model(torch.tensor([p]), output_hidden_states=True).hidden_states for p in refused + answered]
    for hook in hooks:
        layer = int(hook.split("_")[1])
        states = torch.stack([h[layer][0, -1].double() for h in last])
        expected = states[:5].mean(0) - states[5:].mean(0)
        assert from_model[hook].dtype == torch.float64
        torch.testing.assert_close(from_model[hook], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(from_store[hook], expected, atol=2e-2, rtol=2e-2)  # float16 store


def test_direction_ablation_projects_out_at_every_position(model, batch):
    direction = {"residuals_1": torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))}
    unit = direction["residuals_1"] / direction["residuals_1"].norm()
    seen: dict = {}
    context = projection_interventions(model, direction, [False, True])
    with torch.no_grad(), context(batch, range(2)):
        handle = capture_layer_input(model, 1, seen)
        forward_batch(model, repeat_batch(batch, 2))
        handle.remove()
    clean, projected = seen["x"][: batch.size], seen["x"][batch.size :]
    assert float((clean @ unit).abs().max()) > 1e-2  # the clean half is left alone
    assert float((projected @ unit).abs().max()) < 1e-5
    torch.testing.assert_close(projected, clean - (clean @ unit)[..., None] * unit, atol=1e-5, rtol=1e-5)


def test_direction_ablation_result_and_decoder_cosines(model, tiny_llama, pad_id):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = make_batches(random_prompts(4, seed=12), N_POST, pad_id, 4)
    harmless = make_batches(random_prompts(2, seed=13), N_POST, pad_id, 4)
    gen = torch.Generator().manual_seed(1)
    directions = {h: 5 * torch.randn(model.config.hidden_size, generator=gen) for h in ["residuals_1", "residuals_2"]}
    out = direction_ablation(
        model, directions, prompts, ["toxic", "safe"] * 2, harmless, lambda rs: [True] * len(rs), tokenizer,
        max_new_tokens=3,
    )  # fmt: skip
    assert out["refusal_rate_before"] == 1.0 and out["refusal_rate_drop"] == 0.0
    assert set(out["refusal_rate_drop_by_label"]) == {"toxic", "safe"}
    assert out["kl_harmless"] > 0
    saes = random_saes(model.config.hidden_size)
    with torch.no_grad():
        saes["residuals_1"].W_dec[5] = 3 * directions["residuals_1"].float()  # perfectly aligned feature
    cos = decoder_cosines(directions, saes, [("residuals_1", 5), ("residuals_1", 6), ("mlp_1", 1)])
    assert [(r["hook"], r["feature"]) for r in cos["features"]] == [("residuals_1", 5), ("residuals_1", 6)]
    assert cos["features"][0]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert cos["features"][0]["abs_percentile"] > 99
    assert abs(cos["features"][1]["cosine"]) < 0.9
