"""Left-padded prompt batches for the circuits stage, with each cell's phase and offset from the prompt's end.

Reads and writes nothing: token ids come from `refusal_lab.models.encode_prompts` (the chat
template, as collect formats prompts) or from the store's token table, and padding is
`refusal_lab.collect.left_pad`, so a circuits forward sees exactly the sequences collect ran.

Optional responses (the model's own, from the store) are appended after the prompt and
teacher forced; the whole sequence is left padded, so `last_prompt_index` (where the first
response token is predicted) differs between rows when their responses differ in length.

Cell codes (same as the store's tokens/phase, plus -1 for padding):
    phase           -1 pad, 0 prompt (incl. the chat template's prefix), 1 post-instruction template, 2 response
    offset_from_end 0 at the last prompt/template token, 1 before it, ...; response tokens -1, -2, ...;
                    padding PAD_OFFSET

Shape letters: B batch, T padded sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from refusal_lab.collect import left_pad
from refusal_lab.config import ModelConfig
from refusal_lab.models import ChatFormat, chat_format, encode_prompts
from refusal_lab.store import Phase

PAD_PHASE = -1
PAD_OFFSET = -(2**30)
"""offset_from_end of padding cells: far below any response offset, so `offset >= 0` selects prompt cells."""


@dataclass
class PromptBatch:
    """One left-padded batch; rows are the prompts `index` (positions in the list given to the builder)."""

    input_ids: torch.Tensor
    """[B, T] long; padding cells hold the tokenizer's pad id."""
    attention_mask: torch.Tensor
    """[B, T] long, 1 on real tokens."""
    position_ids: torch.Tensor
    """[B, T] long: real tokens counted from 0 (as refusal_lab.generation does), padding 0."""
    phase: torch.Tensor
    """[B, T] int8: -1 pad, 0 prompt, 1 post-instruction template, 2 response."""
    offset_from_end: torch.Tensor
    """[B, T] long: 0 at the last prompt token, counting prompt + template tokens only; see the module docstring."""
    last_prompt_index: torch.Tensor
    """[B] long: column of the last prompt/template token (its logits predict the first response token)."""
    n_prompt_tokens: torch.Tensor
    """[B] long: prompt + template tokens per row."""
    n_response_tokens: torch.Tensor
    """[B] long: teacher-forced response tokens per row (0 without responses)."""
    index: list[int]
    """Row b holds prompt `index[b]` of the builder's input."""

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    def prompt_ids(self, row: int) -> list[int]:
        """The unpadded prompt + template token ids of one row (for decoding)."""
        end = int(self.last_prompt_index[row]) + 1
        return self.input_ids[row, end - int(self.n_prompt_tokens[row]) : end].tolist()

    def to(self, device: torch.device | str) -> PromptBatch:
        move = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return PromptBatch(**{**vars(self), **move})


def select_rows(batch: PromptBatch, rows: Sequence[int]) -> PromptBatch:
    """The given rows of a batch, with columns that are padding in every kept row dropped (still left padded)."""
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=batch.input_ids.device)
    mask = batch.attention_mask[idx]
    real_cols = mask.any(0).nonzero()
    start = int(real_cols[0]) if real_cols.numel() else 0
    fields = {
        k: v[idx][:, start:] if v.ndim == 2 else v[idx] for k, v in vars(batch).items() if isinstance(v, torch.Tensor)
    }
    fields["last_prompt_index"] = fields["last_prompt_index"] - start
    return PromptBatch(**{**vars(batch), **fields, "index": [batch.index[r] for r in rows]})


def build_batch(
    prompt_ids: Sequence[Sequence[int]],
    n_post: int,
    pad_id: int,
    responses: Sequence[Sequence[int]] | None = None,
    index: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> PromptBatch:
    """One batch of chat-formatted prompt token ids (template included), optionally with response ids appended."""
    if not prompt_ids:
        raise ValueError("build_batch: no prompts")
    if responses is not None and len(responses) != len(prompt_ids):
        raise ValueError(f"build_batch: {len(responses)} responses for {len(prompt_ids)} prompts")
    resp = [list(r) for r in responses] if responses is not None else [[] for _ in prompt_ids]
    rows = [list(p) + r for p, r in zip(prompt_ids, resp, strict=True)]
    ids, mask = left_pad(rows, pad_id, torch.device("cpu"))
    batch, width = ids.shape
    n_prompt = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    n_resp = torch.tensor([len(r) for r in resp], dtype=torch.long)
    if bool((n_prompt <= 0).any()):
        raise ValueError("build_batch: an empty prompt")
    position = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    last = width - 1 - n_resp
    col = torch.arange(width)[None, :]
    offset = last[:, None] - col  # >= 0 on prompt cells, < 0 on response cells
    is_real = mask.bool()
    is_prompt = is_real & (offset >= 0)
    phase = torch.full((batch, width), PAD_PHASE, dtype=torch.int8)
    phase[is_prompt] = int(Phase.PROMPT)
    # A prompt shorter than the template (never with a real template) keeps what it has as template.
    phase[is_prompt & (offset < n_post)] = int(Phase.POST_INSTRUCTION)
    phase[is_real & (offset < 0)] = int(Phase.GENERATED)
    offset = torch.where(is_real, offset, torch.full_like(offset, PAD_OFFSET))
    out = PromptBatch(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position,
        phase=phase,
        offset_from_end=offset,
        last_prompt_index=last,
        n_prompt_tokens=n_prompt,
        n_response_tokens=n_resp,
        index=list(index) if index is not None else list(range(len(prompt_ids))),
    )
    return out.to(device)


def make_batches(
    prompt_ids: Sequence[Sequence[int]],
    n_post: int,
    pad_id: int,
    batch_size: int,
    responses: Sequence[Sequence[int]] | None = None,
    device: torch.device | str = "cpu",
) -> list[PromptBatch]:
    """Batches of at most `batch_size` rows, longest first (little padding; the first batch is the largest).

    `PromptBatch.index` maps each row back to its position in `prompt_ids`.
    """
    if batch_size < 1:
        raise ValueError(f"make_batches: batch_size {batch_size} must be >= 1")
    lengths = [len(p) + (len(responses[i]) if responses is not None else 0) for i, p in enumerate(prompt_ids)]
    order = sorted(range(len(prompt_ids)), key=lambda i: (-lengths[i], i))
    out = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out.append(
            build_batch(
                [prompt_ids[i] for i in chunk],
                n_post,
                pad_id,
                [responses[i] for i in chunk] if responses is not None else None,
                chunk,
                device,
            )
        )
    return out


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    assert isinstance(pad, int), "load_tokenizer sets a pad token"
    return pad


def make_text_batches(
    model_cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int,
    max_prompt_tokens: int,
    responses: Sequence[Sequence[int]] | None = None,
    device: torch.device | str = "cpu",
) -> list[PromptBatch]:
    """Chat-format and tokenize `prompts` exactly as collect does, then `make_batches`."""
    fmt, _ = chat_format(model_cfg, tokenizer)
    ids = encode_prompts(model_cfg, tokenizer, list(prompts), max_prompt_tokens)
    return make_batches(ids, fmt.n_post_instruction_tokens, pad_id_of(tokenizer), batch_size, responses, device)


def prefix_token_count(tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat) -> int:
    """Tokens of the chat template before the user's text (e.g. `<s>[INST]`), counted in context.

    These are the same tokens at the same positions in every prompt, so a baseline aligns them
    from the start (refusal_lab.circuits.baseline); counting in context avoids a merge across
    the boundary with the user's first word.
    """
    probe = "Hello there"
    with_text = tokenizer(fmt.prefix + probe, add_special_tokens=False)["input_ids"]
    alone = tokenizer(fmt.prefix, add_special_tokens=False)["input_ids"]
    common = 0
    for a, b in zip(with_text, alone, strict=False):
        if a != b:
            break
        common += 1
    # The last prefix token may merge with the text in context; keep only the tokens both agree on.
    return max(1, common)
