"""Trainer step vs a plain PyTorch TopK SAE step: same shapes, same data, same init, one process.

    python benchmarks/bench_sae.py                                   # CPU sizes: d_in 512, 8x, k 32, batch 1024
    python benchmarks/bench_sae.py --device cuda --d-in 4096 --expansion 16 --k 64 --batch 4096   # GPU target

The plain reference is what one writes first: dense encoder matmul, topk, scatter into a dense
[batch, d_sae] code matrix, dense decoder matmul, autograd, Adam, decoder renormalisation (in
float32, and on CUDA also under bf16 autocast). The trainer step is `HookTrainer.train_step`,
the one the sae stage runs: sparse decoding through the k active latents (embedding_bag), a
custom backward whose decoder and encoder gradients touch only the selected rows, bf16
autocast for the encoder matmul on CUDA, decoder-gradient projection and renormalisation.

Data: a planted dictionary (4 x d_in random unit directions, 16 active per token, generated on
the device, so data movement is not timed). Printed, one row per variant: tokens/s, the
trainer's speed-up over it, and the held-out FVU it reached after the same number of training
tokens from the same initial weights and batches, so a faster step that learns worse shows up.
Learning quality against other libraries' trainers (their own inits) is
benchmarks/bench_sae_quality.py.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from torch import nn

from refusal_lab.sae.config import SaeConfig, SaeDtype
from refusal_lab.sae.data import HookStats
from refusal_lab.sae.train import HookTrainer

log = logging.getLogger("bench_sae")


class PlainTopK(nn.Module):
    """The straightforward dense TopK SAE."""

    def __init__(self, w_enc_FD: torch.Tensor, w_dec_FD: torch.Tensor, b_dec: torch.Tensor, k: int) -> None:
        super().__init__()
        self.W_enc = nn.Parameter(w_enc_FD.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(w_enc_FD.shape[0], device=w_enc_FD.device))
        self.W_dec = nn.Parameter(w_dec_FD.clone())
        self.b_dec = nn.Parameter(b_dec.clone())
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        vals, idx = pre.topk(self.k, dim=1)
        acts = torch.zeros_like(pre).scatter(1, idx, vals.relu())
        return acts @ self.W_dec + self.b_dec


def plain_optimizer(plain: PlainTopK, lr: float, decoder_lr_scale: float, fused: bool) -> torch.optim.Optimizer:
    """Adam with the trainer's rates: the decoder at decoder_lr_scale x lr (SaeConfig.decoder_lr_scale)."""
    rest = [plain.W_enc, plain.b_enc, plain.b_dec]
    groups = [{"params": [plain.W_dec], "lr": lr * decoder_lr_scale}, {"params": rest, "lr": lr}]
    return torch.optim.Adam(groups, lr=lr, fused=fused)


def plain_step(sae: PlainTopK, opt: torch.optim.Optimizer, x: torch.Tensor, autocast: torch.dtype | None) -> None:
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        x_hat = sae(x).float()
    loss = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))


class PlantedData:
    """Batches of a planted dictionary, generated on the device from a seed."""

    def __init__(self, d: int, n_features: int, active: int, device: torch.device, seed: int = 0) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        directions = torch.randn(n_features, d, generator=g)
        self.directions = (directions / directions.norm(dim=1, keepdim=True)).to(device)
        self.n_features, self.active, self.device = n_features, active, device

    def batch(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(seed)
        idx = torch.rand(n, self.n_features, generator=g).argsort(dim=1)[:, : self.active].to(self.device)
        magnitude = (0.5 + 1.5 * torch.rand(n, self.active, generator=g)).to(self.device)
        x = nn.functional.embedding_bag(idx, self.directions, per_sample_weights=magnitude, mode="sum")
        return x + 0.01 * torch.randn(x.shape, generator=g).to(self.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tokens_per_s(step, batches: list[torch.Tensor], warmup: int, steps: int, device: torch.device) -> float:
    for i in range(warmup):
        step(batches[i % len(batches)])
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    sync(device)
    return steps * batches[0].shape[0] / (time.perf_counter() - t0)


@torch.no_grad()
def fvu(forward, held_out: list[torch.Tensor]) -> float:
    err = var = 0.0
    for x in held_out:
        err += float((forward(x).float() - x).pow(2).sum())
        var += float((x - x.mean(0)).pow(2).sum())
    return err / var


def make_trainer(args, device: torch.device, total: int, dtype: SaeDtype) -> HookTrainer:
    cfg = SaeConfig(
        expansion_factor=args.expansion, k=args.k, batch_size=args.batch, buffer_tokens=args.batch, lr=args.lr,
        auxk_alpha=args.auxk_alpha, dtype=dtype, normalize_activations=False,
        lr_warmup_fraction=0.0, lr_decay_fraction=0.0,
    )  # fmt: skip
    stats = HookStats(1.0, float("inf"), np.zeros(args.d_in, np.float32), 1.0, 0, 0)
    return HookTrainer("residuals_0", args.d_in, cfg, stats, 10**9, total, device, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--fvu-steps", type=int, default=40, help="training steps before the FVU comparison")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--auxk-alpha", type=float, default=0.0, help="trainer's AuxK weight (0: same loss as plain)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    d_sae = args.d_in * args.expansion
    data = PlantedData(args.d_in, 4 * args.d_in, 16, device)
    timing_batches = [data.batch(args.batch, seed=1000 + i) for i in range(4)]
    held_out = [data.batch(args.batch, seed=9000 + i) for i in range(4)]
    log.info(
        "device %s (%d CPU threads), d_in %d, d_sae %d, k %d, batch %d",
        device, torch.get_num_threads(), args.d_in, d_sae, args.k, args.batch,
    )  # fmt: skip

    fast_dtype = SaeDtype.auto
    variants: dict[str, tuple] = {}
    trainer = make_trainer(args, device, args.warmup + args.steps, fast_dtype)
    init_enc, init_dec = trainer.sae.encoder.detach().clone(), trainer.sae.W_dec.detach().clone()
    variants["trainer"] = (lambda x: trainer.train_step(x), None)
    references = [("plain float32", None)] + (
        [("plain bf16 autocast", torch.bfloat16)] if device.type == "cuda" else []
    )
    results: dict[str, float] = {}
    results["trainer"] = tokens_per_s(variants["trainer"][0], timing_batches, args.warmup, args.steps, device)
    for name, autocast in references:
        plain = PlainTopK(init_enc, init_dec, torch.zeros(args.d_in, device=device), args.k).to(device)
        opt = plain_optimizer(plain, args.lr, SaeConfig().decoder_lr_scale, device.type == "cuda")
        results[name] = tokens_per_s(
            lambda x, p=plain, o=opt, a=autocast: plain_step(p, o, x, a),
            timing_batches,
            args.warmup,
            args.steps,
            device,
        )
    # Numerics: equal tokens, equal init, equal batches; FVU on held-out batches, beside each speed ratio.
    steps = args.fvu_steps
    trainer = make_trainer(args, device, steps, fast_dtype)
    with torch.no_grad():
        trainer.sae.encoder.copy_(init_enc)
        trainer.sae.W_dec.copy_(init_dec)
    plains = {}
    for name, autocast in references:
        plain = PlainTopK(init_enc, init_dec, torch.zeros(args.d_in, device=device), args.k).to(device)
        plains[name] = (plain, plain_optimizer(plain, args.lr, SaeConfig().decoder_lr_scale, False), autocast)
    for i in range(steps):
        x = data.batch(args.batch, seed=i)
        trainer.train_step(x)
        for plain, opt, autocast in plains.values():
            plain_step(plain, opt, x, autocast)
    fvus = {"trainer": fvu(trainer.sae, held_out), **{name: fvu(p[0], held_out) for name, p in plains.items()}}
    log.info("held-out FVU after %d tokens (%d steps), same initial weights and batches:", steps * args.batch, steps)
    log.info("%-22s %12s %10s %14s", "variant", "tokens/s", "speed-up", "held-out FVU")
    for name, rate in results.items():
        ratio = "" if name == "trainer" else f"{results['trainer'] / rate:.2f}x"
        log.info("%-22s %12.0f %10s %14.4f", name, rate, ratio, fvus[name])


if __name__ == "__main__":
    main()
