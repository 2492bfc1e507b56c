"""The sae stage: one SAE per hook point of the activation store, saved in the SAELens layout.

Reads: the activation store (refusal_lab.store) and, for CE-loss recovered, the HF model.
Writes: `<out_dir>/<hook>/` with cfg.json, sae_weights.safetensors, sparsity.safetensors,
feature_density.png (with matplotlib) and metrics.json, written last as the commit marker;
`checkpoint.pt` while training (deleted once metrics.json exists). A hook whose metrics.json
exists is not retrained; one with a checkpoint resumes from it.

Hooks are trained in groups of `sae.hooks_per_group` from one pass over the store; each
group's SAEs are then evaluated on the held-out samples and spliced into the model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from refusal_lab.devices import resolve_device
from refusal_lab.fingerprint import write_json_atomic
from refusal_lab.sae.config import SaeConfig
from refusal_lab.sae.data import TokenPlan, hook_stats, plan_tokens
from refusal_lab.sae.metrics import evaluate_group, save_density_png
from refusal_lab.sae.saelens import DENSITY_PNG, METRICS, save_sae
from refusal_lab.sae.source import ActivationSource, open_store
from refusal_lab.sae.splice import ce_metrics, held_out_sequences, null_ce
from refusal_lab.sae.train import CHECKPOINT, HookTrainer, total_steps, train_group

log = logging.getLogger(__name__)

SUMMARY_KEYS = (
    "fvu", "explained_variance", "l0", "dead_frac", "dense_frac", "rel_bias", "ce_recovered", "kl", "nonfinite_dropped"
)  # fmt: skip

ModelLoader = Callable[[], tuple[Any, Any]]


def summary_entry(metrics: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The hook's entry in summary.json's "sae" section."""
    return {**{k: metrics.get(k) for k in SUMMARY_KEYS}, "path": str(folder)}


def run_sae_stage(
    cfg: SaeConfig,
    store_path: Path,
    out_dir: Path,
    *,
    model_loader: ModelLoader | None,
    seed: int,
    tracker: Any = None,
) -> dict[str, dict[str, Any]]:
    """Train (or resume, or skip) one SAE per hook point of the store at `store_path`."""
    source = open_store(store_path)
    return train_saes(
        source, cfg, out_dir, model_loader=model_loader, seed=seed, tracker=tracker, store=str(store_path)
    )


@contextmanager
def cpu_threads(cfg: SaeConfig, device: torch.device) -> Iterator[None]:
    """torch's intra-op thread count set to sae.cpu_threads on CPU for the block, restored afterwards."""
    before = torch.get_num_threads()
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _model_name(source: ActivationSource) -> str:
    attrs = getattr(source, "attrs", None)
    if isinstance(attrs, dict) and attrs.get("model"):
        return str(attrs["model"])
    return "unknown"


def train_saes(
    source: ActivationSource,
    cfg: SaeConfig,
    out_dir: Path,
    *,
    model_loader: ModelLoader | None,
    seed: int,
    tracker: Any = None,
    store: str | None = None,
) -> dict[str, dict[str, Any]]:
    """`run_sae_stage` on an open source (the store, or arrays in memory)."""
    results: dict[str, dict[str, Any]] = {}
    todo: list[str] = []
    for hook in source.hook_points:
        folder = out_dir / hook
        if (folder / METRICS).exists():
            results[hook] = summary_entry(json.loads((folder / METRICS).read_text()), folder)
            log.info("sae: %s is complete (%s); skipping", hook, folder / METRICS)
        else:
            todo.append(hook)
    if not todo:
        return results
    device = resolve_device(cfg.device, "sae.device")
    with cpu_threads(cfg, device):
        _train(source, cfg, out_dir, todo, results, device, model_loader, seed, tracker, store)
    return results


def _train(
    source: ActivationSource,
    cfg: SaeConfig,
    out_dir: Path,
    todo: list[str],
    results: dict[str, dict[str, Any]],
    device: torch.device,
    model_loader: ModelLoader | None,
    seed: int,
    tracker: Any,
    store: str | None,
) -> None:
    t_stage = time.perf_counter()
    plan = plan_tokens(source, cfg, seed)
    total = total_steps(cfg, len(plan.train_rows))
    log.info(
        "sae: %d hooks to train on %s; %d training tokens from %d samples, %d held-out tokens from %d samples; "
        "%d steps of %d tokens each",
        len(todo),
        device,
        len(plan.train_rows),
        len(plan.train_sample_ids),
        len(plan.eval_rows),
        len(plan.eval_sample_ids),
        total,
        cfg.batch_size,
    )
    counts = getattr(source, "overflow_counts", None)  # the store's; an in-memory source has none
    overflow = counts() if callable(counts) else None
    if isinstance(overflow, dict) and any(overflow.get(h) for h in todo):
        log.warning(
            "sae: the store holds values beyond float16's range (stored as inf) per hook: %s; rows holding them "
            "are dropped from statistics, training and metrics, and counted in nonfinite_dropped",
            {h: overflow[h] for h in todo if overflow.get(h)},
        )
    sequences, ce_reason = held_out_sequences(source.tokens(), plan.eval_sample_ids, cfg.ce_max_samples)
    if sequences is not None and model_loader is None:
        sequences, ce_reason = None, "no model_loader was given"
    model = None
    for g in range(0, len(todo), cfg.hooks_per_group):
        group = todo[g : g + cfg.hooks_per_group]
        stats = hook_stats(source, group, plan.train_rows, cfg)
        trainers: dict[str, HookTrainer] = {}
        folders = {hook: out_dir / hook for hook in group}
        for hook in group:
            trainer = HookTrainer(hook, source.d_model, cfg, stats[hook], len(plan.train_rows), total, device, seed)
            checkpoint = folders[hook] / CHECKPOINT
            if checkpoint.exists():
                trainer.load_checkpoint(checkpoint)
                log.info("sae: %s resumes from step %d (%s)", hook, trainer.step, checkpoint)
            trainers[hook] = trainer
        train_group(source, trainers, plan, cfg, seed, folders, tracker)
        saes = {hook: trainers[hook].export() for hook in group}
        metrics = evaluate_group(source, saes, plan, stats, cfg, device)
        if sequences is not None:
            if model is None:
                assert model_loader is not None
                model, _ = model_loader()
            ce = ce_metrics(model, sequences, saes, stats, cfg.filters, cfg.ce_batch_size, cfg.ce_targets)
        else:
            ce = {hook: null_ce(ce_reason or "no held-out sequences") for hook in group}
        for hook in group:
            results[hook] = _commit(
                hook, folders[hook], trainers[hook], saes[hook], metrics[hook], ce[hook], plan, cfg, source, store
            )
            if tracker is not None:
                tracker.log({f"sae/{hook}/{k}": v for k, v in results[hook].items() if isinstance(v, int | float)})
                png = folders[hook] / DENSITY_PNG
                if png.exists() and hasattr(tracker, "image"):
                    tracker.image(f"sae/{hook}/feature_density", png)
        del trainers, saes
    log.info("sae: %d SAEs trained in %.1f s", len(todo), time.perf_counter() - t_stage)


def _commit(
    hook: str,
    folder: Path,
    trainer: HookTrainer,
    sae: Any,
    metrics: dict[str, Any],
    ce: dict[str, Any],
    plan: TokenPlan,
    cfg: SaeConfig,
    source: ActivationSource,
    store: str | None,
) -> dict[str, Any]:
    """Write the hook's folder, metrics.json last, then drop the checkpoint."""
    density = metrics.pop("_density")
    extra = {
        "store": store,
        "store_fingerprint": source.fingerprint,
        "filters": {
            "drop_bos": cfg.filters.drop_bos,
            "phases": [p.value for p in cfg.filters.phases],
            "outlier_factor": cfg.filters.outlier_factor,
        },
        **trainer.stats.as_dict(),
        "balance": cfg.balance.value,
    }
    save_sae(sae, folder, hook, _model_name(source), extra, density)
    png = folder / DENSITY_PNG
    if not save_density_png(metrics["density_histogram"], png, f"{hook} feature density"):
        png = None  # type: ignore[assignment]
    steps = trainer.step
    dropped = trainer.dropped()
    nonfinite = {
        "stats_rows": trainer.stats.n_nonfinite,
        "train_draws": dropped["nonfinite"],
        "held_out_rows": metrics["eval_nonfinite"],
    }
    if any(nonfinite.values()):
        log.warning("sae: %s: rows holding inf/NaN dropped: %s", hook, nonfinite)
    full = {
        **{k: metrics.get(k) for k in ("fvu", "explained_variance", "l0", "dead_frac", "dense_frac", "rel_bias")},
        "ce_recovered": ce.get("ce_recovered"),
        "kl": ce.get("kl"),
        "nonfinite_dropped": nonfinite,
        "hook": hook,
        "architecture": cfg.architecture.value,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        **{k: v for k, v in metrics.items() if k not in SUMMARY_KEYS},
        **{k: v for k, v in ce.items() if k not in SUMMARY_KEYS},
        "density_png": None if png is None else png.name,
        "train": {
            "steps": steps,
            "tokens": steps * cfg.batch_size,
            "train_token_rows": len(plan.train_rows),
            "train_samples": len(plan.train_sample_ids),
            "held_out_samples": len(plan.held_out_ids),
            "eval_samples": len(plan.eval_sample_ids),
            "seconds": trainer.seconds,
            "tokens_per_s": steps * cfg.batch_size / max(trainer.seconds, 1e-9),
            "resumed_from_step": trainer.resumed_from,
            "outlier_draws_dropped": dropped["outliers"],
        },
    }
    write_json_atomic(folder / METRICS, full)
    (folder / CHECKPOINT).unlink(missing_ok=True)
    log.info(
        "sae: %s fvu %.3f l0 %.1f dead %.3f dense %.3f rel_bias %.3f ce_recovered %s -> %s",
        hook,
        full["fvu"],
        full["l0"],
        full["dead_frac"],
        full["dense_frac"],
        full["rel_bias"],
        "null" if full["ce_recovered"] is None else f"{full['ce_recovered']:.3f}",
        folder,
    )
    return summary_entry(full, folder)
