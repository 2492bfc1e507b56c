"""Longer responses for the judges: continue each capped response past the captured tokens, capturing nothing.

A partial refusal often shows only after the first sentence ("I can't give medical advice. That said, here is
..."), beyond the few tokens whose activations are worth storing. Collect calls `continue_responses` after the
capturing generation (outside the activation hooks): rows that hit `inference.max_new_tokens` without an EOS
are fed back as prompt + response and decoded greedily up to `judge.max_response_tokens` in total. The store's
`response` text (and so every judge) reads the whole response; its tokens table and `n_generated_tokens` still
hold only the captured tokens. Greedy decoding continued from a re-read prefix gives the tokens one longer run
would (the same argmax, up to float rounding in the re-read prefix; tested on a tiny model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from refusal_lab.generation import generate_greedy, left_pad


def continue_responses(
    model: Any,
    prompt_rows: Sequence[list[int]],
    tokens_BM: torch.Tensor,
    valid_BM: torch.Tensor,
    max_response_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    device: torch.device,
    settings: Any = None,
) -> list[list[int]]:
    """Each row's response token ids, continued greedily to `max_response_tokens` where the cap cut it off."""
    cap = tokens_BM.shape[1]
    lengths = valid_BM.sum(-1).tolist()
    responses = [tokens_BM[row, : lengths[row]].tolist() for row in range(len(lengths))]
    extra = max_response_tokens - cap
    eos = set(eos_ids)
    todo = [row for row, r in enumerate(responses) if extra > 0 and len(r) == cap and cap > 0 and r[-1] not in eos]
    if not todo:
        return responses
    ids_BT, mask_BT = left_pad([list(prompt_rows[row]) + responses[row] for row in todo], pad_id, device)
    with torch.no_grad():
        more = generate_greedy(model, ids_BT, mask_BT, extra, list(eos_ids), pad_id, settings=settings)
    more_tokens, more_valid = more.tokens_BM.cpu(), more.valid_BM.cpu()
    for i, row in enumerate(todo):
        responses[row] = responses[row] + more_tokens[i, : int(more_valid[i].sum())].tolist()
    return responses
