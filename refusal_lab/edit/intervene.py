"""The edit as hooks: a writer projection exactly equivalent to the edited checkpoint, and the SAE clamp.

Reads and writes nothing.

* **Writer projection** (`projected`). Each selected feature i at hook h has a decoder direction
  d_i (a row of W_dec, in the residual stream's space). Let U_w be an orthonormal basis of the
  span of every selected direction whose hook the writer w writes into: the embedding writes into
  every hook, layer l's attention and MLP into residuals_N for N > l (and attention_l / mlp_l into
  themselves). The projection replaces w's output y by y - U_w U_w^T y. The embedding's output is
  the input of layers[0] (the `residuals_0` pre-hook, nothing writes before it); attention and MLP
  outputs are the `attention_l` / `mlp_l` hook points. Every writer is linear in its weight matrix
  (embedding rows, o_proj, down_proj; Llama and Mistral have no biases there), so the projection
  equals those matrices orthogonalised against U_w (refusal_lab.edit.weights): the checkpoint and
  these hooks give the same logits up to float rounding (tests/integration/test_edit.py).
* **SAE clamp** (`sae_clamped`). At each selected feature's hook, x <- x + (c - f_i(x)) d_i for the
  selected i (f = the SAE's encoder output, c = edit.clamp_value): the features are set to c and
  everything else, the SAE's error included, is kept. It acts only where a feature fires (the
  encoder is nonlinear), so it is *not* a weight edit; beside the projection it differs by the
  other features' and the error's components along the decoder directions.

Both are context managers over the model (usable around `model.generate`). `stacked` runs one
condition per block of rows for the evaluation (refusal_lab.circuits.behaviour's Interventions).

Shape letters: R conditions, B batch, T positions, D d_model, K basis size, F features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from refusal_lab.circuits.batches import PromptBatch
from refusal_lab.circuits.spliced import sae_device
from refusal_lab.hooks import HookFn, decoder_layers, hooks_registered
from refusal_lab.layers import HookPoint, Site
from refusal_lab.sae.model import Sae

Nodes = Mapping[str, Sequence[int]]
"""hook -> selected SAE feature indices."""
Bases = dict[HookPoint, torch.Tensor]
"""writer hook point (residuals_0 = the embedding, attention_l, mlp_l) -> orthonormal basis U [D, K]."""

EMBEDDING = HookPoint.from_name("residuals_0")
"""The embedding's output is the input of layers[0]: projecting there is projecting the embedding."""


def _order(point: HookPoint) -> float:
    """Position in the residual stream: writers and hooks interleave as embed < attn_0 < mlp_0 < residuals_1 ..."""
    if point.site == Site.RESIDUALS:
        return 2 * point.layer - 0.5
    return 2 * point.layer + (0 if point.site == Site.ATTENTION else 1)


def writers_of(hook: str, n_layers: int) -> list[HookPoint]:
    """The writers whose output reaches `hook`: the embedding, and every attention / MLP output at or before it."""
    at = _order(HookPoint.from_name(hook))
    out = [EMBEDDING]
    for layer in range(n_layers):
        for site in (Site.ATTENTION, Site.MLP):
            point = HookPoint(site, layer)
            if _order(point) <= at:
                out.append(point)
    return out


def orthonormal(directions_KD: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis [D, K'] of the rows' span (K' = their rank), in float64."""
    q, r = torch.linalg.qr(directions_KD.double().T)
    keep = r.diagonal().abs() > tol * max(1.0, float(r.diagonal().abs().max()))
    return q[:, keep]


def writer_bases(model: nn.Module, saes: Mapping[str, Sae], nodes: Nodes) -> Bases:
    """Every writer's basis: the span of the selected decoder directions of every hook it writes into."""
    n_layers = len(decoder_layers(model))
    rows: dict[HookPoint, list[torch.Tensor]] = {}
    for hook, feats in nodes.items():
        if not len(feats):
            continue
        w_dec = saes[hook].W_dec.detach()[torch.as_tensor(list(feats), dtype=torch.long)]
        for writer in writers_of(hook, n_layers):
            rows.setdefault(writer, []).append(w_dec.double().cpu())
    return {w: orthonormal(torch.cat(r)) for w, r in rows.items()}


def project_fn(basis_DK: torch.Tensor) -> HookFn:
    """y -> y - U U^T y (computed in the activation's dtype, as the edited matrices are used)."""

    def fn(y_BTD: torch.Tensor) -> torch.Tensor:
        u = basis_DK.to(y_BTD.device, y_BTD.dtype)
        return y_BTD - (y_BTD @ u) @ u.T

    return fn


def clamp_fn(sae: Sae, feats: Sequence[int], value: float) -> HookFn:
    """x -> x + (value - f_sel(x)) @ W_dec[sel]: the selected features set to `value`, the rest and the error kept."""
    idx = torch.as_tensor(list(feats), dtype=torch.long)

    def fn(x_BTD: torch.Tensor) -> torch.Tensor:
        x = x_BTD.to(sae.W_dec.dtype)
        f_sel = sae.encode(x)[..., idx.to(x.device)]
        delta = (value - f_sel) @ sae.W_dec[idx.to(x.device)]
        return (x + delta).to(x_BTD.dtype)

    return fn


def projection_fns(bases: Bases) -> dict[HookPoint, HookFn]:
    return {point: project_fn(u) for point, u in bases.items() if u.shape[1]}


def clamp_fns(model: nn.Module, saes: Mapping[str, Sae], nodes: Nodes, value: float) -> dict[HookPoint, HookFn]:
    fns = {}
    for hook, feats in nodes.items():
        if len(feats):
            saes[hook].to(sae_device(model, hook))
            fns[HookPoint.from_name(hook)] = clamp_fn(saes[hook], feats, value)
    return fns


def direction_fns(directions: Mapping[str, torch.Tensor]) -> dict[HookPoint, HookFn]:
    """The diff-in-means ablation as refusal_lab.circuits.direction defines it: r_h projected out at its own hook."""
    return {
        HookPoint.from_name(h): project_fn((r / r.norm()).double()[:, None])
        for h, r in directions.items()
        if float(r.norm()) > 0  # residuals_0's r is 0 on the organism: every last prompt token is the same token
    }


def projected(model: nn.Module, bases: Bases) -> AbstractContextManager:
    """The hook-based edit exactly equivalent to the orthogonalised checkpoint (see the module docstring)."""
    return hooks_registered(model, projection_fns(bases))


def sae_clamped(model: nn.Module, saes: Mapping[str, Sae], nodes: Nodes, value: float = 0.0) -> AbstractContextManager:
    """The SAE-feature clamp at the features' own hook points, for the block (e.g. around `model.generate`)."""
    return hooks_registered(model, clamp_fns(model, saes, nodes, value))


@dataclass
class Condition:
    """One row block of a stacked evaluation: hook functions (none = the unedited model)."""

    name: str
    fns: dict[HookPoint, HookFn]


def stacked(model: nn.Module, conditions: Sequence[Condition]):
    """Interventions (refusal_lab.circuits.behaviour) running condition r on rows [r * B, (r + 1) * B)."""

    def context(batch: PromptBatch, rng: range) -> AbstractContextManager:
        chosen = [conditions[i] for i in rng]
        points = {p for c in chosen for p in c.fns}

        def at(point: HookPoint) -> HookFn:
            def fn(x_BTD: torch.Tensor) -> torch.Tensor:
                blocks = list(x_BTD.chunk(len(chosen), dim=0))
                for r, cond in enumerate(chosen):
                    new = cond.fns[point](blocks[r]) if point in cond.fns else None
                    if new is not None:
                        blocks[r] = new
                return torch.cat(blocks, 0)

            return fn

        return hooks_registered(model, {p: at(p) for p in points})

    return context
