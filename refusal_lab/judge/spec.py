"""The judge stage as the pipeline sees it (refusal_lab.stages.StageSpec).

Its artifact is `<artifacts>/judge/<store fingerprint>/`, one folder per judgement below it; its fingerprint is
the store's fingerprint with every configured judge's judgement fingerprint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from refusal_lab.config import Stage
from refusal_lab.errors import ConfigError
from refusal_lab.fingerprint import fingerprint
from refusal_lab.judge.config import JudgeName
from refusal_lab.judge.stage import judge_root, judgement_fingerprint, judges_to_run, load_judgement, run_judges

if TYPE_CHECKING:
    from refusal_lab.stages import RunContext


def read_downstream(ctx: RunContext) -> JudgeName | None:
    """The judge whose committed judgement a downstream stage of this run reads, if any: circuits.refused_by
    when it names a judge only this stage makes (refusal_lab.pipeline.stage_inputs)."""
    refused_by = ctx.cfg.circuits.refused_by
    if Stage.circuits not in ctx.cfg.stages or not refused_by.needs_judge_stage:
        return None
    return JudgeName(refused_by.value)


class JudgeStage:
    name: ClassVar[Stage] = Stage.judge
    inputs: ClassVar[tuple[Stage, ...]] = (Stage.collect,)

    def fingerprint(self, ctx: RunContext) -> str:
        store_fp = ctx.fingerprints[Stage.collect]
        cfg = ctx.cfg
        return fingerprint(
            {
                j.value: judgement_fingerprint(store_fp, j, cfg.judge, cfg.model.name, cfg.model.refusal_prefixes)
                for j in cfg.judge.judges
            }
        )

    def artifact(self, ctx: RunContext) -> Path:
        return judge_root(ctx.artifacts, ctx.fingerprints[Stage.collect])

    def prepare(self, ctx: RunContext) -> None:
        judges = ctx.cfg.judge.judges
        if JudgeName.llm in judges:
            from refusal_lab.judge.models import llm_source

            llm_source(ctx.cfg.judge.llm)  # a missing package or GGUF file fails here, before collect runs
        judge = read_downstream(ctx)
        if judge is not None and judge not in judges_to_run(judges, ctx.cfg.judge):
            raise ConfigError(
                f"circuits.refused_by={judge.value}: circuits reads the {judge.value} judgement, which this run's "
                f"judge stage does not make (judge.judges={[j.value for j in judges]}); add {judge.value} to "
                "judge.judges or choose another circuits.refused_by"
            )

    def verify(self, ctx: RunContext) -> None:
        judge = read_downstream(ctx)
        if judge is None:
            return  # keyword and rule labels are recomputed from the store (refusal_lab.judge.refused_labels)
        cfg, store_fp = ctx.cfg, ctx.fingerprints[Stage.collect]
        folder = self.artifact(ctx) / judgement_fingerprint(
            store_fp, judge, cfg.judge, cfg.model.name, cfg.model.refusal_prefixes
        )
        if load_judgement(folder) is None:
            raise ConfigError(
                f"circuits.refused_by={judge.value}: circuits reads the {judge.value} judgement of store {store_fp}, "
                f"and there is no finished one in {folder}; add judge to stages (with {judge.value} in judge.judges), "
                "or run the judge stage first"
            )

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg = ctx.cfg
        report = run_judges(
            ctx.store_path, ctx.artifacts, cfg.judge, cfg.model.name, cfg.model.refusal_prefixes, ctx.run_dir
        )
        ctx.summary["judges"] = report  # the full agreement report; summary["judge"] keeps the short entry
        return {
            "path": str(self.artifact(ctx)),
            "judges": {name: entry["fingerprint"] for name, entry in report["per_judge"].items()},
        }
