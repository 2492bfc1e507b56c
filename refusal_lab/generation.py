"""Batched greedy generation with a KV cache that records every token's activations.

Our own loop rather than `model.generate`: it lets the recorder know which column each
forward call writes (prefill, then one column per decode step, so nothing is overwritten),
and it feeds the last generated token once more so that every generated token, including
the final one and EOS, has activations, exactly as a full forward over prompt + response
would give them (the integration tests check this against `output_hidden_states`).

The model's `generation_config` is honoured where it changes the greedy argmax: the fields in
`GREEDY_FIELDS` are applied with transformers' own logits processors, as `generate` would apply
them; sampling fields are ignored (the study is greedy); any other field that is set is refused
by name (`greedy_settings`), so no setting silently changes what a model says.

Shape letters: B batch, T padded prompt length, M max_new_tokens, V vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
)

from refusal_lab.errors import ConfigError
from refusal_lab.hooks import ActivationRecorder

log = logging.getLogger(__name__)

GREEDY_FIELDS = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
)
"""generation_config fields that change the greedy argmax and that `generate_greedy` applies."""
SAMPLING_FIELDS = frozenset(
    {"do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "top_h", "epsilon_cutoff", "eta_cutoff"}
)
"""Fields that only matter when sampling; ignored (Llama-2-chat ships do_sample: true, temperature 0.6, top_p 0.9)."""
NEUTRAL_FIELDS = frozenset(
    {
        # token ids: EOS ids stop generation (the collect stage reads them from the model), BOS/pad are the tokenizer's
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "decoder_start_token_id",
        # length caps: inference.max_new_tokens and inference.max_prompt_tokens decide lengths
        "max_length",
        "max_new_tokens",
        # bookkeeping, caching and output flags that change no token
        "transformers_version",
        "_from_model_config",
        "use_cache",
        "cache_implementation",
        "cache_config",
        "compile_config",
        "disable_compile",
        "return_dict_in_generate",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        # beam-search-only settings, no effect with one beam
        "length_penalty",
        "early_stopping",
    }
)
"""Fields that are set in shipped configs but change no greedy token."""
NO_OP_VALUES: dict[str, Any] = {"num_beams": 1, "num_return_sequences": 1, "min_length": 0, "min_new_tokens": 0}
"""Fields accepted at the value that means plain greedy decoding."""


@dataclass(frozen=True)
class GreedySettings:
    """The generation_config fields that change the greedy argmax (None/empty: not set)."""

    repetition_penalty: float | None = None
    """Divides the logit of every token already in the sequence (prompt included, padding not)."""
    no_repeat_ngram_size: int | None = None
    """No n-gram of this size occurs twice in the sequence."""
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    """Token sequences that may not be generated."""
    suppress_tokens: tuple[int, ...] = ()
    """Tokens never generated."""
    begin_suppress_tokens: tuple[int, ...] = ()
    """Tokens not generated as the first response token."""

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (for fingerprints and logs); {} for plain greedy decoding."""
        return {k: v for k, v in asdict(self).items() if v not in (None, ())}

    def processors(self, attention_mask_BT: torch.Tensor, eos_ids: list[int]) -> LogitsProcessorList:
        """transformers' logits processors for these settings, in the order `generate` builds them."""
        device = attention_mask_BT.device
        out = LogitsProcessorList()
        if self.repetition_penalty is not None:
            # Left padding is not part of any row's text (generate ignores it the same way).
            padding_B = (attention_mask_BT != 0).int().argmax(dim=1)
            out.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty, prompt_ignore_length=padding_B))
        if self.no_repeat_ngram_size is not None:
            out.append(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size))
        if self.bad_words_ids:
            eos = torch.tensor(eos_ids, device=device)
            out.append(NoBadWordsLogitsProcessor([list(w) for w in self.bad_words_ids], eos))
        if self.suppress_tokens:
            out.append(SuppressTokensLogitsProcessor(list(self.suppress_tokens), device=str(device)))
        if self.begin_suppress_tokens:
            begin = attention_mask_BT.shape[1]  # the first generated token
            out.append(SuppressTokensAtBeginLogitsProcessor(list(self.begin_suppress_tokens), begin, str(device)))
        return out


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `rows`, padded on the left to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _ids(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in (value or ()))


def greedy_settings(config: GenerationConfig, model_name: str) -> GreedySettings:
    """What of a model's generation_config changes greedy decoding; refuses what refusal_lab cannot reproduce.

    Sampling fields are ignored with one log line; any set field that is neither applied, a
    sampling field nor known to change no greedy token is a ConfigError naming it.
    """
    fields = config.to_diff_dict()
    sampling = {k: v for k, v in fields.items() if k in SAMPLING_FIELDS and (k, v) != ("do_sample", False)}
    unsupported = {
        k: v
        for k, v in fields.items()
        if k not in SAMPLING_FIELDS
        and k not in NEUTRAL_FIELDS
        and k not in GREEDY_FIELDS
        and not (k in NO_OP_VALUES and v == NO_OP_VALUES[k])
    }
    if unsupported:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(unsupported.items()))
        raise ConfigError(
            f"model.name: the generation_config of {model_name} sets {listed}, which changes greedy decoding in a way "
            f"refusal_lab does not reproduce; applied: {', '.join(GREEDY_FIELDS)}; ignored: sampling fields "
            f"({', '.join(sorted(SAMPLING_FIELDS))}) and fields that change no greedy token. Remove the field from "
            "generation_config.json (a local copy of the model) to run it"
        )
    if sampling:
        log.info(
            "generation: ignoring the sampling fields of %s's generation_config (%s): refusal_lab decodes greedily",
            model_name,
            ", ".join(f"{k}={v!r}" for k, v in sorted(sampling.items())),
        )
    penalty = fields.get("repetition_penalty")
    ngram = fields.get("no_repeat_ngram_size")
    return GreedySettings(
        repetition_penalty=None if penalty in (None, 1.0) else float(penalty),
        no_repeat_ngram_size=None if not ngram else int(ngram),
        bad_words_ids=tuple(_ids(w) for w in fields.get("bad_words_ids") or ()),
        suppress_tokens=_ids(fields.get("suppress_tokens")),
        begin_suppress_tokens=_ids(fields.get("begin_suppress_tokens")),
    )


@dataclass
class Generation:
    """What one batch produced."""

    tokens_BM: torch.Tensor
    """Generated token ids; cells after a row's EOS hold the pad id."""
    valid_BM: torch.Tensor
    """True where the cell is a real generated token (up to and including EOS)."""
    first_logits_BV: torch.Tensor
    """Logits at the last prompt position (predicting the first response token), float32, as the model
    gave them (before any generation_config processing: the refusal score reads the model itself)."""


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
    settings: GreedySettings | None = None,
) -> Generation:
    """Greedy decoding of a left-padded batch; the recorder sees the prefill and each decode step.

    `settings` (from `greedy_settings`) changes the argmax as the model's generation_config
    would in `generate`; None is plain greedy.
    """
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
    first_logits_BV = out.logits[:, -1].float().to(device)  # device_map=auto may end on another device
    processors = settings.processors(attention_mask_BT, eos_ids) if settings is not None else LogitsProcessorList()
    # The sequence so far, as `generate` hands it to the processors (padding included, masked by them).
    history_BL = input_ids_BT
    next_B = (
        processors(cast(torch.LongTensor, history_BL), first_logits_BV.clone()).argmax(-1)
        if processors
        else first_logits_BV.argmax(-1)
    )

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
        logits_BV = out.logits[:, -1].to(device)
        if processors:
            history_BL = torch.cat([history_BL, token_B[:, None]], dim=1)
            logits_BV = processors(cast(torch.LongTensor, history_BL), logits_BV.float())
        next_B = logits_BV.argmax(-1)
        active_B = still_active_B
    if recorder is not None:
        recorder.column = None
    return Generation(tokens_BM, valid_BM, first_logits_BV)
