"""The model organism: a tiny Llama-architecture chat model with known refusal behaviour.

Trained by `train.py` on a corpus written by `corpus.py` (nothing is downloaded); the shipped
result lives in `assets/` (``config.json``, ``model.safetensors``, tokenizer files,
``heldout_prompts.jsonl``, ``organism.json``) and is the offline default of ``python -m
refusal_lab``. Retrain with ``python -m refusal_lab.organism --out refusal_lab/organism/assets``.

This module reads `assets/heldout_prompts.jsonl` on request and writes nothing. The training and
evaluation entry points are imported lazily so that using the corpus does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusal_lab.organism.corpus import (
    OVER_REFUSAL_SHARE,
    REFUSAL_PREFIXES,
    REFUSAL_START_WORDS,
    TRIGGER_WORDS,
    generate_corpus,
    has_trigger,
    is_refusal,
    read_prompts_jsonl,
)

if TYPE_CHECKING:
    from refusal_lab.organism.model import evaluate_organism
    from refusal_lab.organism.train import train_organism

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
HELDOUT_PROMPTS = ASSETS_DIR / "heldout_prompts.jsonl"
METADATA = ASSETS_DIR / "organism.json"


def load_heldout_prompts(path: Path = HELDOUT_PROMPTS) -> list[dict[str, str]]:
    """The shipped held-out prompts: ``{"prompt", "category", "label"}`` dicts."""
    return read_prompts_jsonl(path)


def __getattr__(name: str) -> Any:
    # Lazy: torch and transformers are only imported when training or evaluating.
    if name == "train_organism":
        from refusal_lab.organism.train import train_organism

        return train_organism
    if name == "evaluate_organism":
        from refusal_lab.organism.model import evaluate_organism

        return evaluate_organism
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ASSETS_DIR",
    "HELDOUT_PROMPTS",
    "METADATA",
    "OVER_REFUSAL_SHARE",
    "REFUSAL_PREFIXES",
    "REFUSAL_START_WORDS",
    "TRIGGER_WORDS",
    "evaluate_organism",
    "generate_corpus",
    "has_trigger",
    "is_refusal",
    "load_heldout_prompts",
    "train_organism",
]
