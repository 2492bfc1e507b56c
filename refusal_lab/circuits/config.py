"""Schema of the `circuits` config group (owned by the circuits stage).

Imported by `refusal_lab.config` while that module is still loading, so nothing here may
import `refusal_lab.config` at module level (hence `contrast_data: Any`, checked in the stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from refusal_lab.errors import ConfigError

ALGORITHM_VERSION = 4
# 4: categories take their pooled set's size, edges among the top edge_nodes; 3: circuit size by a faithfulness
# target; 2: feature -> feature edges through the encoder
"""Bump whenever the circuits stage's output changes for the same config and inputs."""

MIN_PROMPTS = 8
"""A set or category with fewer prompts than this on either side is skipped (issue 9 item 5)."""


class Method(StrEnum):
    """How node effects are estimated (both cost a fixed number of passes per batch, never one per feature)."""

    ig = "ig"  # integrated gradients from the baseline to the activation, `ig_steps` points (Marks et al.)
    attribution_patching = "attribution_patching"  # one forward + one backward: grad * (act - baseline)


class BaselineKind(StrEnum):
    mean = "mean"  # contrast prompts' mean activation per phase (refusal_lab.circuits.baseline)
    zero = "zero"  # zero ablation


class MetricKind(StrEnum):
    """What the circuit is found for: a scalar per prompt computed from the logits."""

    first_token_score = "first_token_score"  # log-odds of model.refusal_tokens at the last prompt position
    logit_diff = "logit_diff"  # logsumexp(refusal token logits) - logsumexp(compliance token logits), same position
    response_score = "response_score"  # mean first-token score over the first k positions of the model's response


class DiscoverySet(StrEnum):
    toxic = "toxic"  # toxic prompts vs harmless contrast
    safe = "safe"  # safe (scary-sounding but harmless) prompts vs harmless contrast
    over_refusal = "over_refusal"  # safe prompts the model refused vs safe prompts it answered
    # toxic prompts the model refused vs toxic prompts it answered: same label, different behaviour, the
    # real-model counterpart of over_refusal (on a weakly aligned model, what makes it refuse at all)
    toxic_refused = "toxic_refused"


class RefusedBy(StrEnum):
    """Which judgement defines `refused` for over_refusal and the refused/answered filters."""

    store = "store"  # the store's `refused` column (the judgement collect made)
    keyword = "keyword"  # the others: refusal_lab.judge's judgements (the judge stage's artifacts)
    rule = "rule"
    score = "score"
    llm = "llm"
    classifier = "classifier"

    @property
    def needs_judge_stage(self) -> bool:
        """Whether these labels exist only as the judge stage's artifact, so that stage is an input of circuits.

        keyword and rule are recomputed from the store's responses when no judgement is committed
        (refusal_lab.judge.refused_labels); score, llm and classifier are not.
        """
        return self in (RefusedBy.score, RefusedBy.llm, RefusedBy.classifier)


@dataclass
class MetricConfig:
    """The refusal metric m(prompt) whose change a node effect measures."""

    kind: MetricKind = MetricKind.first_token_score
    """first_token_score | logit_diff | response_score."""
    compliance_tokens: list[str] = field(default_factory=list)
    """logit_diff: vocabulary tokens that open a compliant answer (e.g. '▁Sure', '▁Here')."""
    k: int = 4
    """response_score: positions of the model's own response averaged (needs the stored responses)."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        if self.kind == MetricKind.logit_diff and not self.compliance_tokens:
            errors.append("circuits.metric.compliance_tokens: logit_diff needs at least one compliance token")
        if self.k < 1:
            errors.append(f"circuits.metric.k: {self.k} must be >= 1")
        if errors:
            raise ConfigError("; ".join(errors))


@dataclass
class CircuitsConfig:
    """Causal SAE-feature circuits for refusal (issue 9); the defaults are sized for the embedded organism."""

    sets: list[DiscoverySet] = field(
        default_factory=lambda: [
            DiscoverySet.toxic,
            DiscoverySet.safe,
            DiscoverySet.over_refusal,
            DiscoverySet.toxic_refused,
        ]
    )
    """Discovery sets: toxic, safe (each vs harmless contrast), over_refusal (safe refused vs safe answered) and
    toxic_refused (toxic refused vs toxic answered; skipped with its reason when either side is too small)."""
    hooks: list[str] = field(default_factory=list)
    """Hook points the circuits span (each needs an SAE); empty: every hook point of the run."""
    by_category: bool = True
    """Also find a circuit per category (attribution, faithfulness and random sets; no generation)."""
    method: Method = Method.ig
    """ig (integrated gradients) or attribution_patching."""
    ig_steps: int = 4
    """Integrated-gradients points between baseline and activation (midpoint rule)."""
    baseline: BaselineKind = BaselineKind.mean
    """mean (contrast means per phase) or zero."""
    metric: MetricConfig = field(default_factory=MetricConfig)
    """The refusal metric."""
    refused_by: RefusedBy = RefusedBy.store
    """Judgement that defines `refused`: store (the store's column) or a refusal_lab.judge judge name."""
    contrast_data: Any = None
    """Harmless contrast prompts when the run's data has none: a `data` config (e.g. the keys of
    conf/data/refusal_direction_harmless.yaml); null uses the run's harmless prompts."""
    contrast_limit: int = 64
    """At most this many contrast prompts (seeded subsample): they only feed the mean baseline."""
    validation_share: float = 0.5
    """Share of each set's prompts (by prompt-text hash) held out for validation."""
    faithfulness_target: float | None = 0.8
    """Circuit size: the fewest top-ranked features whose faithfulness on the set's discovery prompts reaches
    this (doubling, then bisection; refusal_lab.circuits.size), at most max_circuit_size; node_threshold still
    applies, node_share does not. null: the fixed size circuit_size (after node_threshold/node_share)."""
    max_circuit_size: int = 512
    """faithfulness_target: the largest circuit searched (a set that does not reach the target keeps its best)."""
    circuit_size: int = 32
    """faithfulness_target null: most SAE features in a saved circuit (after the node threshold/share). Also the
    per-category pool size of effects.npz."""
    node_threshold: float = 0.0
    """A node needs |mean effect| above this to survive."""
    node_share: float = 0.95
    """Keep the fewest nodes covering this share of the total |effect| of the SAE features (1.0: no share cut)."""
    category_sizes: str = "pooled"
    """faithfulness_target set: "pooled" gives each per-category set its pooled set's size (measured, not searched:
    its discovery faithfulness and `met` are still reported), "search" searches every category again."""
    category_edges: bool = False
    """Also compute edges for per-category sets (pooled sets always get them)."""
    edge_nodes: int | None = 32
    """Edges are computed among the circuit's top this many features by |effect| (a cap: each downstream node costs
    one backward pass); null: among all of them. The summary's `edge_nodes` records the count used."""
    edge_threshold: float = 0.0
    """An edge needs |effect| above this."""
    edge_share: float = 0.9
    """Keep the fewest edges per downstream hook covering this share of their total |effect|."""
    faithfulness_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    """Circuit sizes of the faithfulness curve."""
    n_random: int = 20
    """Random feature sets (same size and per-hook counts, active features) compared with the circuit."""
    steer_alpha: float = -4.0
    """Steering adds alpha times each circuit feature's decoder direction (negative: against refusal)."""
    max_new_tokens: int = 8
    """Tokens generated per prompt under ablation/steering (the keyword judge needs only the first ones)."""
    batch_size: int = 32
    """Prompts per forward/backward batch."""
    max_prompts: int | None = 96
    """At most this many discovery prompts per set side (seeded, by hash); null uses all."""
    top_features: int = 20
    """Features listed per set in summary.json."""
    top_prompt_tokens: int = 20
    """Prompt tokens listed per hook point in summary.json."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        if not self.sets:
            errors.append(f"circuits.sets: empty; valid sets: {[s.value for s in DiscoverySet]}")
        valid = [s.value for s in DiscoverySet]
        unknown = [str(s) for s in self.sets if str(s) not in valid]
        if unknown:
            errors.append(f"circuits.sets: {unknown} are not discovery sets; valid: {valid}")
        if len(set(self.sets)) != len(self.sets):
            errors.append(f"circuits.sets: {[str(s) for s in self.sets]} lists a set twice")
        if self.ig_steps < 1:
            errors.append(f"circuits.ig_steps: {self.ig_steps} must be >= 1")
        if not 0 < self.validation_share < 1:
            errors.append(f"circuits.validation_share: {self.validation_share} must be in (0, 1)")
        if self.circuit_size < 1:
            errors.append(f"circuits.circuit_size: {self.circuit_size} must be >= 1")
        target = self.faithfulness_target
        if target is not None and not 0 < target <= 1:
            errors.append(
                f"circuits.faithfulness_target: {target} must be in (0, 1], or null for the fixed size circuit_size"
            )
        if self.category_sizes not in ("pooled", "search"):
            errors.append(f"circuits.category_sizes: {self.category_sizes!r} must be 'pooled' or 'search'")
        if self.edge_nodes is not None and self.edge_nodes < 1:
            errors.append(f"circuits.edge_nodes: {self.edge_nodes} must be >= 1, or null for all of the circuit")
        if self.max_circuit_size < 1:
            errors.append(f"circuits.max_circuit_size: {self.max_circuit_size} must be >= 1")
        for key in ("node_share", "edge_share"):
            value = getattr(self, key)
            if not 0 < value <= 1:
                errors.append(f"circuits.{key}: {value} must be in (0, 1]")
        for key in ("node_threshold", "edge_threshold"):
            if getattr(self, key) < 0:
                errors.append(f"circuits.{key}: {getattr(self, key)} must be >= 0")
        if not self.faithfulness_sizes or min(self.faithfulness_sizes) < 1:
            errors.append(f"circuits.faithfulness_sizes: {self.faithfulness_sizes} must be positive sizes")
        if self.n_random < 1:
            errors.append(f"circuits.n_random: {self.n_random} must be >= 1 (the issue asks for >= 10)")
        if self.max_new_tokens < 1:
            errors.append(f"circuits.max_new_tokens: {self.max_new_tokens} must be >= 1")
        if self.batch_size < 1:
            errors.append(f"circuits.batch_size: {self.batch_size} must be >= 1")
        if self.contrast_limit < MIN_PROMPTS:
            errors.append(f"circuits.contrast_limit: {self.contrast_limit} must be >= {MIN_PROMPTS}")
        if self.max_prompts is not None and self.max_prompts < 2 * MIN_PROMPTS:
            errors.append(f"circuits.max_prompts: {self.max_prompts} must be >= {2 * MIN_PROMPTS} or null")
        if self.top_features < 1 or self.top_prompt_tokens < 1:
            errors.append("circuits.top_features / circuits.top_prompt_tokens: must be >= 1")
        if errors:
            raise ConfigError("; ".join(errors))


OUTPUT_NEUTRAL_FIELDS = ("batch_size",)
"""CircuitsConfig fields left out of the fingerprint: they change how the work is batched, not what it finds."""
