"""Why the over-refusal edit misses issue 16 item 4 on the organism: the ceilings, measured.

Reads a finished default run's artifacts (store, SAEs, circuits); writes nothing. Every condition runs in
one stacked generation on the edit stage's held-out prompts (refused safe, toxic, harmless) and is judged
and scored exactly as the edit stage's table is (refusal_lab.edit.evaluate):

* ``dim_cos``: cosine of the over-refusal difference-in-means direction (refused safe - answered safe,
  discovery prompts) with the toxic one (toxic - harmless) at each hook point. Near 1: downstream of the
  tokens, over-refusal and toxic refusal are the same direction, so no edit at residuals_1.. can tell them apart.
* ``oracle_*``: the trigger words' embedding rows replaced by the mean embedding or by ``stop``'s row. This
  knows the planted mechanism, which no circuit does: the most any token-level edit can do.
* ``trigger_rows_perp_top<k>``: only the trigger tokens' rows projected off the span of the top-k residuals_0
  features by selectivity score (an SAE-feature edit confined to the tokens that carry the mechanism).
* ``selective_clamp_<hook>_<k>``: the top-k selective features at one hook clamped to 0 (error kept).

    python -m refusal_lab hydra.run.dir=/tmp/def/run artifacts_dir=/tmp/def/art   # the default run, once
    python benchmarks/probe_edit_ceiling.py --artifacts /tmp/def/art
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from refusal_lab.circuits.direction import directions_from_model
from refusal_lab.circuits.inputs import load_pool
from refusal_lab.circuits.selective import read_means, selectivity_scores
from refusal_lab.circuits.sets import split
from refusal_lab.config import Stage
from refusal_lab.edit.intervene import EMBEDDING, Condition, clamp_fns, orthonormal
from refusal_lab.organism import TRIGGER_WORDS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finished_run import open_finished_run, print_table  # noqa: E402


class TokenRows:
    """Hook functions at residuals_0 that change only the rows of chosen token ids (the prompt pass).

    residuals_0 is the embedding's output, so an edit confined to some token ids is an edit of those
    embedding rows. The input ids are read by a pre-hook on the decoder; the stacked evaluation puts the
    same prompts in every condition's block, so a block's ids are the first rows.
    """

    def __init__(self, model: torch.nn.Module, token_ids: list[int]) -> None:
        self.ids = torch.tensor(token_ids)
        self.current: torch.Tensor | None = None
        model.model.register_forward_pre_hook(self._keep, with_kwargs=True)  # type: ignore[union-attr]

    def _keep(self, _module, _args, kwargs):
        self.current = kwargs.get("input_ids")

    def mask(self, x_BTD: torch.Tensor) -> torch.Tensor | None:
        ids = self.current
        if ids is None or ids.shape[1] != x_BTD.shape[1]:
            return None  # a decode step: the prompt rows were edited in the prefill
        return torch.isin(ids[: x_BTD.shape[0]], self.ids)[..., None].to(x_BTD.dtype)

    def replaced(self, row_D: torch.Tensor):
        def fn(x):
            m = self.mask(x)
            return x if m is None else x * (1 - m) + m * row_D

        return fn

    def projected(self, basis_DK: torch.Tensor):
        u = basis_DK.float()

        def fn(x):
            m = self.mask(x)
            return x if m is None else x - m * ((x @ u) @ u.T)

        return fn


def main() -> None:
    ap = argparse.ArgumentParser(description="Ceilings of the over-refusal edit on a finished default run")
    ap.add_argument("--artifacts", required=True, help="artifacts_dir of a finished `python -m refusal_lab` run")
    ap.add_argument("overrides", nargs="*", help="the run's other overrides, if any")
    args = ap.parse_args()
    run = open_finished_run([f"artifacts_dir={args.artifacts}", *args.overrides], batch_size=32)
    cfg, ctx, model, saes = run.cfg, run.ctx, run.model, run.saes
    hooks = list(saes)  # the circuits hook points (finished_run loads one SAE for each)
    pool, contrast, _ = load_pool(ctx)

    def discovery(rows: list[int]):
        texts = [pool.prompts[i] for i in split(rows, pool.prompts, cfg.circuits.validation_share, 10**6).discovery]
        return run.batch(texts)

    safe = [i for i, lab in enumerate(pool.labels) if lab == "safe"]
    toxic = [i for i, lab in enumerate(pool.labels) if lab == "toxic"]
    r_over = directions_from_model(
        model,
        hooks,
        discovery([i for i in safe if pool.refused[i]]),
        discovery([i for i in safe if not pool.refused[i]]),
    )
    r_toxic = directions_from_model(model, hooks, discovery(toxic), discovery(contrast))
    for h in hooks:
        a, b = r_over[h], r_toxic[h]
        cos = float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else float("nan")
        print(f"dim_cos {h}: {cos:.4f}")

    sets = ctx.paths[Stage.circuits] / "sets"
    scores = selectivity_scores(read_means(sets / "over_refusal"), read_means(sets / "toxic"))
    vocab = ctx.tokenizer.get_vocab()
    trigger = sorted(i for t, i in vocab.items() if any(w in t.lower() for w in TRIGGER_WORDS))
    rows = TokenRows(model, trigger)
    embed = model.get_input_embeddings().weight.detach()
    conditions = [
        Condition("unedited", {}),
        Condition("oracle_mean_row", {EMBEDDING: rows.replaced(embed.mean(0))}),
        Condition("oracle_stop_row", {EMBEDDING: rows.replaced(embed[vocab["▁stop"]])}),
    ]
    order0 = np.argsort(-scores["residuals_0"])
    for k in (32, 64, 128):
        basis = orthonormal(saes["residuals_0"].W_dec.detach()[torch.as_tensor(order0[:k].copy())])
        conditions.append(Condition(f"trigger_rows_perp_top{k}", {EMBEDDING: rows.projected(basis)}))
    for h in hooks:
        for k in (16, 64):
            top = np.argsort(-scores[h])[:k].tolist()
            conditions.append(Condition(f"selective_clamp_{h}_{k}", clamp_fns(model, saes, {h: top}, 0.0)))
    print("trigger tokens:", ctx.tokenizer.convert_ids_to_tokens(trigger))
    print_table(run.evaluate(conditions))


if __name__ == "__main__":
    main()
