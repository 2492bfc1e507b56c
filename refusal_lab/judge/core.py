"""The text judges every run can afford (keyword, rule) and the first-token score judge, as int8 class codes.

Reads and writes nothing; refusal_lab.judge.stage stores their output, collect calls `rule_judge_for`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from refusal_lab.judge.config import JudgeConfig
from refusal_lab.judge.labels import CODES, Verdict, binary_view
from refusal_lab.judge.rules import RULE_VERSION, RuleJudge, family_of
from refusal_lab.refusal import keyword_refusal


def resolve_family(cfg: JudgeConfig, model_name: str) -> str:
    """The rule judge's family: `cfg.family`, or from the model name when it is `auto`."""
    return family_of(model_name) if cfg.family == "auto" else cfg.family


def rule_settings(cfg: JudgeConfig, model_name: str, refusal_prefixes: Sequence[str]) -> dict[str, Any]:
    """Exactly what decides the rule judge's classes (for fingerprints)."""
    return {
        "rule_version": RULE_VERSION,
        "family": resolve_family(cfg, model_name),
        "extra_prefixes": list(refusal_prefixes),
        "max_chars": cfg.max_chars,
    }


def rule_judge_for(cfg: JudgeConfig, model_name: str, refusal_prefixes: Sequence[str]) -> RuleJudge:
    """The rule judge for a model: its family's phrasings plus the model config's refusal prefixes."""
    return RuleJudge(
        family=resolve_family(cfg, model_name), extra_prefixes=tuple(refusal_prefixes), max_chars=cfg.max_chars
    )


def refused_by_rule(judge: RuleJudge, response: str, partial_is_refused: bool, prompt: str = "") -> bool:
    """The binary view of one rule judgement of a response to `prompt` (the store's `refused` column)."""
    return bool(binary_view(np.array([judge.code(response, prompt)]), partial_is_refused)[0])


def keyword_codes(responses: Sequence[str], prefixes: Sequence[str]) -> np.ndarray:
    """int8 codes of the keyword judge: full_refusal or full_compliance (it has no partial class)."""
    refused, answered = CODES[Verdict.full_refusal], CODES[Verdict.full_compliance]
    return np.array([refused if keyword_refusal(r, prefixes) else answered for r in responses], dtype=np.int8)


def score_codes(scores: np.ndarray, threshold: float) -> np.ndarray:
    """int8 codes of the first-token score judge: refused where score > threshold."""
    refused = np.asarray(scores, dtype=np.float64) > threshold
    return np.where(refused, CODES[Verdict.full_refusal], CODES[Verdict.full_compliance]).astype(np.int8)
