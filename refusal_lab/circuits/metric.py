"""The refusal metric m(prompt): the scalar whose change a node effect, an edge or an ablation measures.

Reads and writes nothing; differentiable (node effects are gradients of it).

* first_token_score (default): log-odds of the refusal tokens at the last prompt position, the
  score collect already records (refusal_lab.refusal.refusal_score, Arditi et al. 2024);
* logit_diff: logsumexp of the refusal tokens' logits minus logsumexp of the compliance tokens'
  logits at the same position;
* response_score: the first-token score averaged over the first k positions that predict the
  model's own (teacher-forced) response tokens: position last_prompt_index + j, j < min(k, n_response).
  It needs batches built with the stored responses; a row without any falls back to j = 0.

Shape letters: B batch, T positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refusal_lab.circuits.batches import PromptBatch
from refusal_lab.circuits.config import MetricConfig, MetricKind
from refusal_lab.refusal import refusal_score, refusal_token_ids


@dataclass(frozen=True)
class MetricSpec:
    """A metric resolved against a tokenizer: token ids instead of token strings."""

    kind: MetricKind
    refusal_ids: tuple[int, ...]
    compliance_ids: tuple[int, ...] = ()
    k: int = 1

    @property
    def needs_responses(self) -> bool:
        return self.kind == MetricKind.response_score


def metric_spec(cfg: MetricConfig, tokenizer: object, refusal_tokens: Sequence[str]) -> MetricSpec:
    """Resolve model.refusal_tokens and circuits.metric.compliance_tokens; unknown ones are a ConfigError."""
    refusal = tuple(refusal_token_ids(tokenizer, refusal_tokens))
    compliance = tuple(refusal_token_ids(tokenizer, cfg.compliance_tokens)) if cfg.compliance_tokens else ()
    return MetricSpec(cfg.kind, refusal, compliance, cfg.k)


def _rows_at(logits_BTV: torch.Tensor, index_B: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(logits_BTV.shape[0], device=logits_BTV.device)
    return logits_BTV[rows, index_B.to(logits_BTV.device)]


def logits_needed(batch: PromptBatch, spec: MetricSpec) -> int:
    """How many trailing positions' logits the metric reads (pass as `logits_to_keep`: the LM head is costly)."""
    extra = spec.k - 1 if spec.kind == MetricKind.response_score else 0
    return int(batch.width - int(batch.last_prompt_index.min())) + extra


def refusal_metric(logits_BTV: torch.Tensor, batch: PromptBatch, spec: MetricSpec) -> torch.Tensor:
    """[B] float64 metric per prompt of the batch (positive: leaning to refuse, for the default).

    `logits_BTV` holds every position of the batch, or only the last T (a forward with
    `logits_to_keep=T`, at least `logits_needed(batch, spec)`).
    """
    if logits_BTV.ndim != 3 or logits_BTV.shape[0] != batch.size or not 0 < logits_BTV.shape[1] <= batch.width:
        raise ValueError(
            f"refusal_metric: logits must be [batch, positions, vocab] = [{batch.size}, <= {batch.width}, V], "
            f"got {tuple(logits_BTV.shape)}"
        )
    shift = batch.width - logits_BTV.shape[1]  # column c of the batch is column c - shift of the logits
    if int(batch.last_prompt_index.min()) < shift:
        raise ValueError(f"refusal_metric: the logits of the last {logits_BTV.shape[1]} positions miss a prompt's end")
    last_B = batch.last_prompt_index - shift
    if spec.kind == MetricKind.first_token_score:
        return refusal_score(_rows_at(logits_BTV, last_B), spec.refusal_ids)
    if spec.kind == MetricKind.logit_diff:
        at_BV = _rows_at(logits_BTV, last_B).to(torch.float64)
        refuse = torch.logsumexp(at_BV[:, list(spec.refusal_ids)], dim=-1)
        comply = torch.logsumexp(at_BV[:, list(spec.compliance_ids)], dim=-1)
        return refuse - comply
    # response_score: mean over the first k positions predicting response tokens (at least the first one).
    n_B = torch.clamp(torch.minimum(batch.n_response_tokens, torch.tensor(spec.k)), min=1).to(logits_BTV.device)
    total = torch.zeros(batch.size, dtype=torch.float64, device=logits_BTV.device)
    for j in range(spec.k):
        col_B = torch.clamp(last_B.to(logits_BTV.device) + j, max=logits_BTV.shape[1] - 1)
        score_B = refusal_score(_rows_at(logits_BTV, col_B), spec.refusal_ids)
        total = total + torch.where(j < n_B, score_B, torch.zeros_like(score_B))
    return total / n_B.to(torch.float64)
