"""Schema of the `edit` config group (the edit stage, refusal_lab.edit.stage).

Imported by `refusal_lab.config` while that module is still loading, so nothing here imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from refusal_lab.errors import ConfigError

ALGORITHM_VERSION = 1
"""Bump whenever the edit stage's output changes for the same config and inputs."""


@dataclass
class EditConfig:
    """Which circuit's features are edited out, and how the edit is evaluated."""

    source: str = "over_refusal"
    """Circuit whose SAE-feature nodes are edited: a set name of the circuits artifact (its
    `sets/<source>/graph.json`; over_refusal_selective: the selective over-refusal circuit), or a path
    (relative to the circuits artifact) of any JSON file with
    `nodes: [{hook, feature, ...}]` (entries with `kind` other than `feature` are skipped)."""
    hooks: list[str] = field(default_factory=list)
    """Keep only nodes at these hook points; empty keeps every hook."""
    max_features: int | None = None
    """Keep at most this many nodes (the file's order: strongest first); null keeps all."""
    clamp_value: float = 0.0
    """The SAE clamp sets each selected feature to this value at every position."""
    n_random: int = 10
    """Random same-size feature sets (same per-hook counts, active features) edited the same way."""
    max_new_tokens: int = 8
    """Tokens generated per held-out prompt (the keyword judge reads the first ones)."""
    max_prompts: int = 32
    """At most this many held-out prompts per group (refused safe, toxic, harmless)."""
    batch_size: int = 32
    """Prompts per batch (conditions are stacked on top: rows = prompts x conditions, at most max_rows)."""
    max_rows: int = 512
    """Most rows of one stacked forward."""
    save_checkpoint: bool = True
    """Save the edited weights with save_pretrained (tokenizer and chat template beside them)."""
    verify_checkpoint: bool = True
    """Load the saved checkpoint back with from_pretrained and compare its logits with the hook-based edit."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        if not self.source:
            errors.append("edit.source: empty; give a circuits set name (e.g. over_refusal) or a nodes JSON path")
        if self.max_features is not None and self.max_features < 1:
            errors.append(f"edit.max_features: {self.max_features} must be >= 1 or null")
        for key in ("n_random", "max_new_tokens", "max_prompts", "batch_size", "max_rows"):
            if getattr(self, key) < 1:
                errors.append(f"edit.{key}: {getattr(self, key)} must be >= 1")
        if not self.save_checkpoint and self.verify_checkpoint:
            errors.append("edit.verify_checkpoint: true needs edit.save_checkpoint: true (nothing to load back)")
        if errors:
            raise ConfigError("; ".join(errors))


OUTPUT_NEUTRAL_FIELDS = ("batch_size", "max_rows")
"""EditConfig fields left out of the fingerprint: they change how the work is batched, not what it finds."""
