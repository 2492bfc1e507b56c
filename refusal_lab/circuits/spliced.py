"""The model with SAEs spliced in at hook points: activations become SAE features plus an error node.

Reads and writes nothing. At each hook point h (same semantics as refusal_lab.hooks:
residuals_N = input of layers[N] via a pre-hook, mlp_N / attention_N = the module's output):

    f = sae.encode(x);  err = x - sae.decode(f);  f2, err2 = edit(h, f, err);  x' = sae.decode(f2) + err2

With no edit x' = x up to float rounding, whatever the SAE's quality: the error node carries
everything the SAE misses, so interventions on features are exact interventions on the model
(Marks et al., "Sparse feature circuits"). Gradients: d m / d f is the feature node's own effect
(f enters x' only through the decoder), d m / d err is the activation's gradient, and the
gradient reaching the upstream model is the unspliced model's (see `_splice_fn`); `encoded`
keeps the encoder output connected upstream for edges. The SAE runs in its own dtype (float32 for the
shipped ones); x' is cast back to the model's dtype.

Shape letters: B batch, T positions of one forward call, F SAE features, D d_model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from refusal_lab.circuits.batches import PromptBatch
from refusal_lab.hooks import HookFn, hooks_registered, module_for
from refusal_lab.layers import HookPoint
from refusal_lab.sae.model import Sae

FeatureEdit = Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(hook, feats_BTF, err_BTD) -> (feats_BTF, err_BTD) used to rebuild the activation."""


@dataclass
class SplicedRun:
    """What the spliced hooks used in the latest forward call (after the edit)."""

    feats: dict[str, torch.Tensor] = field(default_factory=dict)
    """hook -> [B, T, F] after the edit; with grad enabled the pre-edit features are a leaf, so
    d(metric)/d(feats) is the feature node's direct effect (Marks et al.)."""
    errors: dict[str, torch.Tensor] = field(default_factory=dict)
    """hook -> [B, T, D], the error node (its gradient flows on to the upstream model)."""
    encoded: dict[str, torch.Tensor] = field(default_factory=dict)
    """hook -> [B, T, F], the encoder's output before the edit, connected to everything upstream
    (for edges: d encoded[down] / d feats[up] through the blocks between two hook points)."""


def sae_device(model: nn.Module, hook: str) -> torch.device:
    """The device of the module a hook point reads (where its SAE must live)."""
    return next(module_for(model, HookPoint.from_name(hook)).parameters()).device


def _splice_fn(hook: str, sae: Sae, edit: FeatureEdit | None, run: SplicedRun, record: bool) -> HookFn:
    dtype = sae.W_dec.dtype

    def fn(x_BTD: torch.Tensor) -> torch.Tensor:
        x = x_BTD.to(dtype)
        encoded = sae.encode(x)
        # Gradients as Marks et al. take them: the features are a node of their own (a leaf whose
        # gradient is the direct path through the decoder), the error node carries no gradient back
        # into them, and the activation's gradient passes to the upstream model unchanged (x' = x
        # in value, dx'/dx = I through the error node). Without the detach the feature gradient
        # would cancel exactly (x' = decode(f) + x - decode(f)).
        feats = encoded.detach()
        if torch.is_grad_enabled():
            feats.requires_grad_(True)
        err = x - sae.decode(feats).detach()
        if edit is not None:
            feats, err = edit(hook, feats, err)
        if record:
            run.feats[hook] = feats
            run.errors[hook] = err
            run.encoded[hook] = encoded
        return (sae.decode(feats) + err).to(x_BTD.dtype)

    return fn


@contextmanager
def spliced(
    model: nn.Module, saes: Mapping[str, Sae], edit: FeatureEdit | None = None, record: bool = True
) -> Iterator[SplicedRun]:
    """Splice `saes` (hook name -> SAE) into `model` for the block; hooks are always removed.

    Each SAE is moved (in place) to its hook's device. `record=False` keeps nothing (generation
    under an edit does not need the feature tensors of every decode step).
    """
    run = SplicedRun()
    fns: dict[HookPoint, HookFn] = {}
    for hook, sae in saes.items():
        sae.to(sae_device(model, hook))
        fns[HookPoint.from_name(hook)] = _splice_fn(hook, sae, edit, run, record)
    with hooks_registered(model, fns):
        yield run


def forward_batch(model: nn.Module, batch: PromptBatch, logits_to_keep: int = 0) -> torch.Tensor:
    """Logits [B, T or logits_to_keep, V] of one batch (positions count real tokens, as in generation)."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=logits_to_keep,
    )
    return out.logits
