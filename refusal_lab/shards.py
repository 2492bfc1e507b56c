"""Sharded collect: one job writes one store part (`inference.shards=N inference.shard=i`).

The split, the parts index and the joined reader live in refusal_lab.store_parts; this module
is what the collect stage does differently in a shard job: it narrows the plan to the shard's
batches, registers the part in the index (the index is also the claim that the part is being
made), and writes the part with its own fingerprint, tied to the run's (parent) fingerprint.

An 8-shard collect on SLURM, then the SAEs on the joined store::

    python -m refusal_lab -m hydra/launcher=slurm 'stages=[collect]' inference.batch_size=32 \\
        inference.shards=8 'inference.shard=range(0,8)'
    python -m refusal_lab 'stages=[sae]' inference.batch_size=32   # reads the 8 parts as one store

The downstream run needs neither `shards` nor `shard`: the store's fingerprint (and folder) is
the unsharded run's, and `ActivationStore.open` reads the parts index found there.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusal_lab.collect import CollectPlan, run_collect
from refusal_lab.collect_plan import check_disk, tokens_per_prompt
from refusal_lab.config import InferenceConfig, RunConfig, Stage
from refusal_lab.data import Prompt
from refusal_lab.errors import ConfigError
from refusal_lab.store import ActivationStore, StoreIncompleteError, StoreMismatchError
from refusal_lab.store_parts import (
    PART_ATTRS,
    PartsIndex,
    is_parts_index,
    part_attrs,
    part_fingerprint,
    register_part,
    shard_order,
)
from refusal_lab.summary import collect_summary

if TYPE_CHECKING:
    from refusal_lab.stages import RunContext

log = logging.getLogger(__name__)


def sharded(inf: InferenceConfig) -> bool:
    return inf.shards > 1


def batch_size(inf: InferenceConfig) -> int:
    size = inf.fixed_batch_size
    assert size is not None, "InferenceConfig refuses batch_size=auto with shards > 1"
    return size


def require_shard(inf: InferenceConfig) -> int:
    if inf.shard is None:
        raise ConfigError(
            f"inference.shard: null with inference.shards={inf.shards}; a collect job writes one part: set "
            f"inference.shard=0..{inf.shards - 1} (or sweep inference.shard=range(0,{inf.shards}) as one array job)"
        )
    return inf.shard


def shard_plan(plan: CollectPlan, cfg: RunConfig) -> CollectPlan:
    """The plan narrowed to this shard's batches; the size estimates count its prompts only."""
    inf = cfg.inference
    order = shard_order(plan.order, batch_size(inf), inf.shards, require_shard(inf))
    n_post = plan.fmt.n_post_instruction_tokens
    tokens = sum(tokens_per_prompt(len(plan.token_ids[i]), n_post, inf.max_new_tokens, inf.positions) for i in order)
    share = tokens / max(1, plan.estimated_tokens)
    return dataclasses.replace(
        plan, order=order, estimated_tokens=tokens, estimated_bytes=round(plan.estimated_bytes * share)
    )


def part_path(store_path: Path, cfg: RunConfig, parent: str, launch_dir: Path) -> Path:
    """Where this job's part goes: `inference.part_dir` (any disk) or the store's own folder."""
    inf = cfg.inference
    name = f"part-{require_shard(inf):05d}-of-{inf.shards:05d}.zarr"
    if inf.part_dir is None:
        return store_path / name
    return (launch_dir / inf.part_dir).resolve() / f"{parent}.{name}"


def run_collect_shard(
    cfg: RunConfig,
    prompts: list[Prompt],
    tokenizer: Any,
    plan: CollectPlan,
    store_path: Path,
    parent: str,
    attrs: dict,
    launch_dir: Path,
) -> Path:
    """Register and write (or resume, or skip) this job's part; returns its path."""
    inf = cfg.inference
    shard, size = require_shard(inf), batch_size(inf)
    part = part_path(store_path, cfg, parent, launch_dir)
    register_part(
        store_path, parent=parent, shards=inf.shards, shard=shard, batch_size=size, n_samples=len(plan.order), part=part
    )
    mine = shard_plan(plan, cfg)
    log.info(
        "collect: shard %d of %d: %d of %d prompts (global batches %d, %d, ... of %d prompts) into %s",
        shard, inf.shards, len(mine.order), len(plan.order), shard, shard + inf.shards, size, part,
    )  # fmt: skip
    fp = part_fingerprint(parent, inf.shards, shard, size)
    # The pipeline holds the lock of this stage's artifact: the part (`shard_artifact`), not the whole store.
    own = {**attrs, PART_ATTRS: part_attrs(parent, inf.shards, shard, size)}
    run_collect(cfg, prompts, tokenizer, mine, part, fp, own)
    return part


def joined_status(store_path: Path) -> str:
    """'complete', or why the joined store cannot be read yet (which parts are missing)."""
    try:
        ActivationStore.open(store_path)
    except (StoreIncompleteError, FileNotFoundError, StoreMismatchError) as err:
        return str(err)
    return "complete"


def shard_summary(store_path: Path, part: Path) -> dict[str, Any]:
    """summary.json's collect entry of a shard job: its part, and the state of the whole."""
    index = PartsIndex.load(store_path)
    entry = collect_summary(part)
    entry.update(
        {
            "parent_store": str(store_path),
            "parent_fingerprint": index.fingerprint,
            "shards": index.shards,
            "registered_parts": sorted(index.parts),
            "joined": joined_status(store_path),
        }
    )
    return entry


def joined_complete(store_path: Path) -> bool:
    """True when `store_path` holds a parts index whose parts all read back (an unsharded rerun then skips)."""
    return is_parts_index(store_path) and joined_status(store_path) == "complete"


# --- the collect stage's StageSpec (refusal_lab.collect_spec.CollectStage) delegates here for parts ---


def shard_artifact(ctx: RunContext) -> Path:
    """The collect artifact a job writes and locks: its part in a shard job, else the store."""
    if not sharded(ctx.cfg.inference):
        return ctx.store_path
    return part_path(ctx.store_path, ctx.cfg, ctx.fingerprints[Stage.collect], ctx.launch_dir)


def prepare_parts(ctx: RunContext) -> bool:
    """Disk check of a shard job (its part's share, on the part's disk); False: not sharded, check as usual."""
    if not sharded(ctx.cfg.inference):
        return False
    check_disk(shard_plan(ctx.plan, ctx.cfg), shard_artifact(ctx), ctx.cfg.inference)
    return True


def verify_parts(path: Path, want: str) -> bool:
    """For a run reading the store without collecting it: a parts index of this config whose parts all read.

    False when `path` holds no parts index (the caller checks a single store). Raises
    MissingPartError naming the missing or incomplete parts.
    """
    if not is_parts_index(path):
        return False
    index = PartsIndex.load(path)
    if index.fingerprint != want:
        raise StoreMismatchError(
            f"store_path: {path} indexes the parts of another config (fingerprint {index.fingerprint}, this "
            f"config's collect fingerprint {want})"
        )
    ActivationStore.open(path)
    return True


def collect_parts(ctx: RunContext, attrs: dict) -> dict[str, Any] | None:
    """The collect stage of a shard job, or of an unsharded run finding a parts index; None: neither.

    A shard job writes its part and returns its summary entry. An unsharded run of the same
    config whose store folder holds a parts index skips collecting when every part reads
    back (and fails naming the missing parts otherwise), rather than collecting it again.
    """
    cfg, store_path = ctx.cfg, ctx.store_path
    parent = ctx.fingerprints[Stage.collect]
    if sharded(cfg.inference):
        part = run_collect_shard(cfg, ctx.prompts, ctx.tokenizer, ctx.plan, store_path, parent, attrs, ctx.launch_dir)
        return shard_summary(store_path, part)
    if not is_parts_index(store_path):
        return None
    verify_parts(store_path, parent)
    log.info("collect: %s is complete for this config (joined from its parts); skipping", store_path)
    return collect_summary(store_path)


def claim_paths(ctx: RunContext, stage: Stage) -> list[Path]:
    """Where claims on `stage`'s artifact may be: its path, and for a sharded store every registered part."""
    paths = [ctx.paths[stage]]
    if stage == Stage.collect and is_parts_index(ctx.store_path):
        paths += [Path(entry["path"]) for _, entry in sorted(PartsIndex.load(ctx.store_path).parts.items())]
    return paths


def register_planned_part(ctx: RunContext) -> None:
    """At submission (refusal_lab.launcher): list a shard job's part in the index before the job starts."""
    inf = ctx.cfg.inference
    if not sharded(inf) or Stage.collect not in ctx.cfg.stages:
        return
    register_part(
        ctx.store_path, parent=ctx.fingerprints[Stage.collect], shards=inf.shards, shard=require_shard(inf),
        batch_size=batch_size(inf), n_samples=len(ctx.plan.order), part=ctx.paths[Stage.collect],
    )  # fmt: skip
