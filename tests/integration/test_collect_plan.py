"""What plan_collect decides before weights load (issue 8): the store-size estimate follows the
model dtype (item 10), the collect fingerprint follows what the prompts were formatted with
(item 3), and mlp_N / attention_N are refused on unverified architectures (item 14).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import zarr
from transformers import Gemma2Config, Gemma2ForCausalLM

from refusal_lab.collect_fingerprint import collect_fingerprint
from refusal_lab.collect_plan import CollectPlan, plan_collect
from refusal_lab.config import RunConfig, StoreDtype, TorchDtype
from refusal_lab.data import load_prompts
from refusal_lab.errors import ConfigError
from refusal_lab.fingerprint import fingerprint
from refusal_lab.models import load_tokenizer
from refusal_lab.pipeline import run
from refusal_lab.store import ActivationStore
from tests.integration.test_collect import make_cfg

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")


def plan_for(cfg: RunConfig) -> CollectPlan:
    return plan_collect(cfg, load_tokenizer(cfg.model), load_prompts(cfg.data))


def copy_model(src: Path, dst: Path) -> Path:
    """Weights and config linked, tokenizer files (chat template included) copied, so a test may edit them."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in MODEL_FILES:
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    return dst


def build_tiny_gemma2(out: Path, tokenizer_from: Path) -> Path:
    """A post-norm decoder (Gemma-2: the sublayer output is normalised before the residual add)."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    Gemma2ForCausalLM(config).save_pretrained(out)
    for f in tokenizer_from.iterdir():
        if f.name not in MODEL_FILES:
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize(("dtype", "width"), [(TorchDtype.float32, 4), (TorchDtype.bfloat16, 2)])
def test_raw_store_estimate_follows_the_model_dtype(dtype, width, tiny_llama, shared_data, tmp_path):
    cfg = make_cfg(tiny_llama, shared_data, tmp_path, store_dtype=StoreDtype.raw)
    cfg = replace(cfg, model=replace(cfg.model, torch_dtype=dtype))
    plan = plan_for(cfg)
    per_token = plan.estimated_bytes / plan.estimated_tokens
    assert per_token == len(plan.hook_points) * plan.d_model * width + 13
    if dtype == TorchDtype.float32:
        # What the store really holds per token, uncompressed: the estimate's activation part.
        summary = run(cfg, tmp_path / "run", tmp_path)
        store = ActivationStore.open(Path(summary["collect"]["store"]))
        group = zarr.open_group(store.path, mode="r")
        acts_bytes = sum(group[f"acts/{h}"].nbytes for h in store.hook_points)  # type: ignore[union-attr]
        assert acts_bytes / store.n_tokens == per_token - 13


def test_float16_store_estimate_is_two_bytes_whatever_the_model_dtype(tiny_llama, shared_data, tmp_path):
    cfg = make_cfg(tiny_llama, shared_data, tmp_path)
    plan = plan_for(replace(cfg, model=replace(cfg.model, torch_dtype=TorchDtype.float32)))
    assert plan.estimated_bytes / plan.estimated_tokens == len(plan.hook_points) * plan.d_model * 2 + 13


def test_fingerprint_follows_the_chat_template_and_the_token_ids(tiny_llama, tiny_mistral, shared_data, tmp_path):
    model_dir = copy_model(tiny_llama, tmp_path / "model")
    cfg = make_cfg(model_dir, shared_data, tmp_path)

    def collect_fp() -> tuple[str, CollectPlan]:
        plan = plan_for(cfg)
        return fingerprint(collect_fingerprint(cfg, plan, "same prompts")), plan

    base_fp, base = collect_fp()
    assert collect_fp()[0] == base_fp

    # The hub template changes without changing the text it makes (revision: null): another store.
    tokenizer = load_tokenizer(cfg.model)
    assert isinstance(tokenizer.chat_template, str)
    tokenizer.chat_template = "{#- reformatted upstream -#}\n" + tokenizer.chat_template
    tokenizer.save_pretrained(model_dir)
    edited_fp, edited = collect_fp()
    assert edited.token_ids == base.token_ids and edited.chat_template != base.chat_template
    assert edited_fp != base_fp

    # The tokenizer changes under the same template: the prompts' token ids name the store.
    for name in ("tokenizer.model", "tokenizer.json"):
        shutil.copy(tiny_mistral / name, model_dir / name)
    retokenized_fp, retokenized = collect_fp()
    assert retokenized.chat_template == edited.chat_template and retokenized.token_ids != edited.token_ids
    assert retokenized_fp != edited_fp


def test_mlp_and_attention_are_refused_on_an_unverified_architecture(tiny_llama, shared_data, tmp_path):
    gemma = build_tiny_gemma2(tmp_path / "gemma2", tiny_llama)
    cfg = make_cfg(gemma, shared_data, tmp_path)
    with pytest.raises(ConfigError) as err:
        plan_for(replace(cfg, model=replace(cfg.model, activation_layers=["residuals_0", "mlp_1", "attention_0-1"])))
    message = str(err.value)
    for needle in ("model.activation_layers", "mlp_1", "attention_0", "attention_1", "gemma2", "llama", "residuals_N"):
        assert needle in message, (needle, message)
    assert "residuals_0" not in message.split("not supported")[0]
    # residuals_N stays valid on any decoder with model.model.layers.
    plan = plan_for(replace(cfg, model=replace(cfg.model, activation_layers=["all"])))
    assert [p.name for p in plan.hook_points] == ["residuals_0", "residuals_1", "residuals_2"]


def test_algorithm_version_names_the_store(tiny_llama, shared_data, tmp_path, monkeypatch):
    """Bumping COLLECT_ALGORITHM_VERSION gives every config a new store (no stale store is reused)."""
    from refusal_lab import collect_fingerprint as module

    cfg = make_cfg(tiny_llama, shared_data, tmp_path)
    plan = plan_for(cfg)
    before = fingerprint(collect_fingerprint(cfg, plan, "p"))
    monkeypatch.setattr(module, "COLLECT_ALGORITHM_VERSION", module.COLLECT_ALGORITHM_VERSION + 1)
    assert fingerprint(collect_fingerprint(cfg, plan, "p")) != before
