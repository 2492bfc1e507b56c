"""Which tokens an SAE sees: held-out split, filters, balancing, and the resumable shuffled stream."""

from __future__ import annotations

import numpy as np
import pytest

from refusal_lab.sae.config import Balance, SaeConfig, TokenFilterConfig, TokenPhase
from refusal_lab.sae.data import (
    WindowStream,
    balance_weights,
    block_tokens,
    held_out_samples,
    hook_stats,
    plan_tokens,
    token_filter_mask,
)
from refusal_lab.sae.source import ArraySource
from refusal_lab.sae.synthetic import LABELS, planted_source


@pytest.fixture(scope="module")
def source():
    src, _ = planted_source(n_samples=120, tokens_per_sample=30, d=8, n_features=16, hooks=("residuals_0", "mlp_0"))
    return src


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_out_samples_never_overlap_training_samples(source, seed):
    plan = plan_tokens(source, SaeConfig(held_out_share=0.2), seed)
    token_sample = source.tokens()["sample_id"]
    train_samples = set(token_sample[plan.train_rows].tolist())
    held = set(plan.held_out_ids.tolist())
    assert train_samples and held and not train_samples & held
    assert set(token_sample[plan.eval_rows].tolist()) <= held
    assert len(held) == 24  # 20% of 120, per label: 8 of each 40
    labels = np.asarray(source.samples()["label"])
    assert sorted(np.unique(labels[plan.held_out_ids], return_counts=True)[1].tolist()) == [8, 8, 8]
    assert not np.intersect1d(plan.train_rows, plan.eval_rows).size


def test_split_is_seeded():
    ids, labels = np.arange(100), np.array(["a", "b"] * 50)
    prompts = np.array([f"prompt {i}" for i in ids])
    first = held_out_samples(ids, labels, prompts, 0.1, seed=7)
    assert np.array_equal(first, held_out_samples(ids, labels, prompts, 0.1, seed=7))
    assert not np.array_equal(first, held_out_samples(ids, labels, prompts, 0.1, seed=8))
    # Prompt texts, not positions: shuffling the table's row order does not change who is held out.
    perm = np.random.default_rng(0).permutation(100)
    assert np.array_equal(first, held_out_samples(ids[perm], labels[perm], prompts[perm], 0.1, seed=7))


def with_duplicate_prompts(n_samples: int = 120, n_distinct: int = 40):
    """A planted source whose samples repeat 40 prompt texts (as or-bench-hard-1k inside or-bench-80k does)."""
    src, _ = planted_source(n_samples=n_samples, tokens_per_sample=20, d=8, n_features=16)
    src.sample_table["prompt"] = [f"prompt {i % n_distinct}" for i in range(n_samples)]
    src.sample_table["label"] = [LABELS[(i % n_distinct) % 3] for i in range(n_samples)]
    return src


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_duplicate_prompts_stay_on_one_side_of_the_split(seed):
    src = with_duplicate_prompts()
    plan = plan_tokens(src, SaeConfig(held_out_share=0.25), seed)
    prompts = np.asarray(src.sample_table["prompt"])
    held = set(prompts[plan.held_out_ids].tolist())
    trained = set(prompts[plan.train_sample_ids].tolist())
    assert held and trained and not held & trained
    assert len(held) == 10  # round(0.25 * n) of each label's 14, 13, 13 distinct prompts: 4 + 3 + 3
    assert len(plan.held_out_ids) == 3 * len(held)  # every copy of a held-out prompt is held out


def test_filters_drop_bos_and_chosen_phases(source):
    tokens = source.tokens()
    keep = token_filter_mask(tokens, TokenFilterConfig())
    assert not keep[tokens["position"] == 0].any()
    assert keep[(tokens["position"] > 0)].all()
    no_template = token_filter_mask(tokens, TokenFilterConfig(phases=[TokenPhase.prompt, TokenPhase.generated]))
    assert not no_template[tokens["phase"] == 1].any() and no_template[tokens["phase"] == 2].all()
    with_bos = token_filter_mask(tokens, TokenFilterConfig(drop_bos=False))
    assert with_bos.all()


def test_norm_outlier_threshold_catches_bos_sinks(source):
    # BOS rows are 50x the typical norm in the planted data; kept in the stats, they are the outliers.
    cfg = SaeConfig(filters=TokenFilterConfig(drop_bos=False, outlier_factor=10.0), normalize_activations=True)
    plan = plan_tokens(source, cfg, 0)
    stats = hook_stats(source, ["residuals_0"], plan.train_rows, cfg)["residuals_0"]
    n_bos = int((source.tokens()["position"][plan.train_rows] == 0).sum())
    assert stats.n_outliers == n_bos > 0
    acts = source.acts["residuals_0"][plan.train_rows].astype(np.float64)
    kept = acts[np.linalg.norm(acts, axis=1) <= stats.max_norm]
    assert np.isclose((kept**2).sum(1).mean() * stats.scale**2, 8, rtol=1e-3)  # E|x * scale|^2 = d_model


def test_balance_weights_equalise_labels_and_categories():
    labels = np.array(["safe"] * 6 + ["toxic"] * 2 + ["harmless"] * 12)
    cats = np.array(["a"] * 5 + ["b"] * 1 + ["a"] * 2 + ["c"] * 4 + ["d"] * 8)
    w = balance_weights(labels, cats)
    mass = {lab: w[labels == lab].sum() for lab in ("safe", "toxic", "harmless")}
    assert np.allclose(list(mass.values()), 1 / 3)
    assert np.isclose(w[(labels == "safe") & (cats == "a")].sum(), w[(labels == "safe") & (cats == "b")].sum())


def test_balanced_sampling_shifts_the_mix(source):
    plan = plan_tokens(source, SaeConfig(balance=Balance.label_category), 0)
    assert plan.train_weights is not None and np.isclose(plan.train_weights.sum(), 1.0)
    uniform = plan_tokens(source, SaeConfig(), 0)
    assert uniform.train_weights is None


def test_eval_cap_counts_whole_samples_on_a_shuffled_store():
    """The store is in processing order, not by sample id: the cap must still count each sample's own rows."""
    src, _ = planted_source(n_samples=120, tokens_per_sample=30, d=8, n_features=16)
    rng = np.random.default_rng(5)
    order = np.concatenate([np.arange(30) + 30 * s for s in rng.permutation(120)])  # samples in random order
    lengths = {}
    for name in src.token_table:
        src.token_table[name] = src.token_table[name][order]
    src.acts["residuals_0"] = src.acts["residuals_0"][order]
    for cap in (60, 300, 1000):
        plan = plan_tokens(src, SaeConfig(held_out_share=0.5, eval_tokens=cap), 0)
        token_sample = src.token_table["sample_id"]
        per_sample = np.bincount(token_sample[plan.eval_rows])
        kept = 29  # every sample's tokens but BOS
        assert set(per_sample[per_sample > 0].tolist()) == {kept}  # whole samples only
        lengths[cap] = len(plan.eval_rows)
        assert cap - kept < lengths[cap] <= cap
        held = plan.held_out_ids
        assert np.array_equal(plan.eval_sample_ids, held[: len(plan.eval_sample_ids)])  # lowest held ids first


def clustered_source(counts: dict[str, int], tokens_per_sample: int = 20) -> ArraySource:
    """Samples grouped by label (all of one label, then the next), as a length-sorted store can cluster them.

    Activations hold the row index, so a batch tells which rows it drew.
    """
    labels = [lab for lab, n in counts.items() for _ in range(n)]
    n_samples = len(labels)
    n = n_samples * tokens_per_sample
    acts = np.repeat(np.arange(n, dtype=np.float32)[:, None], 4, axis=1)
    tokens = {
        "sample_id": np.repeat(np.arange(n_samples), tokens_per_sample).astype(np.int32),
        "position": np.tile(np.arange(tokens_per_sample), n_samples).astype(np.int32),
        "phase": np.zeros(n, dtype=np.int8),
        "token_id": np.zeros(n, dtype=np.int32),
    }
    samples = {
        "sample_id": np.arange(n_samples),
        "prompt": [f"p{i}" for i in range(n_samples)],
        "label": labels,
        "category": [["a", "b"][i % 2] if lab == "harmless" else "c" for i, lab in enumerate(labels)],
    }
    return ArraySource({"residuals_0": acts}, tokens, samples)


def test_balanced_sampling_realises_the_target_shares_over_a_pass():
    src = clustered_source({"harmless": 120, "safe": 40, "toxic": 16})
    cfg = SaeConfig(balance=Balance.label_category, held_out_share=0.1)
    plan = plan_tokens(src, cfg, 0)
    assert plan.train_weights is not None
    s = WindowStream(src, ["residuals_0"], plan.train_rows, plan.train_weights, 64, 256, 64, seed=1)
    steps_per_pass = len(plan.train_rows) // 64
    it = s.batches(0)
    drawn = np.concatenate([batch[0, :, 0] for _, batch in take(it, steps_per_pass)]).astype(np.int64)
    it.close()
    labels = np.asarray(src.sample_table["label"])[src.token_table["sample_id"][drawn]]
    shares = {lab: float(np.mean(labels == lab)) for lab in ("harmless", "safe", "toxic")}
    assert all(abs(v - 1 / 3) < 0.02 for v in shares.values()), shares  # per-window draws: 0.45, 0.37, 0.18
    cats = np.asarray(src.sample_table["category"])[src.token_table["sample_id"][drawn]]
    harmless = cats[labels == "harmless"]
    assert abs(np.mean(harmless == "a") - 0.5) < 0.03  # categories equal within a label
    # Resume anywhere still gives the same draws.
    again = s.batches(5)
    (step, batch), *_ = take(again, 1)
    again.close()
    assert step == 5 and np.array_equal(batch[0, :, 0], drawn[5 * 64 : 6 * 64])


def test_stats_drop_nonfinite_rows_even_without_an_outlier_filter():
    src, _ = planted_source(n_samples=40, tokens_per_sample=20, d=8, n_features=16)
    src.acts["residuals_0"][[25, 60, 61], 3] = np.inf  # float16 overflow, as a float16 store holds it
    cfg = SaeConfig(filters=TokenFilterConfig(outlier_factor=None), stats_tokens=10_000)
    plan = plan_tokens(src, cfg, 0)
    stats = hook_stats(src, ["residuals_0"], plan.train_rows, cfg)["residuals_0"]
    assert np.isfinite(stats.scale) and stats.scale > 0 and np.isfinite(stats.mean).all()  # one inf made it 0
    assert np.isfinite(stats.median_norm)
    held_inf = np.isin(np.array([25, 60, 61]), plan.train_rows).sum()
    assert stats.n_nonfinite == held_inf > 0


def stream(source, rows, weights=None, batch=37, buffer=200, block=64, seed=3, hooks=("residuals_0", "mlp_0")):
    return WindowStream(source, list(hooks), rows, weights, batch, buffer, block, seed)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_stream_is_deterministic_and_resumes_at_any_step(source):
    rows = plan_tokens(source, SaeConfig(), 0).train_rows
    it = stream(source, rows).batches(0)
    unbroken = take(it, 250)  # several epochs (rows / 37 ~ 84 steps per epoch)
    it.close()
    for start in (1, 83, 84, 170):
        resumed = stream(source, rows).batches(start)
        for (step, batch), (ref_step, ref) in zip(take(resumed, 20), unbroken[start : start + 20], strict=True):
            assert step == ref_step and np.array_equal(batch, ref)
        resumed.close()


def test_each_epoch_shows_every_training_row_once(source):
    rows = plan_tokens(source, SaeConfig(), 0).train_rows
    acts = source.acts["residuals_0"].astype(np.float32)
    s = stream(source, rows, batch=len(rows))  # one batch = one epoch
    it = s.batches(0)
    (_, epoch0), (_, epoch1) = take(it, 2)
    it.close()
    assert epoch0.shape == (2, len(rows), 8)
    expected = np.sort(acts[rows], axis=0)
    assert np.array_equal(np.sort(epoch0[0], axis=0), expected)
    assert np.array_equal(np.sort(epoch1[0], axis=0), expected)
    assert not np.array_equal(epoch0, epoch1)  # reshuffled per epoch
    # Both hooks come from the same token rows: their row order is shared.
    order = {r.tobytes(): i for i, r in enumerate(acts[rows])}
    other = source.acts["mlp_0"].astype(np.float32)[rows]
    picked = [order[r.tobytes()] for r in epoch0[0]]
    assert np.array_equal(epoch0[1], other[picked])


def test_windows_bound_memory_and_reads_are_contiguous_blocks(source):
    rows = plan_tokens(source, SaeConfig(), 0).train_rows
    s = stream(source, rows, buffer=200, block=64)
    for window in s.windows(0):
        n_rows = sum(len(r) for _, _, r in window.blocks)
        assert n_rows <= 200 and len(window.order) == n_rows
    source.reads.clear()
    it = s.batches(0)
    take(it, 10)
    it.close()
    assert source.reads and all(stop - start <= 64 and start % 64 == 0 for _, start, stop in source.reads)


def test_stream_never_yields_held_out_tokens(source):
    plan = plan_tokens(source, SaeConfig(held_out_share=0.3), 0)
    held_values = {r.tobytes() for r in source.acts["residuals_0"].astype(np.float32)[plan.eval_rows]}
    it = stream(source, plan.train_rows, hooks=("residuals_0",)).batches(0)
    for _, batch in take(it, 60):
        assert not any(r.tobytes() in held_values for r in batch[0])
    it.close()


def test_read_blocks_align_to_store_chunks(source):
    class Chunked:
        attrs = {"chunk_tokens": 1024}

    assert block_tokens(Chunked(), SaeConfig(read_block_tokens=3000)) == 3072
    assert block_tokens(Chunked(), SaeConfig(read_block_tokens=100)) == 1024
    assert block_tokens(source, SaeConfig(read_block_tokens=3000)) == 3000
