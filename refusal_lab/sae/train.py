"""SAE training: one `HookTrainer` per hook point, and `train_group`, which feeds several hooks' trainers from
one pass over the store.

Reads: batches from `refusal_lab.sae.data.WindowStream`. Writes: `<hook folder>/checkpoint.pt`
every `sae.checkpoint_every` steps (SAE weights, Adam state, step, dead-latent counters). The
learning-rate schedule is a pure function of the step and the data order a pure function of
(seed, step), so the step alone restores both.

Loss (scale-free, on inputs normalised to E|x|^2 = d_model): the batch FVU
sum|x - x_hat|^2 / sum|x - mean x|^2, plus for relu `l1_coefficient * sum|f|_1 / sum|x - mean x|^2` (the
SAELens loss sum|x - x_hat|^2 + l1_coefficient * sum|f|_1 divided by the batch variance, so SAELens's
coefficients carry over), plus
for topk/batchtopk `auxk_alpha * min(n_dead / k_aux, 1) * FVU(residual, dead latents' reconstruction)`
(AuxK, Gao et al. 2024). Norm-outlier tokens and tokens holding inf/NaN are dropped from the batch.

Shape letters: N tokens, H hooks, B batch, D d_model, F d_sae.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from refusal_lab.progress import progress
from refusal_lab.sae.config import Architecture, LrDecay, SaeConfig, SaeDtype
from refusal_lab.sae.data import HookStats, TokenPlan, WindowStream, block_tokens
from refusal_lab.sae.model import Sae
from refusal_lab.sae.source import ActivationSource

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
DEAD_REFRESH_STEPS = 16
"""Steps between host-side refreshes of the dead-latent mask (each refresh is one device sync)."""
THRESHOLD_FROM = 0.8
"""batchtopk: the JumpReLU threshold is the mean, over the steps after this share of training (where the
rate has decayed and the weights barely move), of each batch's smallest selected activation: the value
that keeps k latents per token on average. An average over all of training would be biased by the
large early pre-activations."""


def autocast_dtype(dtype: SaeDtype, device: torch.device) -> torch.dtype | None:
    """The encoder matmul's autocast dtype, or None for plain float32."""
    if dtype == SaeDtype.bfloat16 or (dtype == SaeDtype.auto and device.type == "cuda"):
        return torch.bfloat16
    return None


def lr_factor(step: int, total: int, warmup_fraction: float, decay: LrDecay, decay_fraction: float) -> float:
    """Multiplier of the peak rate at `step` (0-based) of `total`: linear warmup, plateau, decay to 0."""
    warmup = round(warmup_fraction * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    decay_steps = round(decay_fraction * total) if decay != LrDecay.none else 0
    start = total - decay_steps
    if step < start or decay_steps == 0:
        return 1.0
    progress = (step - start + 1) / (decay_steps + 1)
    if decay == LrDecay.linear:
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(cfg: SaeConfig, n_train_tokens: int) -> int:
    tokens = cfg.train_tokens if cfg.train_tokens is not None else (cfg.epochs or 0) * n_train_tokens
    return max(1, math.ceil(tokens / cfg.batch_size))


def hook_seed(seed: int, hook: str) -> int:
    """Initialisation seed of one hook's SAE: independent of which hooks share its group."""
    return (seed * 1_000_003 + zlib.crc32(hook.encode())) % 2**63


class HookTrainer:
    """One hook point's SAE, its Adam optimizer, schedule position and dead-latent counter."""

    def __init__(
        self,
        hook: str,
        d_in: int,
        cfg: SaeConfig,
        stats: HookStats,
        n_train_tokens: int,
        total: int,
        device: torch.device,
        seed: int,
    ) -> None:
        self.hook, self.cfg, self.stats, self.total, self.device = hook, cfg, stats, total, device
        self.sae = Sae(d_in, cfg.expansion_factor * d_in, cfg.architecture, cfg.k)
        self.sae.reset_parameters(torch.Generator().manual_seed(hook_seed(seed, hook)))
        with torch.no_grad():
            self.sae.b_dec.copy_(torch.from_numpy(stats.mean * stats.scale))
        self.sae.to(device)
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        groups = [
            {"params": [self.sae.W_dec], "lr_scale": cfg.decoder_lr_scale},
            {"params": [self.sae.encoder, self.sae.b_enc, self.sae.b_dec], "lr_scale": 1.0},
        ]
        self.opt = torch.optim.Adam(groups, lr=cfg.lr, betas=(0.9, 0.999), **fast)
        self.autocast = autocast_dtype(cfg.dtype, device)
        self.step = 0
        self.resumed_from: int | None = None
        self.since_fired = torch.zeros(self.sae.d_sae, dtype=torch.long, device=device)
        self.dead_after = min(cfg.dead_tokens, n_train_tokens)
        self.auxk_k = cfg.auxk_k or d_in // 2
        self.use_aux = cfg.architecture != Architecture.relu and cfg.auxk_alpha > 0
        self.dead = torch.zeros(self.sae.d_sae, dtype=torch.bool, device=device)
        self.n_dead = 0
        self.threshold_from = min(int(THRESHOLD_FROM * total), total - 1)
        self.threshold_sum = torch.zeros((), dtype=torch.float64, device=device)  # batchtopk, training units
        self.threshold_n = 0
        self.seconds = 0.0  # wall time of the group steps this trainer took part in
        self.n_nonfinite = torch.zeros((), dtype=torch.long, device=device)  # training-batch rows with inf/NaN
        self.n_outliers = torch.zeros((), dtype=torch.long, device=device)  # training-batch norm outliers

    def train_step(self, raw_ND: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step on a batch of raw activations; returns detached diagnostics.

        Rows holding inf/NaN and norm outliers are dropped from the batch before the forward pass (one
        device sync for the boolean index): they take no BatchTopK slot, never feed the JumpReLU
        threshold, never count as tokens on which a latent stayed silent, and `0 * inf` never reaches the
        loss.
        """
        cfg, sae = self.cfg, self.sae
        lr = cfg.lr * lr_factor(self.step, self.total, cfg.lr_warmup_fraction, cfg.lr_decay, cfg.lr_decay_fraction)
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        if self.use_aux and self.step % DEAD_REFRESH_STEPS == 0:
            self.dead = self.since_fired >= self.dead_after
            self.n_dead = int(self.dead.sum())
        finite = torch.isfinite(raw_ND).all(dim=1)
        keep = finite & (raw_ND.norm(dim=1) <= self.stats.max_norm)
        self.n_nonfinite += (~finite).sum()
        self.n_outliers += (finite & ~keep).sum()
        x = raw_ND[keep] * self.stats.scale
        n = x.shape[0]
        self.step += 1
        if n == 0:  # nothing to learn from; the schedule still advances, so the step count stays exact
            nan = torch.tensor(math.nan)
            return {"loss": nan, "fvu": nan, "l0": nan, "dead_frac": self._dead_frac(), "lr": torch.tensor(lr)}
        out = sae.train_forward(x, self.autocast, self.dead if self.use_aux and self.n_dead > 0 else None, self.auxk_k)
        fvu, variance = _fvu(x, out.x_hat)
        loss = fvu
        if out.l1 is not None:
            loss = loss + cfg.l1_coefficient * out.l1.sum() / variance
        if out.aux_recon is not None:
            residual = (x - out.x_hat).detach()
            scale = min(self.n_dead / self.auxk_k, 1.0)
            loss = loss + cfg.auxk_alpha * scale * _fvu(residual, out.aux_recon)[0]
        loss.backward()
        sae.project_decoder_grad()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        with torch.no_grad():
            active = out.codes.vals > 0
            fired = torch.zeros_like(self.dead)
            fired[out.codes.cols[active]] = True
            self.since_fired += n
            self.since_fired[fired] = 0
            if cfg.architecture == Architecture.batchtopk and self.step > self.threshold_from:
                smallest = torch.where(active, out.codes.vals.detach(), math.inf).min()
                self.threshold_sum += torch.where(torch.isinf(smallest), 0.0, smallest)
                self.threshold_n += 1
        return {
            "loss": loss.detach(),
            "fvu": fvu.detach(),
            "l0": active.sum() / n,
            "dead_frac": self._dead_frac(),
            "lr": torch.tensor(lr),
        }

    def _dead_frac(self) -> torch.Tensor:
        return (self.since_fired >= self.dead_after).float().mean()

    def dropped(self) -> dict[str, int]:
        """Training-batch rows dropped so far (each time a row was drawn): inf/NaN, and norm outliers."""
        return {"nonfinite": int(self.n_nonfinite), "outliers": int(self.n_outliers)}

    def export(self) -> Sae:
        """A copy that acts on raw activations (input scale folded in; batchtopk gets its JumpReLU threshold)."""
        sae = copy.deepcopy(self.sae).eval()
        with torch.no_grad():
            if self.cfg.architecture == Architecture.batchtopk:
                sae.threshold.fill_(float(self.threshold_sum) / max(self.threshold_n, 1))
            sae.fold_input_scale(self.stats.scale)
        for p in sae.parameters():
            p.requires_grad_(False)
        return sae

    # ---- checkpoints ----

    def save_checkpoint(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "hook": self.hook,
            "step": self.step,
            "total": self.total,
            "sae": self.sae.state_dict(),
            "opt": self.opt.state_dict(),
            "since_fired": self.since_fired,
            "threshold_sum": self.threshold_sum,
            "threshold_n": self.threshold_n,
            "dead": self.dead,
            "n_dead": self.n_dead,
            "seconds": self.seconds,
            "n_nonfinite": self.n_nonfinite,
            "n_outliers": self.n_outliers,
        }
        tmp = folder / f".{CHECKPOINT}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, folder / CHECKPOINT)  # a kill mid-save leaves the previous checkpoint intact

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state["hook"] != self.hook or state["total"] != self.total:
            raise RuntimeError(
                f"{path}: checkpoint of {state['hook']} ({state['total']} steps) does not match {self.hook} "
                f"({self.total} steps); delete it to retrain"
            )
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.step = self.resumed_from = int(state["step"])
        self.since_fired = state["since_fired"].to(self.device)
        self.threshold_sum = state["threshold_sum"].to(self.device)
        self.threshold_n = int(state["threshold_n"])
        self.dead = state["dead"].to(self.device)
        self.n_dead = int(state["n_dead"])
        self.seconds = float(state["seconds"])
        self.n_nonfinite = state["n_nonfinite"].to(self.device)
        self.n_outliers = state["n_outliers"].to(self.device)


def _fvu(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FVU of the batch, its total variance sum_n |x_n - mean|^2, detached)."""
    variance = (x_ND - x_ND.mean(0)).pow(2).sum().clamp_min(1e-12).detach()
    return (x_hat_ND - x_ND).pow(2).sum() / variance, variance


def train_group(
    source: ActivationSource,
    trainers: dict[str, HookTrainer],
    plan: TokenPlan,
    cfg: SaeConfig,
    seed: int,
    folders: dict[str, Path],
    tracker: Any = None,
) -> None:
    """Train every trainer to its total step count from one shared stream of batches."""
    hooks = list(trainers)
    total = next(iter(trainers.values())).total
    start = min(t.step for t in trainers.values())
    if start >= total:
        return
    device = next(iter(trainers.values())).device
    block = block_tokens(source, cfg)
    stream = WindowStream(
        source, hooks, plan.train_rows, plan.train_weights, cfg.batch_size, cfg.buffer_tokens, block, seed
    )
    log.info("sae: training %s from step %d of %d (batch %d)", ", ".join(hooks), start, total, cfg.batch_size)
    batches = stream.batches(start)
    t_start = t_last = time.perf_counter()
    tokens_last = 0
    try:
        for step, batch_HBD in progress(batches, total=total - start, desc="sae: steps"):
            if step >= total:
                break
            x_HBD = torch.from_numpy(batch_HBD)
            if device.type == "cuda":
                x_HBD = x_HBD.pin_memory().to(device, non_blocking=True)
            diagnostics = {}
            for h, hook in enumerate(hooks):
                trainer = trainers[hook]
                if trainer.step != step:  # its checkpoint is ahead of the group's slowest hook
                    continue
                diagnostics[hook] = trainer.train_step(x_HBD[h])
            tokens_last += cfg.batch_size
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total:
                for hook in hooks:
                    trainers[hook].save_checkpoint(folders[hook])
            if diagnostics and (done % cfg.log_every == 0 or done == total):
                now = time.perf_counter()
                rate = tokens_last / max(now - t_last, 1e-9)
                t_last, tokens_last = now, 0
                values = {hook: {k: float(v) for k, v in d.items()} for hook, d in diagnostics.items()}
                log.info(
                    "sae: step %d/%d, %.0f tokens/s per hook; %s",
                    done,
                    total,
                    rate,
                    "; ".join(
                        f"{h} fvu {v['fvu']:.3f} l0 {v['l0']:.1f} dead {v['dead_frac']:.2f}" for h, v in values.items()
                    ),
                )
                if tracker is not None:
                    flat = {f"sae/{h}/train_{k}": v for h, d in values.items() for k, v in d.items()}
                    tracker.log({**flat, "sae/step": done, "sae/tokens_per_s": rate})
    finally:
        batches.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t_start
        for trainer in trainers.values():
            trainer.seconds += elapsed
