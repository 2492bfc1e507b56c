"""Refusal judges: three classes per response (full_compliance, full_refusal, partial_refusal) and a binary view.

* `rules`: the `rule` judge (compiled patterns, no model), the store's `refused` column.
* `core`: keyword and first-token score judges as class codes; the rule judge for a model config.
* `models`: `llm` (a chat model scores each class label) and `classifier` (a sequence classifier).
* `metrics`: agreement, Cohen's kappa, confusion matrices, P/R/F1.
* `stage`: the judge stage (re-judging a store without touching it) and `refused_labels` for circuits.
* `__main__`: `python -m refusal_lab.judge eval FILE --text-column ... --label-column ...`.
"""

from typing import Any

from refusal_lab.judge.labels import VERDICTS, Verdict, binary_view, parse_verdict
from refusal_lab.judge.rules import RULE_VERSION, RuleJudge

__all__ = [
    "RULE_VERSION",
    "VERDICTS",
    "RuleJudge",
    "Verdict",
    "binary_view",
    "judgement_fingerprint",
    "parse_verdict",
    "refused_labels",
]


# The stage pulls in the store (zarr): imported on first use, so `refusal_lab.config` can import this package.
def refused_labels(*args: Any, **kwargs: Any) -> Any:
    """See refusal_lab.judge.stage.refused_labels."""
    from refusal_lab.judge.stage import refused_labels as impl

    return impl(*args, **kwargs)


def judgement_fingerprint(*args: Any, **kwargs: Any) -> str:
    """See refusal_lab.judge.stage.judgement_fingerprint."""
    from refusal_lab.judge.stage import judgement_fingerprint as impl

    return impl(*args, **kwargs)
