"""SAE quality at equal tokens: refusal_lab's TopK trainer vs SAELens's TopK and EleutherAI sparsify's.

    pip install -e '.[bench]'           # sae-lens and eai-sparsify (not `sparsify`, an unrelated package)
    python -m refusal_lab 'stages=[collect]'                    # the organism's store, in artifacts/collect/
    python benchmarks/bench_sae_quality.py --store artifacts/collect/<fingerprint>.zarr
    python benchmarks/bench_sae_quality.py --data llama         # a random-init Llama's activations only
    python benchmarks/bench_sae_quality.py --store ... --variants rl:1.0,rl:0.3 --lrs 0.004,0.008  # init/lr sweep

Data sets: `organism` (the store's `residuals_2`, the default collect) and `llama` (residuals_2
of a 4-layer random-init LlamaForCausalLM, d_model 128, on random token sequences). Both go
through refusal_lab's own token plan: the held-out split, the token filters, the input scale
(E|x|^2 = d_model) and the seeded shuffled stream, so every trainer sees the *same* normalised
batches in the same order and is scored on the same held-out tokens.

Trainers (expansion 8, k 32, batch 1024, Adam (0.9, 0.999) at the same peak rate with
refusal_lab's schedule: 5% warmup, linear decay over the last 20%; b_dec starts at the data mean
for all three, as refusal_lab and sparsify do):

* `rl` refusal_lab's `HookTrainer` as shipped (sparse TopK step, AuxK, encoder initialised as
  ENCODER_INIT_SCALE x the unit-norm decoder rows, decoder at `decoder_lr_scale` x the rate);
  `rl:<c>` with the encoder at c x the decoder rows; `--decoder-lr-scale` overrides the multiplier
  (1 = one rate for all parameters, as before issue 8).
* `saelens` SAELens `TopKTrainingSAE` with its own init (kaiming-uniform decoder scaled to norm
  0.1, encoder = its transpose), its own loss (MSE + TopK aux loss) and its training loop's
  gradient clipping at norm 1 and dead-feature window.
* `sparsify` sparsify `SparseCoder` with its own init (nn.Linear encoder, decoder = its
  normalised copy), FVU + AuxK (1/32) loss, decoder-gradient projection and renormalisation.

Printed: per data set, budget and trainer, held-out FVU and dead fraction (latents active on
no held-out token), mean and standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from refusal_lab.sae.config import SaeConfig
from refusal_lab.sae.data import HookStats, WindowStream, block_tokens, hook_stats, plan_tokens, read_rows
from refusal_lab.sae.source import ActivationSource, ArraySource, open_store
from refusal_lab.sae.train import HookTrainer, lr_factor

log = logging.getLogger("bench_sae_quality")

HOOK = "residuals_2"


@dataclass
class Prepared:
    """Normalised training batches (per seed) and held-out rows of one data set."""

    name: str
    d_in: int
    stats: HookStats
    held_out: torch.Tensor  # [N, D], normalised
    n_train: int
    source: ActivationSource
    cfg: SaeConfig
    plan_rows: np.ndarray
    plan_weights: np.ndarray | None

    def batches(self, steps: int, seed: int) -> list[torch.Tensor]:
        stream = WindowStream(
            self.source, [HOOK], self.plan_rows, self.plan_weights, self.cfg.batch_size, self.cfg.buffer_tokens,
            block_tokens(self.source, self.cfg), seed,
        )  # fmt: skip
        out = []
        it = stream.batches(0)
        for step, batch in it:
            if step >= steps:
                break
            x = torch.from_numpy(batch[0])
            keep = torch.isfinite(x).all(1) & (x.norm(dim=1) <= self.stats.max_norm)
            out.append(x[keep] * self.stats.scale)
        it.close()
        return out


def prepare(name: str, source: ActivationSource, cfg: SaeConfig) -> Prepared:
    plan = plan_tokens(source, cfg, 0)
    stats = hook_stats(source, [HOOK], plan.train_rows, cfg)[HOOK]
    blocks = [(s, e, r) for s, e, r in _blocks(plan.eval_rows, source.n_tokens, block_tokens(source, cfg))]
    held = torch.from_numpy(read_rows(source, [HOOK], blocks)[0])
    held = held[torch.isfinite(held).all(1) & (held.norm(dim=1) <= stats.max_norm)] * stats.scale
    log.info("%s: d_in %d, %d training tokens, %d held-out tokens", name, source.d_model, len(plan.train_rows),
             len(held))  # fmt: skip
    return Prepared(name, source.d_model, stats, held, len(plan.train_rows), source, cfg, plan.train_rows,
                    plan.train_weights)  # fmt: skip


def _blocks(rows: np.ndarray, n_tokens: int, size: int):
    from refusal_lab.sae.data import blocks_of

    return blocks_of(rows, n_tokens, size)


def llama_source(n_seqs: int = 160, seq_len: int = 128, seed: int = 0) -> ArraySource:
    """residuals_2 of a random-init 4-layer Llama (d_model 128) on random token sequences, in the store's layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=2000, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=seq_len,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 2000, (n_seqs, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2]  # input of layers[2]
    acts = hidden.reshape(-1, 128).numpy().astype(np.float32)
    n = n_seqs * seq_len
    tokens = {
        "sample_id": np.repeat(np.arange(n_seqs), seq_len).astype(np.int32),
        "position": np.tile(np.arange(seq_len), n_seqs).astype(np.int32),
        "phase": np.zeros(n, dtype=np.int8),
        "token_id": ids.flatten().numpy().astype(np.int32),
    }
    samples = {
        "sample_id": np.arange(n_seqs),
        "prompt": [f"random sequence {i}" for i in range(n_seqs)],
        "label": ["random"] * n_seqs,
        "category": ["random"] * n_seqs,
    }
    return ArraySource({HOOK: acts}, tokens, samples, fingerprint="random-llama")


# ---- trainers: each returns (step(x), encode_decode(x) -> (x_hat, active [N, F] bool)) ----

Trainer = tuple[Callable[[torch.Tensor], object], Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]


def schedule(step: int, total: int, cfg: SaeConfig) -> float:
    return lr_factor(step, total, cfg.lr_warmup_fraction, cfg.lr_decay, cfg.lr_decay_fraction)


def rl_trainer(data: Prepared, cfg: SaeConfig, total: int, seed: int, encoder_scale: float | None) -> Trainer:
    unit = HookStats(data.stats.median_norm, math.inf, data.stats.mean * data.stats.scale, 1.0, 0, 0)
    tr = HookTrainer(HOOK, data.d_in, cfg, unit, data.n_train, total, torch.device("cpu"), seed)
    if encoder_scale is not None:
        with torch.no_grad():
            tr.sae.encoder.copy_(tr.sae.W_dec * encoder_scale)

    def encode_decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = tr.sae.encode_sparse(x)
        active = torch.zeros(x.shape[0], tr.sae.d_sae, dtype=torch.bool)
        active[codes.rows, codes.cols] = codes.vals > 0
        return tr.sae.decode_sparse(codes), active

    return (lambda x: tr.train_step(x)), encode_decode


def saelens_trainer(data: Prepared, cfg: SaeConfig, total: int, seed: int) -> Trainer:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(seed)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=data.d_in, d_sae=cfg.expansion_factor * data.d_in, k=cfg.k, device="cpu")
    )
    with torch.no_grad():
        sae.b_dec.copy_(torch.from_numpy(data.stats.mean * data.stats.scale))
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    state = {"step": 0}
    window = 1000  # SAELens's default dead_feature_window (forward passes)

    def step(x: torch.Tensor) -> None:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * schedule(state["step"], total, cfg)
        out = sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=since_fired > window,
                           n_training_steps=state["step"], is_logging_step=False)
        )  # fmt: skip
        with torch.no_grad():
            fired = out.feature_acts.bool().any(0)
            since_fired.add_(1)
            since_fired[fired] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        state["step"] += 1

    def encode_decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = sae.encode(x)
        return sae.decode(feats), feats > 0

    return step, encode_decode


def sparsify_trainer(data: Prepared, cfg: SaeConfig, total: int, seed: int) -> Trainer:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    sae = SparseCoder(data.d_in, SparseCoderConfig(expansion_factor=cfg.expansion_factor, k=cfg.k))
    with torch.no_grad():
        sae.b_dec.copy_(torch.from_numpy(data.stats.mean * data.stats.scale))
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    state = {"step": 0}
    dead_tokens = 10_000_000  # sparsify's default dead_feature_threshold

    def step(x: torch.Tensor) -> None:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * schedule(state["step"], total, cfg)
        out = sae(x, dead_mask=since_fired > dead_tokens)
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[out.latent_indices.flatten()] = 0
        (out.fvu + (1 / 32) * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        state["step"] += 1

    def encode_decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top_acts, top_indices, _ = sae.encode(x)
        active = torch.zeros(x.shape[0], sae.num_latents, dtype=torch.bool)
        active.scatter_(1, top_indices, top_acts > 0)
        return sae.decode(top_acts, top_indices), active

    return step, encode_decode


@torch.no_grad()
def evaluate(encode_decode, held: torch.Tensor) -> tuple[float, float]:
    """(held-out FVU, share of latents active on no held-out token)."""
    err = 0.0
    fired = None
    for start in range(0, len(held), 4096):
        x = held[start : start + 4096]
        x_hat, active = encode_decode(x)
        err += float((x_hat.float() - x).double().pow(2).sum())
        fired = active.any(0) if fired is None else fired | active.any(0)
    variance = float((held.double() - held.double().mean(0)).pow(2).sum())
    assert fired is not None
    return err / variance, float((~fired).double().mean())


def run_one(
    data: Prepared, variant: str, lr: float, steps: int, seed: int, decoder_lr_scale: float
) -> tuple[float, float, float]:
    cfg = SaeConfig(lr=lr, train_tokens=steps * 1024, epochs=None, decoder_lr_scale=decoder_lr_scale)
    batches = data.batches(steps, seed)
    if variant.startswith("rl"):
        scale = float(variant.split(":")[1]) if ":" in variant else None
        step, encode_decode = rl_trainer(data, cfg, steps, seed, scale)
    elif variant == "saelens":
        step, encode_decode = saelens_trainer(data, cfg, steps, seed)
    elif variant == "sparsify":
        step, encode_decode = sparsify_trainer(data, cfg, steps, seed)
    else:
        raise ValueError(f"--variants: unknown {variant!r}; valid: rl, rl:<encoder scale>, saelens, sparsify")
    t0 = time.perf_counter()
    for x in batches:
        step(x)
    seconds = time.perf_counter() - t0
    fvu, dead = evaluate(encode_decode, data.held_out)
    return fvu, dead, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="the organism's activation store (default collect)")
    parser.add_argument("--data", default="organism,llama", help="comma list: organism, llama")
    parser.add_argument("--variants", default="rl,saelens,sparsify")
    parser.add_argument("--lrs", default="0.004", help="comma list of peak learning rates")
    parser.add_argument("--steps", default="45,450", help="comma list of step budgets (1024 tokens each)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decoder-lr-scale", type=float, default=SaeConfig().decoder_lr_scale, help="rl trainers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("refusal_lab").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = SaeConfig()
    datasets = []
    for name in args.data.split(","):
        if name == "organism":
            if args.store is None:
                parser.error("--store is needed for the organism data set")
            datasets.append(prepare(name, open_store(args.store), cfg))
        elif name == "llama":
            datasets.append(prepare(name, llama_source(), cfg))
        else:
            parser.error(f"--data: unknown {name!r}; valid: organism, llama")
    rows = []
    for data in datasets:
        for steps in (int(s) for s in args.steps.split(",")):
            for lr in (float(v) for v in args.lrs.split(",")):
                for variant in args.variants.split(","):
                    results = [
                        run_one(data, variant, lr, steps, seed, args.decoder_lr_scale) for seed in range(args.seeds)
                    ]
                    fvus, deads, secs = zip(*results, strict=True)
                    row = (data.name, steps, lr, variant, statistics.mean(fvus), _std(fvus), statistics.mean(deads),
                           _std(deads), statistics.mean(secs))  # fmt: skip
                    rows.append(row)
                    log.info("%-8s %4d steps lr %.4f %-10s FVU %.4f ± %.4f  dead %.3f ± %.3f  (%.1f s)", *row)
    log.info("\n| data | steps | lr | trainer | held-out FVU (mean ± std, %d seeds) | dead fraction |", args.seeds)
    log.info("|---|---|---|---|---|---|")
    for name, steps, lr, variant, f, fs, d, ds, _ in rows:
        log.info("| %s | %d | %g | %s | %.4f ± %.4f | %.3f ± %.3f |", name, steps, lr, variant, f, fs, d, ds)


def _std(values) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
