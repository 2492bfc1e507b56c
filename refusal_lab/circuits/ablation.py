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

Many conditions in one forward: `condition_edit` takes one node set per condition and a
batch repeated once per condition (`repeat_batch`): rows [r * B, (r + 1) * B) run condition r.
So a faithfulness curve, the random sets and the circuit cost one forward per batch, never one
per feature or per set (issue 9 item 13).

Shape letters: R conditions, B batch, T positions, F SAE features, D d_model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import torch

from refusal_lab.circuits.baseline import BoundBaseline
from refusal_lab.circuits.batches import PromptBatch
from refusal_lab.circuits.spliced import FeatureEdit
from refusal_lab.sae.model import Sae

Nodes = dict[str, torch.Tensor]
"""hook -> LongTensor of SAE feature indices."""


class Mode(StrEnum):
    ablate = "ablate"  # masked features -> baseline
    keep = "keep"  # unmasked features -> baseline (the masked ones are the kept circuit)
    steer = "steer"  # masked features += alpha


@dataclass
class Conditions:
    """R conditions, one node set each (a hook missing from a set has no nodes in that condition)."""

    node_sets: list[dict[str, torch.Tensor]]
    ablate_errors: torch.Tensor | None = None
    """bool [R]: also set the error node to the baseline in these conditions (the empty circuit)."""

    @property
    def n(self) -> int:
        return len(self.node_sets)

    def mask(self, hook: str, n_feats: int) -> torch.Tensor:
        """bool [R, F]: True on each condition's features at `hook`."""
        out = torch.zeros(self.n, n_feats, dtype=torch.bool)
        for r, nodes in enumerate(self.node_sets):
            idx = nodes.get(hook)
            if idx is not None:
                out[r, idx.long().cpu()] = True
        return out


def repeat_batch(batch: PromptBatch, n: int) -> PromptBatch:
    """The batch stacked `n` times along the rows (condition r runs rows [r * B, (r + 1) * B))."""
    if n == 1:
        return batch
    fields = {k: v.repeat(n, *([1] * (v.ndim - 1))) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    return PromptBatch(**{**vars(batch), **fields, "index": batch.index * n})


def condition_edit(
    conditions: Conditions,
    mode: Mode,
    baseline: BoundBaseline | None = None,
    alpha: float = 0.0,
    saes: Mapping[str, Sae] | None = None,
) -> FeatureEdit:
    """An edit for `repeat_batch(batch, conditions.n)`, with `baseline` bound to the un-repeated batch.

    Steering with `saes` given adds alpha times the *unit* decoder direction (alpha / |W_dec[i]| to
    the feature); without, alpha to the feature (the same for unit-norm decoders).
    """
    if mode != Mode.steer and baseline is None:
        raise ValueError(f"condition_edit: mode {mode} needs a baseline")
    cache: dict[str, torch.Tensor] = {}

    def mask_for(hook: str, feats: torch.Tensor) -> torch.Tensor:
        if hook not in cache:
            mask = conditions.mask(hook, feats.shape[-1]).to(feats.device)
            if mode == Mode.steer:
                step = torch.full((feats.shape[-1],), alpha, dtype=feats.dtype, device=feats.device)
                if saes is not None:
                    step = step / saes[hook].W_dec.detach().norm(dim=-1).to(feats.device, feats.dtype).clamp_min(1e-8)
                cache[hook] = mask.to(feats.dtype) * step
            else:
                cache[hook] = mask
        return cache[hook]

    def edit(hook: str, feats_BTF: torch.Tensor, err_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, seq, n_feats = feats_BTF.shape
        r = conditions.n
        if rows % r:
            raise ValueError(f"condition_edit: {rows} rows is not a multiple of {r} conditions")
        mask_R11F = mask_for(hook, feats_BTF)[:, None, None, :]
        f_RBTF = feats_BTF.view(r, rows // r, seq, n_feats)
        if mode == Mode.steer:
            return (f_RBTF + mask_R11F).view(rows, seq, n_feats), err_BTD
        assert baseline is not None
        base_f, base_e = baseline.values(hook, f_RBTF[0])
        replace = mask_R11F if mode == Mode.ablate else ~mask_R11F
        out = torch.where(replace, base_f[None], f_RBTF).view(rows, seq, n_feats)
        if conditions.ablate_errors is not None and bool(conditions.ablate_errors.any()):
            errs = conditions.ablate_errors.to(err_BTD.device)[:, None, None, None]
            e_RBTD = err_BTD.view(r, rows // r, seq, -1)
            err_BTD = torch.where(errs, base_e[None], e_RBTD).view(rows, seq, -1)
        return out, err_BTD

    return edit


def _single(nodes: Mapping[str, torch.Tensor]) -> Conditions:
    return Conditions([dict(nodes)])


def ablate(nodes: Mapping[str, torch.Tensor], baseline: BoundBaseline) -> FeatureEdit:
    """The chosen features take the baseline's value at every position; the rest and the error node stay."""
    return condition_edit(_single(nodes), Mode.ablate, baseline)


def ablate_complement(nodes: Mapping[str, torch.Tensor], baseline: BoundBaseline) -> FeatureEdit:
    """Every feature outside the circuit takes the baseline's value; the error nodes are kept."""
    return condition_edit(_single(nodes), Mode.keep, baseline)


def steer(nodes: Mapping[str, torch.Tensor], alpha: float, saes: Mapping[str, Sae] | None = None) -> FeatureEdit:
    """Adds alpha times each chosen feature's (unit) decoder direction at every position."""
    return condition_edit(_single(nodes), Mode.steer, alpha=alpha, saes=saes)
