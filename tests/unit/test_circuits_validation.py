"""Circuits validation pieces that need no model: batch layout, ablation edits, random feature sets."""

from __future__ import annotations

import torch

from refusal_lab.circuits.batches import PAD_OFFSET, build_batch, make_batches, select_rows
from refusal_lab.circuits.validate import random_node_sets, rank_against
from refusal_lab.store import Phase


def test_batch_is_left_padded_with_phases_offsets_and_positions():
    prompts = [[1, 10, 11, 12, 90, 91], [1, 20, 90, 91]]
    responses = [[5], [6, 7, 8]]
    b = build_batch(prompts, n_post=2, pad_id=0, responses=responses)
    assert b.input_ids.tolist() == [[1, 10, 11, 12, 90, 91, 5], [1, 20, 90, 91, 6, 7, 8]]
    P, T, R = int(Phase.PROMPT), int(Phase.POST_INSTRUCTION), int(Phase.GENERATED)
    assert b.phase.tolist() == [[P, P, P, P, T, T, R], [P, P, T, T, R, R, R]]
    assert b.last_prompt_index.tolist() == [5, 3]
    assert b.offset_from_end.tolist() == [[5, 4, 3, 2, 1, 0, -1], [3, 2, 1, 0, -1, -2, -3]]
    assert b.prompt_ids(1) == prompts[1]

    padded = build_batch([[1, 2, 90, 91], [1, 90, 91]], n_post=2, pad_id=0)
    assert padded.input_ids[1].tolist() == [0, 1, 90, 91]
    assert padded.attention_mask[1].tolist() == [0, 1, 1, 1]
    assert padded.position_ids[1].tolist() == [0, 0, 1, 2]
    assert padded.phase[1].tolist() == [-1, P, T, T]
    assert padded.offset_from_end[1].tolist() == [PAD_OFFSET, 2, 1, 0]
    assert padded.last_prompt_index.tolist() == [3, 3]


def test_make_batches_sorts_longest_first_and_keeps_the_index():
    prompts = [[1] * n for n in (3, 9, 5, 7, 4)]
    batches = make_batches(prompts, n_post=1, pad_id=0, batch_size=2)
    assert [b.index for b in batches] == [[1, 3], [2, 4], [0]]
    for b in batches:
        assert b.attention_mask.sum(-1).tolist() == [len(prompts[i]) for i in b.index]
    assert torch.cat([b.input_ids.new_tensor(b.index) for b in batches]).sort().values.tolist() == list(range(5))


def test_random_sets_match_per_hook_counts_and_come_from_active_features_outside_the_circuit():
    circuit = {
        "residuals_0": torch.tensor([1, 4, 7]),
        "mlp_1": torch.tensor([2]),
        "attention_2": torch.tensor([], dtype=torch.long),
    }
    gen = torch.Generator().manual_seed(0)
    active = {h: torch.rand(64, generator=gen) < 0.3 for h in circuit}
    for hook, idx in circuit.items():
        active[hook][idx] = True  # circuit features are active too, and must still be left out
    sets, pool = random_node_sets(circuit, active, n=12, seed=3)
    assert len(sets) == 12
    for s in sets:
        assert {h: int(i.numel()) for h, i in s.items()} == {"residuals_0": 3, "mlp_1": 1}
        assert sum(int(i.numel()) for i in s.values()) == 4  # the circuit's size
        for hook, idx in s.items():
            assert bool(active[hook][idx].all())
            assert not set(idx.tolist()) & set(circuit[hook].tolist())
            assert len(set(idx.tolist())) == len(idx)
    assert pool == {"residuals_0": "active_outside_circuit", "mlp_1": "active_outside_circuit"}
    assert len({tuple(s["residuals_0"].tolist()) for s in sets}) > 1  # the sets differ
    again, _ = random_node_sets(circuit, active, n=12, seed=3)
    assert all(torch.equal(a[h], b[h]) for a, b in zip(sets, again, strict=True) for h in a)  # seeded


def test_random_sets_widen_the_pool_when_too_few_features_are_active():
    circuit = {"mlp_0": torch.tensor([0, 1, 2])}
    active = {"mlp_0": torch.zeros(16, dtype=torch.bool)}
    active["mlp_0"][[0, 1, 2, 3]] = True  # one active feature outside the circuit, three needed
    sets, pool = random_node_sets(circuit, active, n=5, seed=0)
    assert pool == {"mlp_0": "active"}
    assert all(bool(active["mlp_0"][s["mlp_0"]].all()) and s["mlp_0"].numel() == 3 for s in sets)


def test_percentile_and_empirical_p_value():
    out = rank_against(5.0, [1.0, 2.0, 5.0, 7.0])
    assert out["percentile"] == 50.0  # two of four random effects are smaller
    assert out["p_value"] == (1 + 2) / (1 + 4)  # 5.0 and 7.0 are >= the circuit's effect
    assert out["random_median"] == 3.5
    assert rank_against(10.0, [0.0] * 10)["p_value"] == 1 / 11


def test_select_rows_keeps_rows_and_drops_all_padding_columns():
    b = build_batch([[1, 2, 3, 90, 91], [1, 90, 91], [1, 5, 90, 91]], n_post=2, pad_id=0, index=[7, 8, 9])
    sub = select_rows(b, [1, 2])
    assert sub.index == [8, 9]
    assert sub.input_ids.tolist() == [[0, 1, 90, 91], [1, 5, 90, 91]]
    assert sub.last_prompt_index.tolist() == [3, 3]
    assert sub.phase.tolist() == b.phase[[1, 2], 1:].tolist()
    assert sub.offset_from_end.tolist() == b.offset_from_end[[1, 2], 1:].tolist()
    assert sub.position_ids.tolist() == b.position_ids[[1, 2], 1:].tolist()
    assert sub.prompt_ids(0) == [1, 90, 91]
