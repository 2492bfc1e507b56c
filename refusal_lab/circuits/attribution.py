"""Node effects: how much each SAE feature and each error node moves the refusal metric, per prompt and position.

Reads and writes nothing. With the SAEs spliced in (refusal_lab.circuits.spliced) the model
runs on `decode(f) + err` at every hook point, so the metric m is a differentiable function of
every feature f and error node err. A node's effect is the estimated change of m when the
node goes from its baseline value (contrast mean per phase, or zero) to its actual value,
summed over positions: positive effect = the node raises the refusal metric.

* attribution patching (one forward + one backward per batch): grad m at the actual
  activations times (actual - baseline);
* integrated gradients (`steps` forward + backward per batch): the gradient averaged over
  `steps` midpoints alpha = (k + 1/2) / steps of the straight path from baseline to actual,
  times (actual - baseline). All hook points move along the path together: at each hook the
  value used is the interpolation, with a straight-through gradient (value replaced, gradient
  passed to the naturally computed activation), so a hook's gradient is the total derivative
  through every later hook. This keeps the cost at `steps` passes for all hook points together
  (issue 9 item 13) instead of steps x hooks; tests/unit/test_circuits_attribution.py checks
  the estimates against exact single-feature ablations.

Shape letters: N prompts, B batch, T positions, F SAE features, D d_model, K kept activations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from refusal_lab.circuits.baseline import Baseline
from refusal_lab.circuits.batches import PromptBatch
from refusal_lab.circuits.config import Method
from refusal_lab.circuits.metric import MetricSpec, logits_needed, refusal_metric
from refusal_lab.circuits.spliced import forward_batch, spliced
from refusal_lab.progress import progress
from refusal_lab.sae.model import Sae

TOP_ACTS = 16
"""Largest activations kept per feature for `top_tokens` (deduplicated by text afterwards)."""


@dataclass
class TopActivations:
    """Per feature, the K largest activations over the set's prompt and template tokens."""

    values_KF: torch.Tensor
    token_KF: torch.Tensor
    phase_KF: torch.Tensor

    def merge(self, values_KF: torch.Tensor, token_KF: torch.Tensor, phase_KF: torch.Tensor) -> TopActivations:
        vals = torch.cat([self.values_KF, values_KF])
        keep = vals.topk(min(TOP_ACTS, vals.shape[0]), dim=0).indices
        return TopActivations(
            vals.gather(0, keep),
            torch.cat([self.token_KF, token_KF]).gather(0, keep),
            torch.cat([self.phase_KF, phase_KF]).gather(0, keep),
        )


@dataclass
class NodeEffects:
    """Effects of every node over a list of prompts (row i = prompt i of the caller's list)."""

    hooks: list[str]
    feats: dict[str, np.ndarray]
    """hook -> [N, F] float32: effect summed over the prompt's positions."""
    errors: dict[str, np.ndarray]
    """hook -> [N] float32: the error node's effect summed over positions."""
    pos_feats: dict[str, list[np.ndarray]]
    """hook -> per prompt [T_i]: all features' effect at each real position (for top_prompt_tokens)."""
    pos_errors: dict[str, list[np.ndarray]]
    """hook -> per prompt [T_i]: the error node's effect at each real position."""
    token_ids: list[np.ndarray]
    """Per prompt [T_i]: the token ids of its real positions."""
    phases: list[np.ndarray]
    """Per prompt [T_i]: their phases (0 prompt, 1 template, 2 response)."""
    metric: np.ndarray
    """[N] float64: the metric with the SAEs spliced in and nothing edited."""
    top: dict[str, TopActivations] = field(default_factory=dict)
    """hook -> the features' largest activations (on CPU)."""

    def mean_feats(self, hook: str) -> np.ndarray:
        """[F] mean effect over the prompts."""
        return self.feats[hook].mean(axis=0)

    def subset(self, rows: Sequence[int], top: dict[str, TopActivations]) -> NodeEffects:
        """The effects of some of the prompts (a category of a pooled set), with their own top activations."""
        rows = list(rows)
        return NodeEffects(
            self.hooks,
            {h: v[rows] for h, v in self.feats.items()},
            {h: v[rows] for h, v in self.errors.items()},
            {h: [v[r] for r in rows] for h, v in self.pos_feats.items()},
            {h: [v[r] for r in rows] for h, v in self.pos_errors.items()},
            [self.token_ids[r] for r in rows],
            [self.phases[r] for r in rows],
            self.metric[rows],
            top,
        )


def _real(batch: PromptBatch) -> torch.Tensor:
    return batch.phase >= 0


def node_effects(
    model: nn.Module,
    saes: Mapping[str, Sae],
    batches: Sequence[PromptBatch],
    baseline: Baseline,
    spec: MetricSpec,
    method: Method,
    steps: int = 1,
) -> NodeEffects:
    """Node effects for the prompts of `batches` (rows placed by `PromptBatch.index`)."""
    hooks = list(saes)
    n = sum(b.size for b in batches)
    feats = {h: np.zeros((n, saes[h].d_sae), np.float32) for h in hooks}
    errors = {h: np.zeros(n, np.float32) for h in hooks}
    pos_feats: dict[str, list[np.ndarray]] = {h: [np.zeros(0, np.float32)] * n for h in hooks}
    pos_errors: dict[str, list[np.ndarray]] = {h: [np.zeros(0, np.float32)] * n for h in hooks}
    token_ids: list[np.ndarray] = [np.zeros(0, np.int64)] * n
    phases: list[np.ndarray] = [np.zeros(0, np.int8)] * n
    metric = np.zeros(n, np.float64)
    top: dict[str, TopActivations] = {}
    alphas = [1.0] if method == Method.attribution_patching else [(k + 0.5) / steps for k in range(steps)]
    for batch in progress(batches, desc="circuits: attribution batches"):
        real_BT = _real(batch)
        with torch.no_grad(), spliced(model, saes) as run:
            m_clean = refusal_metric(forward_batch(model, batch, logits_needed(batch, spec)), batch, spec)
            clean = {h: (run.feats[h].detach(), run.errors[h].detach()) for h in hooks}
        base = {h: baseline.expand(h, batch) for h in hooks}
        grad_f = {h: torch.zeros_like(clean[h][0]) for h in hooks}
        grad_e = {h: torch.zeros_like(clean[h][1]) for h in hooks}
        for alpha in alphas:
            for h, (gf, ge) in _gradients(model, saes, batch, spec, clean, base, alpha).items():
                grad_f[h] += gf / len(alphas)
                grad_e[h] += ge / len(alphas)
        rows = batch.index
        mask = real_BT.to(next(iter(clean.values()))[0].device)
        for h in hooks:
            cf, ce = clean[h]
            bf, be = base[h]
            eff_f_BTF = grad_f[h] * (cf - bf.to(cf)) * mask[..., None]
            eff_e_BT = (grad_e[h] * (ce - be.to(ce))).sum(-1) * mask
            feats[h][rows] = eff_f_BTF.sum(1).float().cpu().numpy()
            errors[h][rows] = eff_e_BT.sum(1).float().cpu().numpy()
            per_pos = eff_f_BTF.sum(-1).float().cpu().numpy()
            per_err = eff_e_BT.float().cpu().numpy()
            for b, row in enumerate(rows):
                keep = real_BT[b].cpu().numpy()
                pos_feats[h][row] = per_pos[b][keep]
                pos_errors[h][row] = per_err[b][keep]
            top[h] = _top_activations(top.get(h), cf, batch)
        for b, row in enumerate(rows):
            keep = real_BT[b].cpu()
            token_ids[row] = batch.input_ids[b].cpu()[keep].numpy()
            phases[row] = batch.phase[b].cpu()[keep].numpy()
        metric[rows] = m_clean.double().cpu().numpy()
    return NodeEffects(hooks, feats, errors, pos_feats, pos_errors, token_ids, phases, metric, top)


def _gradients(
    model: nn.Module,
    saes: Mapping[str, Sae],
    batch: PromptBatch,
    spec: MetricSpec,
    clean: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    base: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """d(sum of the batch's metric) / d(features, error) at every hook, at path point alpha (1 = actual)."""

    def edit(hook: str, f: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The first hook's activations hang off frozen weights: make them leaves that take a gradient.
        f = f if f.requires_grad else f.detach().requires_grad_(True)
        e = e if e.requires_grad else e.detach().requires_grad_(True)
        if alpha == 1.0:
            return f, e
        cf, ce = clean[hook]
        bf, be = base[hook]
        tf = bf.to(cf) + alpha * (cf - bf.to(cf))
        te = be.to(ce) + alpha * (ce - be.to(ce))
        # Straight through: the value is the path point, the gradient reaches the natural activation.
        return f + (tf - f).detach(), e + (te - e).detach()

    with torch.enable_grad(), spliced(model, saes, edit) as run:
        m = refusal_metric(forward_batch(model, batch, logits_needed(batch, spec)), batch, spec)
        inputs = [t for h in saes for t in (run.feats[h], run.errors[h])]
        grads = torch.autograd.grad(m.sum(), inputs, allow_unused=True)
    out = {}
    for i, h in enumerate(saes):
        gf, ge = grads[2 * i], grads[2 * i + 1]
        out[h] = (
            torch.zeros_like(run.feats[h]) if gf is None else gf.detach(),
            torch.zeros_like(run.errors[h]) if ge is None else ge.detach(),
        )
    return out


def _top_activations(prev: TopActivations | None, feats_BTF: torch.Tensor, batch: PromptBatch) -> TopActivations:
    prompt = (batch.phase == 0) | (batch.phase == 1)
    flat = torch.where(prompt.to(feats_BTF.device)[..., None], feats_BTF, torch.zeros_like(feats_BTF))
    flat = flat.reshape(-1, feats_BTF.shape[-1])
    k = min(TOP_ACTS, flat.shape[0])
    vals, idx = flat.topk(k, dim=0)
    tokens = batch.input_ids.reshape(-1).to(idx.device)[idx]
    phase = batch.phase.reshape(-1).to(idx.device)[idx]
    cur = TopActivations(vals.float().cpu(), tokens.cpu(), phase.cpu())
    return cur if prev is None else prev.merge(cur.values_KF, cur.token_KF, cur.phase_KF)


@torch.no_grad()
def top_activations(
    model: nn.Module, saes: Mapping[str, Sae], batches: Sequence[PromptBatch]
) -> dict[str, TopActivations]:
    """Every feature's largest activations over the prompts of `batches` (one forward per batch)."""
    top: dict[str, TopActivations] = {}
    for batch in batches:
        with spliced(model, saes) as run:
            forward_batch(model, batch, logits_to_keep=1)
        for h in saes:
            top[h] = _top_activations(top.get(h), run.feats[h], batch)
    return top


@torch.no_grad()
def exact_effects(
    model: nn.Module,
    saes: Mapping[str, Sae],
    batch: PromptBatch,
    baseline: Baseline,
    spec: MetricSpec,
    nodes: Sequence[tuple[str, int]],
) -> np.ndarray:
    """[len(nodes), B] m(actual) - m(feature set to its baseline at every position): one forward per node.

    The ground truth the estimates are tested against (too slow for the stage itself).
    """
    with spliced(model, saes):
        m_clean = refusal_metric(forward_batch(model, batch, logits_needed(batch, spec)), batch, spec)
    out = np.zeros((len(nodes), batch.size))
    for i, (hook, feature) in enumerate(nodes):

        def edit(h: str, f: torch.Tensor, e: torch.Tensor, hook: str = hook, feature: int = feature):
            if h != hook:
                return f, e
            bf, _ = baseline.expand(h, batch)
            f = f.clone()
            f[..., feature] = bf.to(f)[..., feature]
            return f, e

        with spliced(model, saes, edit):
            m = refusal_metric(forward_batch(model, batch, logits_needed(batch, spec)), batch, spec)
        out[i] = (m_clean - m).cpu().numpy()
    return out
