"""CE-loss recovered and KL when an SAE's reconstruction is spliced into the model at its hook point.

Reads: the store's token table (held-out samples' token ids, positions and phases) and the HF
model. Writes nothing.

    ce_recovered = (CE_zero - CE_sae) / (CE_zero - CE_orig)

CE_orig is the model's next-token loss on a held-out sequence; CE_sae the loss with the hook's
activations replaced by the SAE's reconstruction (residuals_N: the input of
model.model.layers[N], via a forward pre-hook; mlp_N / attention_N: the module's output, via a
forward hook; see refusal_lab.hooks); CE_zero with them replaced by zeros. KL(orig || spliced)
is averaged over the same positions. Replacement covers exactly the tokens the SAE was trained
and evaluated on (token filters, norm below the outlier threshold); the loss is taken at those
positions (predicting the next token), and with `sae.ce_targets: response` (the default) only
where the next token is a generated one: a chat model is judged by its own response, and prompt
text can be unpredictable to it. Sequences are rebuilt from tokens/token_id for samples
whose stored positions run 0..n-1 (inference.positions all or prompt); otherwise the metrics
are null with the reason.

Shape letters: B sequences, T positions, D d_model, V vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from refusal_lab.hooks import hooks_registered, module_for
from refusal_lab.layers import HookPoint
from refusal_lab.sae.config import CeTargets, TokenFilterConfig, TokenPhase
from refusal_lab.sae.data import PHASE_CODES, HookStats
from refusal_lab.sae.model import Sae

log = logging.getLogger(__name__)


@dataclass
class Sequences:
    """Full token sequences of held-out samples."""

    sample_ids: list[int]
    token_ids: list[np.ndarray]
    phases: list[np.ndarray]


def held_out_sequences(
    tokens: dict[str, np.ndarray], sample_ids: np.ndarray, max_samples: int
) -> tuple[Sequences | None, str | None]:
    """Rebuild up to `max_samples` held-out sequences, or (None, reason) when the store lacks full sequences."""
    if max_samples == 0:
        return None, "sae.ce_max_samples is 0"
    sid = np.asarray(tokens["sample_id"]).astype(np.int64)
    pos = np.asarray(tokens["position"]).astype(np.int64)
    order = np.lexsort((pos, sid))
    sorted_sid = sid[order]
    out = Sequences([], [], [])
    for s in sample_ids[:max_samples].tolist():
        lo, hi = np.searchsorted(sorted_sid, [s, s + 1])
        rows = order[lo:hi]
        if not np.array_equal(pos[rows], np.arange(hi - lo)):
            return None, (
                f"sample {s} holds positions {pos[rows][:6].tolist()}...: the store does not hold full token "
                "sequences (collected with inference.positions other than all or prompt)"
            )
        out.sample_ids.append(int(s))
        out.token_ids.append(np.asarray(tokens["token_id"])[rows].astype(np.int64))
        out.phases.append(np.asarray(tokens["phase"])[rows].astype(np.int64))
    if not out.sample_ids:
        return None, "no held-out sample has tokens"
    return out, None


def null_ce(reason: str) -> dict[str, Any]:
    return {"ce_recovered": None, "kl": None, "ce_reason": reason}


def _splice(sae: Sae, mask_BT: torch.Tensor, max_norm: float, zero: bool):
    def fn(acts_BTD: torch.Tensor) -> torch.Tensor:
        x = acts_BTD.float()
        keep = mask_BT & (x.norm(dim=-1) <= max_norm)
        new = torch.zeros_like(x) if zero else sae(x)
        return torch.where(keep[..., None], new, x).to(acts_BTD.dtype)

    return fn


def _next_token_loss(logits_BTV: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position CE of predicting targets (= ids[:, 1:]) and the log-probabilities ([B, T-1, V])."""
    logp = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    return -logp.gather(-1, targets[..., None]).squeeze(-1), logp


@torch.no_grad()
def ce_metrics(
    model: Any,
    sequences: Sequences,
    saes: dict[str, Sae],
    stats: dict[str, HookStats],
    filters: TokenFilterConfig,
    batch_size: int,
    targets: CeTargets = CeTargets.response,
) -> dict[str, dict[str, Any]]:
    """CE_orig, CE_sae, CE_zero, ce_recovered and KL for every hook in `saes`."""
    model.eval()
    device = model.get_input_embeddings().weight.device
    points = {hook: HookPoint.from_name(hook) for hook in saes}
    local = {h: saes[h].to(next(module_for(model, points[h]).parameters()).device) for h in saes}
    phases = torch.tensor([PHASE_CODES[p] for p in filters.phases], device=device)
    sums = {h: torch.zeros(3, dtype=torch.float64, device=device) for h in saes}  # ce_sae, ce_zero, kl
    ce_orig_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_pred = 0
    order = np.argsort([len(t) for t in sequences.token_ids], kind="stable")
    for start in range(0, len(order), batch_size):
        batch = [int(i) for i in order[start : start + batch_size]]
        width = max(len(sequences.token_ids[i]) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        phase = torch.full((len(batch), width), -1, dtype=torch.long)
        attn = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):  # right padding: positions line up with the stored ones
            n = len(sequences.token_ids[i])
            ids[row, :n] = torch.from_numpy(sequences.token_ids[i])
            phase[row, :n] = torch.from_numpy(sequences.phases[i])
            attn[row, :n] = 1
        ids, phase, attn = ids.to(device), phase.to(device), attn.to(device)
        mask = torch.isin(phase, phases) & attn.bool()
        if filters.drop_bos:
            mask[:, 0] = False
        pred = mask[:, :-1] & attn[:, 1:].bool()  # positions whose next token is scored
        if targets == CeTargets.response:
            pred &= phase[:, 1:] == PHASE_CODES[TokenPhase.generated]
        next_ids = ids[:, 1:]
        ce_orig, logp_orig = _next_token_loss(
            model(input_ids=ids, attention_mask=attn, use_cache=False).logits, next_ids
        )
        ce_orig_sum += ce_orig[pred].double().sum()
        n_pred += int(pred.sum())
        p_orig = logp_orig.exp()
        for hook, sae in local.items():
            max_norm = stats[hook].max_norm
            for zero in (False, True):
                fn = _splice(sae, mask.to(sae.b_dec.device), max_norm, zero)
                with hooks_registered(model, {points[hook]: fn}):
                    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                ce, logp = _next_token_loss(logits, next_ids)
                sums[hook][1 if zero else 0] += ce[pred].double().sum()
                if not zero:
                    kl = (p_orig * (logp_orig - logp)).sum(-1)
                    sums[hook][2] += kl[pred].double().sum()
    if n_pred == 0:
        why = "no held-out position passes the token filters"
        if targets == CeTargets.response:
            why += " and predicts a generated token (sae.ce_targets=response; the store has no responses?)"
        return {h: null_ce(why) for h in saes}
    ce_orig_mean = float(ce_orig_sum) / n_pred
    out = {}
    for hook in saes:
        ce_sae, ce_zero, kl = (float(v) / n_pred for v in sums[hook])
        gap = ce_zero - ce_orig_mean
        out[hook] = {
            "ce_recovered": (ce_zero - ce_sae) / gap if gap != 0 else None,
            "kl": kl,
            "ce_orig": ce_orig_mean,
            "ce_sae": ce_sae,
            "ce_zero": ce_zero,
            "ce_positions": n_pred,
            "ce_sequences": len(sequences.sample_ids),
            "ce_reason": None if gap != 0 else "zero-ablation does not change the loss",
        }
    return out
