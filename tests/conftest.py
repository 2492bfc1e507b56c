"""Shared fixtures: paths to ../shared/data and tiny Llama/Mistral models built in-process.

The tiny models are built from a config with random weights, saved with `save_pretrained`
next to the real Llama-2 / Mistral SentencePiece tokenizers and chat templates from
../shared/data, and loaded back through `from_pretrained`, so the real loading path runs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Prompt sets come from the shared data folder, never from the hub: data=or_bench (and the other data options)
# resolve under $REFUSAL_LAB_DATA, also in the subprocesses tests start. .ci/run sets it too.
os.environ.setdefault("REFUSAL_LAB_DATA", str(SHARED_DATA))

# Entries of ollama's template index (see ../shared/data/SOURCES.md §5).
LLAMA2_TEMPLATE = 28
MISTRAL_TEMPLATE = 14


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"tests need ../shared/data next to the repo ({SHARED_DATA})"
    return SHARED_DATA


def _template(index: int) -> str:
    return json.loads((SHARED_DATA / "chat_templates" / "ollama_template_index.json").read_text())[index]["template"]


def tiny_config_kwargs(n_layers: int = 3, hidden: int = 64) -> dict:
    """LlamaConfig / MistralConfig arguments of a tiny model over the real 32000-token vocabularies (GQA)."""
    return dict(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_tiny_model(out: Path, kind: str, n_layers: int = 3, hidden: int = 64, seed: int = 0) -> Path:
    """A randomly initialised tiny Llama or Mistral (GQA; Mistral with a short sliding window)."""
    torch.manual_seed(seed)
    common = tiny_config_kwargs(n_layers, hidden)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
        tokenizer_dir, template = "llama2", LLAMA2_TEMPLATE
    elif kind == "mistral":
        # A window shorter than the prompts, so the sliding-window cache path is exercised.
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=16))
        tokenizer_dir, template = "mistral-7b-v0.1", MISTRAL_TEMPLATE
    else:
        raise ValueError(kind)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    shutil.copy(SHARED_DATA / "tokenizers" / tokenizer_dir / "tokenizer.model", out / "tokenizer.model")
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = _template(template)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_mistral"), "mistral")
