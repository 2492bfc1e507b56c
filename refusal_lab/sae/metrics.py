"""Held-out reconstruction metrics of trained SAEs, and the feature-density plot.

Reads: held-out activation rows (the `TokenPlan`'s eval rows) through `read_rows`.
Writes: `feature_density.png` in a hook's folder when matplotlib is importable.

Every metric is computed on held-out tokens that pass the filters (norm outliers and rows
holding inf/NaN excluded and counted), with the saved SAE (input scale folded in) on raw activations:

* FVU = sum|x - x_hat|^2 / sum|x - mean(x)|^2, explained_variance = 1 - FVU
* l0: mean count of latents with a nonzero activation per token
* dead_frac: share of latents active on no held-out token
* dense_frac: share of latents active on more than `sae.dense_threshold` of the held-out tokens
* rel_bias: E|x_hat|^2 / E[x . x_hat] (1 = no shrinkage; below 1 the SAE shrinks, as L1 SAEs do)
* density histogram: log10(share of tokens a latent is active on) over the live latents, in 0.1 bins

Shape letters: N tokens, H hooks, D d_model, F d_sae.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refusal_lab.sae.config import SaeConfig
from refusal_lab.sae.data import HookStats, TokenPlan, block_tokens, blocks_of, read_rows
from refusal_lab.sae.model import Sae, SparseCodes
from refusal_lab.sae.source import ActivationSource

log = logging.getLogger(__name__)


class MetricAccumulator:
    """Streaming sums for one hook; float64 so that millions of tokens do not lose precision."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device) -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.n_outliers = 0
        self.n_nonfinite = 0
        self.sum_x = torch.zeros(d_in, **f64)  # type: ignore[arg-type]
        self.sums = torch.zeros(5, **f64)  # type: ignore[arg-type]  # |x|^2, |x-x_hat|^2, |x_hat|^2, x.x_hat, l0
        self.counts = torch.zeros(d_sae, dtype=torch.long, device=device)

    def add(self, x_ND: torch.Tensor, x_hat_ND: torch.Tensor, codes: SparseCodes) -> None:
        x, x_hat = x_ND.double(), x_hat_ND.double()
        active = codes.vals > 0
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sums += torch.stack(
            [x.pow(2).sum(), (x - x_hat).pow(2).sum(), x_hat.pow(2).sum(), (x * x_hat).sum(), active.sum().double()]
        )
        self.counts += torch.bincount(codes.cols[active], minlength=self.counts.shape[0])

    def result(self, dense_threshold: float) -> dict[str, Any]:
        sum_x2, sum_err2, sum_xhat2, sum_dot, l0 = self.sums.tolist()
        n = max(self.n, 1)
        variance = sum_x2 - float(self.sum_x.pow(2).sum()) / n
        fvu = sum_err2 / variance if variance > 0 else math.nan
        density = (self.counts.double() / n).cpu().numpy()
        return {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse_per_token": sum_err2 / n,
            "l0": l0 / n,
            "dead_frac": float((self.counts == 0).double().mean()),
            "dense_frac": float((density > dense_threshold).mean()),
            "rel_bias": sum_xhat2 / sum_dot if sum_dot != 0 else math.nan,
            "eval_tokens": self.n,
            "eval_outliers": self.n_outliers,
            "eval_nonfinite": self.n_nonfinite,
            "density_histogram": density_histogram(density, self.n),
            "thresholds": {"dead": "active on 0 held-out tokens", "dense": f"active on > {dense_threshold} of tokens"},
            "_density": density,  # per latent; saved as sparsity.safetensors, not in metrics.json
        }


def density_histogram(density: np.ndarray, n_tokens: int) -> dict[str, Any]:
    """Counts of live latents per 0.1-wide bin of log10(density); dead latents counted apart."""
    live = density[density > 0]
    low = math.floor(math.log10(1.0 / max(n_tokens, 1)) * 10) / 10
    edges = np.round(np.arange(low, 0.1 + 1e-9, 0.1), 1)
    counts, _ = np.histogram(np.log10(live), bins=edges)
    return {"log10_density_bin_edges": edges.tolist(), "counts": counts.tolist(), "n_dead": int((density == 0).sum())}


@torch.no_grad()
def evaluate_group(
    source: ActivationSource,
    saes: dict[str, Sae],
    plan: TokenPlan,
    stats: dict[str, HookStats],
    cfg: SaeConfig,
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """Metrics of each exported SAE on the held-out rows, reading the hooks together window by window."""
    hooks = list(saes)
    accs = {h: MetricAccumulator(saes[h].d_in, saes[h].d_sae, device) for h in hooks}
    blocks = blocks_of(plan.eval_rows, source.n_tokens, block_tokens(source, cfg))
    window: list = []
    size = 0
    for i, block in enumerate(blocks):
        window.append(block)
        size += len(block[2])
        if size < cfg.buffer_tokens and i + 1 < len(blocks):
            continue
        data_HND = read_rows(source, hooks, window)
        window, size = [], 0
        for h, hook in enumerate(hooks):
            acts = torch.from_numpy(data_HND[h])
            for start in range(0, acts.shape[0], cfg.batch_size):
                x = acts[start : start + cfg.batch_size].to(device)
                finite = torch.isfinite(x).all(dim=1)
                keep = finite & (x.norm(dim=1) <= stats[hook].max_norm)
                accs[hook].n_nonfinite += int((~finite).sum())
                accs[hook].n_outliers += int((finite & ~keep).sum())
                x = x[keep]
                codes = saes[hook].encode_sparse(x)
                accs[hook].add(x, saes[hook].decode_sparse(codes), codes)
    return {h: accs[h].result(cfg.dense_threshold) for h in hooks}


def save_density_png(histogram: dict[str, Any], path: Path, title: str) -> bool:
    """Bar plot of the density histogram; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    edges = np.asarray(histogram["log10_density_bin_edges"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(edges[:-1], histogram["counts"], width=np.diff(edges), align="edge", color="#4c72b0")
    ax.set_xlabel("log10(feature density on held-out tokens)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title} ({histogram['n_dead']} dead, not shown)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
