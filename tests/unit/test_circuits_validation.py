"""Circuits validation pieces that need no model: batch layout, ablation edits, random feature sets."""

from __future__ import annotations

import torch

from refusal_lab.circuits.batches import PAD_OFFSET, build_batch, make_batches
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
