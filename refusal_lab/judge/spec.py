"""The judge stage as the pipeline sees it (refusal_lab.stages.StageSpec).

Its artifact is `<artifacts>/judge/<store fingerprint>/`, one folder per judgement below it; its fingerprint is
the store's fingerprint with every configured judge's judgement fingerprint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from refusal_lab.config import Stage
from refusal_lab.fingerprint import fingerprint
from refusal_lab.judge.config import JudgeName
from refusal_lab.judge.stage import judge_root, judgement_fingerprint, run_judges

if TYPE_CHECKING:
    from refusal_lab.stages import RunContext


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
        if JudgeName.llm in ctx.cfg.judge.judges:
            from refusal_lab.judge.models import llm_source

            llm_source(ctx.cfg.judge.llm)  # a missing package or GGUF file fails here, before collect runs

    def verify(self, ctx: RunContext) -> None:
        return None  # downstream stages read judgements through refused_labels, which names what is missing

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
