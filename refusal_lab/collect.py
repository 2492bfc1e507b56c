"""The collect stage: prompts -> chat template -> greedy generation with hooks -> activation store.

Reads: the prompts (refusal_lab.data), the model and tokenizer (refusal_lab.models).
Writes: a Zarr activation store (refusal_lab.store) holding, per requested hook point, the
activations of the tokens chosen by `inference.positions`, each token's sample id, position,
phase and token id, and per sample the prompt, category, label, response and refusal judgements.

The store is committed batch by batch; a rerun of the same config resumes after the last
committed batch. Prompts are processed longest first: padding is minimal within a batch and
the first batch is the largest, so `batch_size: auto` finds its limit there.

The stage is split by concern: refusal_lab.collect_plan (sizing and disk checks before weights
load), refusal_lab.collect_batches (the batch loop with its out-of-memory retry),
refusal_lab.collect_fingerprint (what names the store); this module runs them in order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from refusal_lab.collect_batches import BatchRunner, open_sink, run_batches
from refusal_lab.collect_fingerprint import collect_fingerprint
from refusal_lab.collect_plan import CollectPlan, check_disk, plan_collect
from refusal_lab.config import RunConfig
from refusal_lab.data import Prompt
from refusal_lab.errors import ConfigError
from refusal_lab.generation import left_pad
from refusal_lab.models import load_model, n_layers
from refusal_lab.store_writer import StoreWriter

__all__ = [
    "BatchRunner",
    "CollectPlan",
    "check_disk",
    "collect_fingerprint",
    "left_pad",
    "open_sink",
    "plan_collect",
    "run_batches",
    "run_collect",
]

log = logging.getLogger(__name__)


def run_collect(
    cfg: RunConfig,
    prompts: list[Prompt],
    tokenizer: PreTrainedTokenizerBase,
    plan: CollectPlan,
    store_path: Path,
    fingerprint: str,
    attrs: dict,
) -> None:
    """Fill (or resume) the store at `store_path`; returns when it is committed complete."""
    inf = cfg.inference
    dtype = getattr(torch, cfg.model.torch_dtype.value)
    writer = StoreWriter.open(
        store_path,
        fingerprint=fingerprint,
        hook_points=[p.name for p in plan.hook_points] if inf.save_activations else [],
        d_model=plan.d_model,
        model_dtype=dtype,
        encoding=inf.store_dtype.value,
        chunk_tokens=inf.chunk_tokens,
        attrs=attrs,
    )
    if writer.complete:
        log.info("collect: %s is complete for this config; skipping", store_path)
        return
    start = writer.committed_samples
    done_ids = writer.committed_sample_ids()
    expected = np.array([prompts[i].sample_id for i in plan.order[:start]], dtype=done_ids.dtype)
    if not np.array_equal(done_ids, expected):
        raise RuntimeError(f"{store_path}: committed samples do not match the processing order; delete the store")
    if start:
        log.info("collect: resuming after %d committed samples", start)
    model = load_model(cfg.model)
    if n_layers(model) != plan.n_layers:
        raise ConfigError(
            f"model.name: {cfg.model.name} has {n_layers(model)} layers but its config says {plan.n_layers}"
        )
    runner = BatchRunner(cfg, model, tokenizer, plan, dtype)
    with open_sink(writer, inf) as sink:
        stats = run_batches(runner, prompts, plan.order, start, sink)
    writer.finalize({"collect_stats": stats})
    log.info(
        "collect: %d prompts in %.1f s (%.0f stored tokens/s)",
        len(prompts) - start,
        stats["seconds"],
        stats["tokens"] / max(stats["seconds"], 1e-9),
    )
