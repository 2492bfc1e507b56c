"""Batched greedy generation with a KV cache that records every token's activations.

Our own loop rather than `model.generate`: it lets the recorder know which column each
forward call writes (prefill, then one column per decode step, so nothing is overwritten),
and it feeds the last generated token once more so that every generated token, including
the final one and EOS, has activations, exactly as a full forward over prompt + response
would give them (the integration tests check this against `output_hidden_states`).

Shape letters: B batch, T padded prompt length, M max_new_tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from refusal_lab.hooks import ActivationRecorder


@dataclass
class Generation:
    """What one batch produced."""

    tokens_BM: torch.Tensor
    """Generated token ids; cells after a row's EOS hold the pad id."""
    valid_BM: torch.Tensor
    """True where the cell is a real generated token (up to and including EOS)."""
    first_logits_BV: torch.Tensor
    """Logits at the last prompt position (predicting the first response token), float32."""


@torch.inference_mode()
def generate_greedy(
    model: PreTrainedModel,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    recorder: ActivationRecorder | None = None,
    record_generated: bool = False,
) -> Generation:
    """Greedy decoding of a left-padded batch; the recorder sees the prefill and each decode step."""
    batch, seq = input_ids_BT.shape
    device = input_ids_BT.device
    # Left padding shifts real tokens right: positions must count real tokens only, as HF's
    # generate does, or rotary embeddings differ from an unpadded run.
    position_BT = (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    if recorder is not None:
        recorder.prefill = True
    out = model(
        input_ids=input_ids_BT,
        attention_mask=attention_mask_BT,
        position_ids=position_BT,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    if recorder is not None:
        recorder.prefill = False
    first_logits_BV = out.logits[:, -1].float()
    next_B = first_logits_BV.argmax(-1)

    tokens_BM = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    valid_BM = torch.zeros((batch, max_new_tokens), dtype=torch.bool, device=device)
    eos = torch.tensor(eos_ids, device=device)
    active_B = torch.ones(batch, dtype=torch.bool, device=device)
    mask_BT = attention_mask_BT.long()
    last_position_B = position_BT[:, -1]
    for step in range(max_new_tokens):
        token_B = torch.where(active_B, next_B, torch.full_like(next_B, pad_id))
        tokens_BM[:, step] = token_B
        valid_BM[:, step] = active_B
        finished_B = active_B & torch.isin(token_B, eos)
        still_active_B = active_B & ~finished_B
        # Feed this token if its activations are wanted, or if another token must follow it.
        # (One host sync per step; generate() does the same for its stopping criteria.)
        wanted = record_generated and bool(active_B.any())
        needed = step < max_new_tokens - 1 and bool(still_active_B.any())
        if not (wanted or needed):
            break
        mask_BT = torch.cat([mask_BT, active_B.long()[:, None]], dim=1)
        last_position_B = last_position_B + 1
        if recorder is not None:
            recorder.column = recorder.prompt_columns + step if record_generated else None
        out = model(
            input_ids=token_B[:, None],
            attention_mask=mask_BT,
            position_ids=last_position_B[:, None],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        next_B = out.logits[:, -1].argmax(-1)
        active_B = still_active_B
    if recorder is not None:
        recorder.column = None
    return Generation(tokens_BM, valid_BM, first_logits_BV)
