"""Baselines for ablation and attribution: what a feature (or error node) is set to when it is "removed".

Reads and writes nothing. `mean_baseline` runs the spliced model over the CONTRAST prompts
and keeps, per hook point, feature means (float64 sums) taken per phase:

* prompt tokens pooled -> [F] (the user's text differs in length and content between prompts,
  so its positions are not comparable one by one);
* post-instruction template tokens aligned from the end -> [n_template, F] (the same template
  token sits at the same offset from the end of every prompt);
* the chat template's prefix (`<s>[INST]`, `n_prefix` tokens) aligned from the start -> [n_prefix, F].
  These tokens and their positions are identical in every prompt, so their activations are too
  (causal attention) and ablating them is a no-op, as it should be; pooling them with the user's
  text would instead move the BOS token, an attention sink with outlier activations, far off.
  (A deviation from "prompt tokens pooled" in issue 9, kept for that reason.)
* response tokens (teacher forced, or generated under an ablation): the pooled prompt mean.

The same is kept for the error node in d_model. `ZeroBaseline` is the zero-ablation alternative.
Edits read baselines through `BoundBaseline`, which knows the batch: a forward call as wide as
the batch gets per-position baselines; a one-token call (a decode step of generation) gets the
response baseline.

Shape letters: B batch, T positions, F SAE features, D d_model, G phase groups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from refusal_lab.circuits.batches import PromptBatch
from refusal_lab.circuits.spliced import forward_batch, spliced
from refusal_lab.sae.model import Sae
from refusal_lab.store import Phase


class Baseline(Protocol):
    """Per-position baseline values of a hook's features and error node."""

    def expand(
        self, hook: str, batch: PromptBatch, features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(feats [B, T, F or len(features)], err [B, T, D]) for every cell of `batch`."""
        ...

    def response(self, hook: str, features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(feats [F or len(features)], err [D]) for a response token."""
        ...


@dataclass
class HookMeans:
    """One hook's phase means; row 0 pooled prompt, then template (first to last), then prefix (position order)."""

    feats_GF: torch.Tensor
    err_GD: torch.Tensor
    n_template: int
    n_prefix: int
    counts_G: torch.Tensor
    """Tokens averaged into each row (0: the row fell back to the pooled prompt mean)."""


def group_index(batch: PromptBatch, n_template: int, n_prefix: int) -> torch.Tensor:
    """[B, T] row of HookMeans for each cell: 0 prompt/response/pad, 1.. template, 1+n_template.. prefix."""
    group = torch.zeros_like(batch.offset_from_end)
    offset = batch.offset_from_end
    template = (batch.phase == int(Phase.POST_INSTRUCTION)) & (offset < n_template)
    group = torch.where(template, 1 + (n_template - 1 - offset), group)
    prefix = (batch.phase == int(Phase.PROMPT)) & (batch.position_ids < n_prefix)
    return torch.where(prefix, 1 + n_template + batch.position_ids, group)


def template_width(batch: PromptBatch) -> int:
    """Post-instruction template tokens per prompt in `batch` (0 when it has none)."""
    offsets = batch.offset_from_end[batch.phase == int(Phase.POST_INSTRUCTION)]
    return int(offsets.max()) + 1 if offsets.numel() else 0


class MeanBaseline:
    """Contrast-set means per hook and phase (see the module docstring); build with `mean_baseline`."""

    def __init__(self, hooks: Mapping[str, HookMeans]) -> None:
        self.hooks = dict(hooks)

    def expand(
        self, hook: str, batch: PromptBatch, features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        means = self.hooks[hook]
        group = group_index(batch, means.n_template, means.n_prefix).to(means.feats_GF.device)
        table = means.feats_GF if features is None else means.feats_GF[:, features.to(means.feats_GF.device)]
        return table[group], means.err_GD[group]

    def response(self, hook: str, features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        means = self.hooks[hook]
        row = means.feats_GF[0]
        return (row if features is None else row[features.to(row.device)]), means.err_GD[0]

    def to(self, device: torch.device | str) -> MeanBaseline:
        return MeanBaseline(
            {
                h: HookMeans(m.feats_GF.to(device), m.err_GD.to(device), m.n_template, m.n_prefix, m.counts_G)
                for h, m in self.hooks.items()
            }
        )


class ZeroBaseline:
    """Zero-ablation: every feature and error node baseline is 0."""

    def __init__(self, saes: Mapping[str, Sae]) -> None:
        self.shapes = {h: (s.d_sae, s.d_in, s.W_dec.dtype, s.W_dec.device) for h, s in saes.items()}

    def expand(
        self, hook: str, batch: PromptBatch, features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        d_sae, d_in, dtype, device = self.shapes[hook]
        n = d_sae if features is None else int(features.numel())
        b, t = batch.size, batch.width
        return torch.zeros(b, t, n, dtype=dtype, device=device), torch.zeros(b, t, d_in, dtype=dtype, device=device)

    def response(self, hook: str, features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        d_sae, d_in, dtype, device = self.shapes[hook]
        n = d_sae if features is None else int(features.numel())
        return torch.zeros(n, dtype=dtype, device=device), torch.zeros(d_in, dtype=dtype, device=device)


def zero_baseline(saes: Mapping[str, Sae]) -> ZeroBaseline:
    return ZeroBaseline(saes)


class BoundBaseline:
    """A baseline bound to one batch, for edits that run during that batch's forward calls or generation.

    A call as wide as the batch (the full forward, or generation's prefill) gets per-position
    values; a one-token call (a decode step) gets the response baseline. Expanded tensors are
    cached per hook (full feature width) for the batch.
    """

    def __init__(self, baseline: Baseline, batch: PromptBatch) -> None:
        self.baseline = baseline
        self.batch = batch
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def values(
        self, hook: str, feats_BTF: torch.Tensor, features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Baseline (feats, err) broadcastable to a call's [B, T, .] tensors."""
        seq = feats_BTF.shape[1]
        if seq == self.batch.width:
            if features is not None:  # a few columns: cheap to expand each time
                f, e = self.baseline.expand(hook, self.batch, features)
                return f.to(feats_BTF.device, feats_BTF.dtype), e.to(feats_BTF.device, feats_BTF.dtype)
            if hook not in self._cache:
                f, e = self.baseline.expand(hook, self.batch)
                self._cache[hook] = (f.to(feats_BTF.device, feats_BTF.dtype), e.to(feats_BTF.device, feats_BTF.dtype))
            return self._cache[hook]
        if seq == 1:
            f, e = self.baseline.response(hook, features)
            return f.to(feats_BTF.device, feats_BTF.dtype)[None, None], e.to(feats_BTF.device, feats_BTF.dtype)[
                None, None
            ]
        raise ValueError(
            f"baseline for {hook}: a forward call of {seq} positions fits neither the batch ({self.batch.width}) "
            "nor a one-token decode step"
        )


@torch.no_grad()
def mean_baseline(
    model: nn.Module, saes: Mapping[str, Sae], batches: Sequence[PromptBatch], n_prefix: int = 1
) -> MeanBaseline:
    """Contrast means of every hook's features and error node, per phase, from spliced forwards (float64 sums)."""
    if not batches:
        raise ValueError("mean_baseline: no contrast batches")
    n_template = max(template_width(b) for b in batches)
    n_groups = 1 + n_template + n_prefix
    sums_f: dict[str, torch.Tensor] = {}
    sums_e: dict[str, torch.Tensor] = {}
    counts = torch.zeros(n_groups, dtype=torch.float64)
    for batch in batches:
        group = group_index(batch, n_template, n_prefix)
        # Pooled prompt mean from the user's text only; response and pad cells add nothing.
        keep = batch.phase >= 0
        keep &= batch.phase != int(Phase.GENERATED)
        with spliced(model, saes) as run:
            forward_batch(model, batch, logits_to_keep=1)
        g = group[keep].cpu()
        counts += torch.bincount(g, minlength=n_groups).double()
        for hook in saes:
            feats = run.feats[hook][keep.to(run.feats[hook].device)].double().cpu()
            err = run.errors[hook][keep.to(run.errors[hook].device)].double().cpu()
            if hook not in sums_f:
                sums_f[hook] = torch.zeros(n_groups, feats.shape[-1], dtype=torch.float64)
                sums_e[hook] = torch.zeros(n_groups, err.shape[-1], dtype=torch.float64)
            sums_f[hook].index_add_(0, g, feats)
            sums_e[hook].index_add_(0, g, err)
    if counts[0] == 0:
        raise ValueError("mean_baseline: the contrast batches have no prompt tokens")
    hooks = {}
    for hook, sae in saes.items():
        mean_f = sums_f[hook] / counts.clamp(min=1)[:, None]
        mean_e = sums_e[hook] / counts.clamp(min=1)[:, None]
        empty = (counts == 0)[:, None]
        mean_f = torch.where(empty, mean_f[0], mean_f)
        mean_e = torch.where(empty, mean_e[0], mean_e)
        dtype, device = sae.W_dec.dtype, sae.W_dec.device
        hooks[hook] = HookMeans(mean_f.to(device, dtype), mean_e.to(device, dtype), n_template, n_prefix, counts.long())
    return MeanBaseline(hooks)
