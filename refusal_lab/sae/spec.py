"""The sae stage as the pipeline sees it (refusal_lab.stages.StageSpec): fingerprint, folder, run.

Its fingerprint is the store's fingerprint, the seed, every SAE setting that changes the SAEs
(not the OUTPUT_NEUTRAL_FIELDS) and ALGORITHM_VERSION.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from refusal_lab.config import RunConfig, Stage
from refusal_lab.fingerprint import fingerprint
from refusal_lab.sae.config import OUTPUT_NEUTRAL_FIELDS

if TYPE_CHECKING:
    from refusal_lab.stages import RunContext

ALGORITHM_VERSION = 3
"""Bump whenever the sae stage's output changes for the same config (training, metrics, layout).

2: rows holding inf/NaN and norm outliers dropped from batches (no BatchTopK slots, threshold or dead
counts), the held-out split by prompt-text hash, eval_tokens counted per sample, balance drawn per pass.
3: encoder initialised as ENCODER_INIT_SCALE (refusal_lab.sae.model) x the decoder transpose."""


def sae_fingerprint(cfg: RunConfig, collect_fp: str) -> str:
    """Names the SAE artifacts: the store, the seed and every SAE setting that changes the SAEs."""
    from refusal_lab.stages import to_plain

    settings = {k: v for k, v in to_plain(cfg.sae).items() if k not in OUTPUT_NEUTRAL_FIELDS}
    return fingerprint({"store": collect_fp, "sae": settings, "seed": cfg.seed, "algorithm": ALGORITHM_VERSION})


def sae_dir(artifacts: Path, sae_fp: str) -> Path:
    """`<artifacts>/sae/<fingerprint>/`, one SAELens folder per hook point below it."""
    return artifacts / "sae" / sae_fp


class SaeStage:
    name: ClassVar[Stage] = Stage.sae
    inputs: ClassVar[tuple[Stage, ...]] = (Stage.collect,)

    def fingerprint(self, ctx: RunContext) -> str:
        return sae_fingerprint(ctx.cfg, ctx.fingerprints[Stage.collect])

    def artifact(self, ctx: RunContext) -> Path:
        return sae_dir(ctx.artifacts, ctx.fingerprints[Stage.sae])

    def prepare(self, ctx: RunContext) -> None:
        from refusal_lab.stage_jobs import selected_hooks

        selected_hooks(ctx.cfg.sae.hooks, [h.name for h in ctx.plan.hook_points])  # sae.hooks names hook points

    def locks(self, ctx: RunContext) -> list[Path]:
        """One lock per hook this job trains (not the folder): per-hook array tasks run in parallel."""
        from refusal_lab.stage_jobs import hook_locks, selected_hooks

        return hook_locks(self.artifact(ctx), selected_hooks(ctx.cfg.sae.hooks, [h.name for h in ctx.plan.hook_points]))

    def verify(self, ctx: RunContext) -> None:
        from refusal_lab.config import ConfigError
        from refusal_lab.sae.saelens import METRICS

        folder = self.artifact(ctx)
        missing = [h.name for h in ctx.plan.hook_points if not (folder / h.name / METRICS).exists()]
        if missing:
            raise ConfigError(
                f"stages: {[s.value for s in ctx.cfg.stages]} needs trained SAEs for {missing} in {folder} "
                "(this config's sae fingerprint); add sae to stages to train them"
            )

    def run(self, ctx: RunContext) -> dict[str, dict[str, Any]]:
        from refusal_lab.sae.source import open_store
        from refusal_lab.sae.stage import train_saes
        from refusal_lab.stage_jobs import HookSubset

        return train_saes(
            HookSubset(open_store(ctx.store_path), ctx.cfg.sae.hooks),  # sae.hooks: this job's share of the hooks
            ctx.cfg.sae,
            self.artifact(ctx),
            model_loader=lambda: (ctx.model(), ctx.tokenizer),
            seed=ctx.cfg.seed,
            tracker=ctx.tracker,
            store=str(ctx.store_path),
        )
