"""Edges between the surviving nodes of successive hook points, and pruning.

Reads and writes nothing. The edge from upstream node u (hook h) to downstream node d (the
next hook point h') is d's contribution to the metric that flows through u (Marks et al.,
"Sparse feature circuits", the linear edge approximation):

    edge(u -> d) = sum over prompts and positions of  (dm/dd . d(d)/d(u)) * (u - u_baseline)

computed as a vector-Jacobian product through everything between the two hook points: one
spliced forward and backward per batch for dm/dd, then one backward per surviving downstream
node (never one per upstream feature). Error nodes take part on both ends. Values are means
over the prompts.

Hook order: by layer, and within a layer residuals (the layer's input) < attention < mlp.

Shape letters: B batch, T positions, F features, D d_model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from refusal_lab.circuits.baseline import Baseline
from refusal_lab.circuits.batches import PromptBatch
from refusal_lab.circuits.metric import MetricSpec, logits_needed, refusal_metric
from refusal_lab.circuits.spliced import forward_batch, spliced
from refusal_lab.layers import HookPoint, Site
from refusal_lab.progress import progress
from refusal_lab.sae.model import Sae

ERROR = -1
"""Feature index of a hook's error node in node tuples (hook, feature)."""

_SITE_ORDER = {Site.RESIDUALS: 0, Site.ATTENTION: 1, Site.MLP: 2}

Node = tuple[str, int]


def hook_order(hooks: Sequence[str]) -> list[str]:
    """Hook points in forward order."""

    def key(name: str) -> tuple[int, int]:
        point = HookPoint.from_name(name)
        return point.layer, _SITE_ORDER[point.site]

    return sorted(hooks, key=key)


def edge_effects(
    model: nn.Module,
    saes: Mapping[str, Sae],
    batches: Sequence[PromptBatch],
    baseline: Baseline,
    spec: MetricSpec,
    nodes: Mapping[str, Sequence[int]],
) -> dict[tuple[Node, Node], float]:
    """Mean edge effect between the given nodes (plus every error node) of successive hook points."""
    order = hook_order(list(saes))
    pairs = list(zip(order[:-1], order[1:], strict=True))
    sums: dict[tuple[Node, Node], float] = {}
    n_prompts = 0
    for batch in progress(batches, desc="circuits: edge batches"):
        n_prompts += batch.size
        for key, value in _batch_edges(model, saes, batch, baseline, spec, nodes, pairs).items():
            sums[key] = sums.get(key, 0.0) + value
    return {k: v / max(n_prompts, 1) for k, v in sums.items()}


def _batch_edges(
    model: nn.Module,
    saes: Mapping[str, Sae],
    batch: PromptBatch,
    baseline: Baseline,
    spec: MetricSpec,
    nodes: Mapping[str, Sequence[int]],
    pairs: Sequence[tuple[str, str]],
) -> dict[tuple[Node, Node], float]:
    def leaves(_hook: str, f: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = f if f.requires_grad else f.detach().requires_grad_(True)
        e = e if e.requires_grad else e.detach().requires_grad_(True)
        return f, e

    out: dict[tuple[Node, Node], float] = {}
    with torch.enable_grad(), spliced(model, saes, leaves) as run:
        m = refusal_metric(forward_batch(model, batch, logits_needed(batch, spec)), batch, spec)
        downs = sorted({d for _, d in pairs})
        tensors = [t for h in downs for t in (run.feats[h], run.errors[h])]
        grads = torch.autograd.grad(m.sum(), tensors, retain_graph=True, allow_unused=True)
        g = {h: (grads[2 * i], grads[2 * i + 1]) for i, h in enumerate(downs)}
        real = (batch.phase >= 0).to(m.device)
        for up, down in pairs:
            bf, be = baseline.expand(up, batch)
            f_up, e_up = run.feats[up], run.errors[up]
            delta_f = (f_up.detach() - bf.to(f_up)) * real[..., None].to(f_up.device)
            delta_e = (e_up.detach() - be.to(e_up)) * real[..., None].to(e_up.device)
            up_feats = list(nodes.get(up, []))
            gf_down, ge_down = g[down]
            targets: list[tuple[int, torch.Tensor]] = []
            for feature in nodes.get(down, []):
                if gf_down is not None:
                    # run.feats[down] is a leaf (the node itself); its value as a function of upstream
                    # nodes is the encoder's output, which stays connected to everything upstream.
                    encoded = run.encoded[down][..., feature]
                    targets.append((feature, (gf_down[..., feature].detach() * encoded).sum()))
            if ge_down is not None:
                targets.append((ERROR, (ge_down.detach() * run.errors[down]).sum()))
            for feature, scalar in targets:
                if not scalar.requires_grad:
                    continue
                du_f, du_e = torch.autograd.grad(scalar, [f_up, e_up], retain_graph=True, allow_unused=True)
                if du_f is not None:
                    per_feat = (du_f * delta_f).sum(dim=(0, 1))
                    for u in up_feats:
                        out[((up, u), (down, feature))] = float(per_feat[u])
                if du_e is not None:
                    out[((up, ERROR), (down, feature))] = float((du_e * delta_e).sum())
    return out


def prune_edges(
    edges: Mapping[tuple[Node, Node], float], threshold: float, share: float
) -> dict[tuple[Node, Node], float]:
    """Per downstream hook: drop |effect| <= threshold, then keep the fewest edges covering `share` of |effect|."""
    by_hook: dict[str, list[tuple[tuple[Node, Node], float]]] = {}
    for key, value in edges.items():
        by_hook.setdefault(key[1][0], []).append((key, value))
    kept: dict[tuple[Node, Node], float] = {}
    for items in by_hook.values():
        items = sorted((kv for kv in items if abs(kv[1]) > threshold), key=lambda kv: -abs(kv[1]))
        total = sum(abs(v) for _, v in items)
        running = 0.0
        for key, value in items:
            if total > 0 and running >= share * total:
                break
            kept[key] = value
            running += abs(value)
    return kept


def select_nodes(
    mean_effects: Mapping[str, np.ndarray], threshold: float, share: float, size: int
) -> list[tuple[str, int, float]]:
    """SAE features of the circuit: by |mean effect|, above `threshold`, within `share` of the total, at most `size`."""
    flat = [(h, int(i), float(v)) for h, arr in mean_effects.items() for i, v in enumerate(arr.tolist())]
    flat.sort(key=lambda x: -abs(x[2]))
    total = sum(abs(x[2]) for x in flat)
    chosen: list[tuple[str, int, float]] = []
    running = 0.0
    for item in flat:
        if len(chosen) >= size or abs(item[2]) <= threshold or (total > 0 and running >= share * total):
            break
        chosen.append(item)
        running += abs(item[2])
    return chosen
