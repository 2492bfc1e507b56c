"""Feature edits for the spliced model: ablate a circuit, ablate everything but a circuit, steer along it.

Reads and writes nothing. Every edit is a `FeatureEdit` for refusal_lab.circuits.spliced and
acts at every position of every forward call (prompt, template, and each generated token).

* ablate(nodes, baseline): the chosen features take the baseline's value; every other feature
  and the error node are untouched.
* ablate_complement(nodes, baseline): every feature outside the circuit takes the baseline's
  value (at hooks without circuit nodes, all of them); the error nodes are kept unablated.
* steer(nodes, alpha, saes): adds alpha times each chosen feature's unit decoder direction to
  the activation (alpha / |W_dec[i]| added to the feature's activation; the shipped decoder rows
  have unit norm, so alpha is in the activation's own units). The error node is untouched.

Many conditions in one forward: `stacked_edit` takes a list of `Condition`s (node set, mode,
alpha) and a batch repeated once per condition (`repeat_batch`): rows [r * B, (r + 1) * B) run
condition r.
So a faithfulness curve, the random sets and the circuit cost one forward per batch, never one
per feature or per set (issue 9 item 13).

Shape letters: R conditions, B batch, T positions, F SAE features, D d_model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from refusal_lab.circuits.baseline import BoundBaseline
from refusal_lab.circuits.batches import PromptBatch
from refusal_lab.circuits.spliced import FeatureEdit
from refusal_lab.sae.model import Sae

Nodes = dict[str, torch.Tensor]
"""hook -> LongTensor of SAE feature indices."""


class Mode(StrEnum):
    ablate = "ablate"  # the condition's features -> baseline
    keep = "keep"  # every other feature -> baseline (the condition's features are the kept circuit)
    steer = "steer"  # the condition's features += alpha (along unit decoder directions)


@dataclass
class Condition:
    """One intervention: a node set and what to do with it."""

    nodes: dict[str, torch.Tensor] = field(default_factory=dict)
    """hook -> feature indices (a hook left out has no nodes)."""
    mode: Mode = Mode.ablate
    alpha: float = 0.0
    """steer: added along each node's unit decoder direction."""
    ablate_errors: bool = False
    """Also set every error node to the baseline (the empty circuit)."""


CLEAN = Condition()
"""No edit: ablating the empty set."""


def repeat_batch(batch: PromptBatch, n: int) -> PromptBatch:
    """The batch stacked `n` times along the rows (condition r runs rows [r * B, (r + 1) * B))."""
    if n == 1:
        return batch
    fields = {k: v.repeat(n, *([1] * (v.ndim - 1))) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    return PromptBatch(**{**vars(batch), **fields, "index": batch.index * n})


def _tables(
    conditions: Sequence[Condition], hook: str, feats: torch.Tensor, saes: Mapping[str, Sae] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(replace bool [R, F], add [R, F] or None) of every condition at one hook."""
    n_feats = feats.shape[-1]
    replace = torch.zeros(len(conditions), n_feats, dtype=torch.bool)
    add = torch.zeros(len(conditions), n_feats, dtype=feats.dtype)
    for r, cond in enumerate(conditions):
        mask = torch.zeros(n_feats, dtype=torch.bool)
        idx = cond.nodes.get(hook)
        if idx is not None:
            mask[idx.long().cpu()] = True
        if cond.mode == Mode.ablate:
            replace[r] = mask
        elif cond.mode == Mode.keep:
            replace[r] = ~mask
        else:
            step = torch.full((n_feats,), cond.alpha, dtype=feats.dtype)
            if saes is not None:  # alpha along the unit direction, whatever the decoder row's norm
                step = step / saes[hook].W_dec.detach().norm(dim=-1).cpu().to(feats.dtype).clamp_min(1e-8)
            add[r] = torch.where(mask, step, torch.zeros_like(step))
    steered = any(c.mode == Mode.steer for c in conditions)
    return replace.to(feats.device), add.to(feats.device) if steered else None


def stacked_edit(
    conditions: Sequence[Condition], baseline: BoundBaseline | None = None, saes: Mapping[str, Sae] | None = None
) -> FeatureEdit:
    """One edit running condition r on rows [r * B, (r + 1) * B) of `repeat_batch(batch, len(conditions))`.

    `baseline` is bound to the un-repeated batch (needed unless every condition steers or is
    CLEAN). With `saes`, steering divides alpha by each decoder row's norm.
    """
    if not conditions:
        raise ValueError("stacked_edit: no conditions")
    n = len(conditions)
    errors = torch.tensor([c.ablate_errors for c in conditions])
    cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def edit(hook: str, feats_BTF: torch.Tensor, err_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, seq, n_feats = feats_BTF.shape
        if rows % n:
            raise ValueError(f"stacked_edit: {rows} rows is not a multiple of {n} conditions")
        if hook not in cache:
            cache[hook] = _tables(conditions, hook, feats_BTF, saes)
        replace_RF, add_RF = cache[hook]
        f_RBTF = feats_BTF.view(n, rows // n, seq, n_feats)
        need_base = bool(replace_RF.any()) or bool(errors.any())
        if need_base:
            if baseline is None:
                raise ValueError("stacked_edit: an ablating condition needs a baseline")
            base_f, base_e = baseline.values(hook, f_RBTF[0])
            f_RBTF = torch.where(replace_RF[:, None, None, :], base_f[None], f_RBTF)
            if bool(errors.any()):
                e_RBTD = err_BTD.view(n, rows // n, seq, -1)
                e_RBTD = torch.where(errors.to(err_BTD.device)[:, None, None, None], base_e[None], e_RBTD)
                err_BTD = e_RBTD.reshape(rows, seq, -1)
        if add_RF is not None:
            f_RBTF = f_RBTF + add_RF[:, None, None, :]
        return f_RBTF.reshape(rows, seq, n_feats), err_BTD

    return edit


def ablate(nodes: Mapping[str, torch.Tensor], baseline: BoundBaseline) -> FeatureEdit:
    """The chosen features take the baseline's value at every position; the rest and the error node stay."""
    return stacked_edit([Condition(dict(nodes), Mode.ablate)], baseline)


def ablate_complement(nodes: Mapping[str, torch.Tensor], baseline: BoundBaseline) -> FeatureEdit:
    """Every feature outside the circuit takes the baseline's value; the error nodes are kept."""
    return stacked_edit([Condition(dict(nodes), Mode.keep)], baseline)


def steer(nodes: Mapping[str, torch.Tensor], alpha: float, saes: Mapping[str, Sae] | None = None) -> FeatureEdit:
    """Adds alpha times each chosen feature's (unit) decoder direction at every position."""
    return stacked_edit([Condition(dict(nodes), Mode.steer, alpha)], saes=saes)
