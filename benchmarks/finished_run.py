"""A finished run reopened for probes: its config, model, SAEs and the edit stage's held-out prompts.

Shared by benchmarks/probe_edit_ceiling.py and probe_edit_sink.py. Composes the run's config from the
same overrides the run was started with (artifacts_dir included), so every fingerprint and artifact path
is the run's own; loads nothing the run did not write.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from refusal_lab.circuits.batches import PromptBatch, make_text_batches
from refusal_lab.circuits.inputs import circuit_hooks
from refusal_lab.config import RunConfig, Stage, register_configs
from refusal_lab.edit.evaluate import Prompts, evaluate
from refusal_lab.edit.intervene import Condition
from refusal_lab.edit.stage import held_out
from refusal_lab.pipeline import planned_context
from refusal_lab.refusal import keyword_refusal
from refusal_lab.sae.model import Sae
from refusal_lab.sae.saelens import load_sae
from refusal_lab.stages import RunContext

CONF = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class FinishedRun:
    cfg: RunConfig
    ctx: RunContext
    model: Any
    saes: dict[str, Sae]
    prompts: Prompts
    """The edit stage's held-out prompts: refused safe, toxic, harmless (refusal_lab.edit.stage.held_out)."""
    batch: Callable[[list[str]], list[PromptBatch]]

    def evaluate(self, conditions: Sequence[Condition]) -> dict[str, Any]:
        """The edit stage's table for these conditions (keyword judge, edit.max_new_tokens, KL on harmless prompts)."""
        prefixes, edit = self.cfg.model.refusal_prefixes, self.cfg.edit
        judge = lambda rs: [keyword_refusal(r, prefixes) for r in rs]  # noqa: E731
        return evaluate(
            self.model, self.ctx.tokenizer, self.prompts, conditions, judge, len(conditions),
            edit.max_new_tokens, edit.max_rows,
        )  # fmt: skip


def open_finished_run(overrides: Sequence[str], batch_size: int = 16) -> FinishedRun:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        composed = compose(config_name="config", overrides=list(overrides))
    cfg = OmegaConf.to_object(composed)
    assert isinstance(cfg, RunConfig)
    ctx = planned_context(cfg, Path.cwd())
    model = ctx.model().eval()
    saes = {h: load_sae(ctx.paths[Stage.sae] / h).eval().requires_grad_(False) for h in circuit_hooks(ctx)}

    def batch(texts: list[str]) -> list[PromptBatch]:
        if not texts:
            return []
        return make_text_batches(cfg.model, ctx.tokenizer, texts, batch_size, cfg.inference.max_prompt_tokens)

    prompts, _, _ = held_out(ctx, batch)
    return FinishedRun(cfg, ctx, model, saes, prompts, batch)


def print_table(result: dict[str, Any]) -> None:
    print("held-out prompts:", result["n_prompts"])
    print(f"{'condition':34s} {'refused safe':>12s} {'toxic':>6s} {'harmless':>8s} {'KL harmless':>11s}")
    for name, row in result["table"].items():
        if name == "random":
            continue
        print(
            f"{name:34s} {row['refusal_refused_safe']:12.2f} {row['refusal_toxic']:6.3f} "
            f"{row['refusal_harmless']:8.2f} {row['kl_harmless']:11.3f}"
        )
