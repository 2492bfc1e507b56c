"""The edit as weights: the residual-stream writers orthogonalised against the selected decoder directions.

Reads the live model (never changes it); writes an HF checkpoint with `save_pretrained`
(weights, config, generation config) and the tokenizer with its chat template beside it, so
`AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)` load
the edited model like any other. For each writer w with basis U_w (refusal_lab.edit.intervene):

    embedding   E'   = E - (E U) U^T            (rows are token vectors)
    o_proj      W_o' = W_o - U (U^T W_o)         (out = h W^T: the output space is the rows' space)
    down_proj   W_d' = W_d - U (U^T W_d)

computed in float64 and cast back to the weights' dtype. A tied LM head is untied first
(the head reads the stream, it must keep the original embedding).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.edit.intervene import EMBEDDING, Bases
from refusal_lab.errors import ConfigError
from refusal_lab.hooks import DECOMPOSITION_VERIFIED
from refusal_lab.layers import Site

log = logging.getLogger(__name__)


def writer_parameter(point_site: Site, layer: int) -> str:
    """The state-dict name of the matrix a writer applies last (Llama / Mistral layout)."""
    if point_site == Site.ATTENTION:
        return f"model.layers.{layer}.self_attn.o_proj"
    return f"model.layers.{layer}.mlp.down_proj"


def check_editable(model: nn.Module) -> None:
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    if model_type not in DECOMPOSITION_VERIFIED:
        raise ConfigError(
            f"stages: edit orthogonalises Llama/Mistral writers (embed_tokens, o_proj, down_proj); model_type "
            f"{model_type!r} is not one of {sorted(DECOMPOSITION_VERIFIED)}; drop edit from stages"
        )


def edited_state_dict(model: PreTrainedModel, bases: Bases) -> dict[str, torch.Tensor]:
    """The model's state dict with every writer orthogonalised (new tensors; the model is untouched)."""
    check_editable(model)
    state = dict(model.state_dict())
    for point, u in bases.items():
        if not u.shape[1]:
            continue
        if point == EMBEDDING:
            names = ["model.embed_tokens.weight"]
        else:
            prefix = writer_parameter(point.site, point.layer)
            names = [f"{prefix}.weight"] + ([f"{prefix}.bias"] if f"{prefix}.bias" in state else [])
        for name in names:
            w = state[name]
            u64 = u.to(w.device)
            w64 = w.detach().double()
            # Embedding rows are stream vectors; a [D, in] matrix or a [D] bias lives in the stream as columns.
            new = w64 - (w64 @ u64) @ u64.T if point == EMBEDDING else w64 - u64 @ (u64.T @ w64)
            state[name] = new.to(w.dtype)
    return state


def save_edited(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, bases: Bases, out: Path) -> dict[str, int]:
    """Write the edited checkpoint and the tokenizer (chat template included) to `out`; returns rank per writer."""
    state = edited_state_dict(model, bases)
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and EMBEDDING in bases
    if tied:  # the head keeps reading with the original embedding
        state["lm_head.weight"] = model.get_parameter("model.embed_tokens.weight").detach().clone()
    out.mkdir(parents=True, exist_ok=True)
    previous = model.config.tie_word_embeddings if tied else None
    try:
        if tied:
            model.config.tie_word_embeddings = False
        model.save_pretrained(out, state_dict=state)
    finally:
        if tied:
            model.config.tie_word_embeddings = previous
    tokenizer.save_pretrained(out)
    log.info("edit: edited checkpoint saved to %s", out)
    return {p.name: int(u.shape[1]) for p, u in bases.items()}
