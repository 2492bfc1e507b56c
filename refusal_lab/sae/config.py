"""Schema of the `sae` config group (owned by the sae stage).

Imported by `refusal_lab.config` while that module is still loading, so nothing here may
import `refusal_lab.config` (ConfigError comes from refusal_lab.errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from refusal_lab.devices import Device
from refusal_lab.errors import ConfigError


class Architecture(StrEnum):
    """Sparsity mechanism.

    Member names are lowercase on purpose (in every enum here): OmegaConf 2.3 matches YAML values
    against member *names*.
    """

    topk = "topk"  # k largest pre-activations per token, ReLU on them (SAELens "topk")
    relu = "relu"  # ReLU + L1 penalty (SAELens "standard")
    batchtopk = "batchtopk"  # k * batch largest over the batch; saved as JumpReLU with its threshold ("jumprelu")


class LrDecay(StrEnum):
    none = "none"  # constant after warmup
    linear = "linear"  # linear to 0 over the last `lr_decay_fraction` of training
    cosine = "cosine"  # cosine to 0 over the last `lr_decay_fraction` of training


class SaeDtype(StrEnum):
    auto = "auto"  # bfloat16 autocast for the encoder matmul on CUDA, float32 on CPU
    float32 = "float32"
    bfloat16 = "bfloat16"  # bf16 autocast for the encoder matmul; weights and optimizer stay float32


class TokenPhase(StrEnum):
    """The store's token phases (tokens/phase: 0, 1, 2)."""

    prompt = "prompt"
    post_instruction = "post_instruction"  # chat-template tokens after the user message
    generated = "generated"


class CeTargets(StrEnum):
    """Which positions the CE-loss-recovered and KL metrics score."""

    response = "response"  # positions that predict a generated token: the model's own response
    all = "all"  # every spliced position (prompt text too), as SAELens scores pretraining text


class Balance(StrEnum):
    none = "none"  # tokens as stored
    label_category = "label_category"  # every label equal mass; within a label, categories equal mass


@dataclass
class TokenFilterConfig:
    """Which stored tokens an SAE trains and is evaluated on."""

    drop_bos: bool = True
    """Drop position 0 (BOS): its activations are attention-sink outliers no dictionary should spend latents on."""
    phases: list[TokenPhase] = field(
        default_factory=lambda: [TokenPhase.prompt, TokenPhase.post_instruction, TokenPhase.generated]
    )
    """Token phases to use; drop post_instruction to leave the chat-template tokens out."""
    outlier_factor: float | None = 10.0
    """Drop tokens whose activation norm exceeds this many times the hook's median norm (None keeps all)."""


OUTPUT_NEUTRAL_FIELDS = ("log_every", "checkpoint_every", "cpu_threads", "hooks")
"""SaeConfig fields that change how training runs or reports, not the SAEs it produces: they are
left out of the SAE artifacts' fingerprint, so changing one never retrains a finished SAE
(cpu_threads can move float sums in the last bit, which no metric shows; hooks only picks which of
the folder's SAEs a job trains, refusal_lab.stage_jobs)."""


@dataclass
class SaeConfig:
    """Sparse-autoencoder training settings (one SAE per hook point)."""

    architecture: Architecture = Architecture.topk
    """topk | relu (ReLU + L1) | batchtopk (saved as JumpReLU)."""
    expansion_factor: int = 8
    """d_sae = expansion_factor * d_model."""
    k: int = 32
    """Active latents per token (topk; batchtopk: the batch average)."""
    l1_coefficient: float = 3.0
    """relu: L1 weight as in SAELens (sum|x - x_hat|^2 + l1_coefficient * sum|f|_1, inputs at E|x|^2 = d_model).
    ReLU SAEs need far more steps than TopK ones (tens of epochs on the organism's store)."""
    auxk_alpha: float = 1 / 32
    """topk/batchtopk: weight of the AuxK loss that revives dead latents (0 turns it off)."""
    auxk_k: int = 0
    """Latents the AuxK loss uses; 0 = d_model // 2 (as in Gao et al. 2024)."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens is dead for AuxK (capped at one epoch's tokens)."""
    lr: float = 4e-3
    """Adam learning rate (peak); for d_sae in the tens of thousands use ~2e-4 / sqrt(d_sae / 16384) (Gao et al.)."""
    decoder_lr_scale: float = 4.0
    """The decoder's learning rate as a multiple of `lr`. Its rows are kept at unit norm, so a step of size lr
    turns them by about lr radians; SAELens's free-norm decoder (rows near 0.1) turns ~10x faster. With 1 the
    SAE learned slower per token than SAELens and sparsify; 3-5 matched or beat both
    (benchmarks/bench_sae_quality.py; numbers in the README)."""
    lr_warmup_fraction: float = 0.05
    """Share of the steps with a linear warmup from 0."""
    lr_decay: LrDecay = LrDecay.linear
    """none | linear | cosine: how the rate falls to 0 over the last `lr_decay_fraction` of the steps."""
    lr_decay_fraction: float = 0.2
    """Share of the steps, at the end, over which the rate decays."""
    batch_size: int = 1024
    """Tokens per optimizer step."""
    train_tokens: int | None = None
    """Training tokens per SAE; set exactly one of train_tokens and epochs."""
    epochs: float | None = 4.0
    """Passes over the training tokens (fractions allowed); set exactly one of train_tokens and epochs."""
    dtype: SaeDtype = SaeDtype.auto
    """auto (bf16 autocast on CUDA, float32 on CPU) | float32 | bfloat16."""
    device: Device = Device.auto
    """cuda, cpu, or auto (cuda when available)."""
    cpu_threads: int = 1
    """torch intra-op threads while the stage runs on CPU (0 = leave torch's setting). Small SAE steps are
    dominated by per-op overhead, and OpenMP threads that spin-wait collapse when the cores are shared:
    a d_model 128 step took 34 ms on 1 thread and 557 ms on 2 on a busy 2-core machine."""
    held_out_share: float = 0.1
    """Share of samples (prompts, stratified by label) never trained on; every metric is computed on them."""
    buffer_tokens: int = 65536
    """Shuffle-window size in tokens; host memory ~ 2 (prefetch) x hooks_per_group x buffer_tokens x d_model x 4 B."""
    read_block_tokens: int = 4096
    """Contiguous rows read from the store at a time; windows are made of randomly chosen blocks."""
    hooks: list[str] = field(default_factory=list)
    """Train only these hook points (one SAE per array task: 'sae.hooks=[residuals_0],[residuals_1]'); empty: all."""
    hooks_per_group: int = 8
    """Hook points trained together from one pass over the store. Each holds its SAE, gradients and Adam state on
    the device, ~16 x d_model x d_sae bytes (8.6 GB at d_model 4096, 16x): use 4 or fewer for 7B models."""
    filters: TokenFilterConfig = field(default_factory=TokenFilterConfig)
    """Token filters (BOS, phases, norm outliers)."""
    balance: Balance = Balance.none
    """none | label_category: sample tokens so labels, and categories within a label, carry equal weight."""
    normalize_activations: bool = True
    """Train on activations scaled to E|x|^2 = d_model; the scale is folded into the saved biases (exact)."""
    stats_tokens: int = 65536
    """Training tokens read (evenly spread) for the median norm, the mean (b_dec init) and the scale."""
    checkpoint_every: int = 500
    """Steps between checkpoints (weights, optimizer, schedule, data position); 0 = none."""
    eval_tokens: int = 262144
    """At most this many held-out tokens (whole samples) for the metrics."""
    dense_threshold: float = 0.1
    """A latent active on more than this share of held-out tokens counts as dense (dead: active on none)."""
    ce_max_samples: int = 64
    """Held-out prompts whose token sequences are run through the model for CE-loss recovered and KL (0 = skip)."""
    ce_targets: CeTargets = CeTargets.response
    """response | all: where CE and KL are scored. A chat model is judged by its response; prompt text may be
    unpredictable to it (the organism, trained on responses only, scores ~10 nats there, worse than uniform,
    so any blurring spliced in "improves" CE and ce_recovered exceeds 1)."""
    ce_batch_size: int = 8
    """Sequences per forward pass for the CE metrics."""
    log_every: int = 50
    """Steps between training-log lines (and tracker calls)."""

    def __post_init__(self) -> None:
        errors: list[str] = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                errors.append(message)

        check(self.expansion_factor >= 1, f"sae.expansion_factor: {self.expansion_factor} must be >= 1")
        check(self.k >= 1, f"sae.k: {self.k} must be >= 1")
        check(self.l1_coefficient >= 0, f"sae.l1_coefficient: {self.l1_coefficient} must be >= 0")
        check(self.auxk_alpha >= 0, f"sae.auxk_alpha: {self.auxk_alpha} must be >= 0 (0 turns AuxK off)")
        check(self.auxk_k >= 0, f"sae.auxk_k: {self.auxk_k} must be >= 0 (0 = d_model // 2)")
        check(self.dead_tokens > 0, f"sae.dead_tokens: {self.dead_tokens} must be > 0")
        check(self.lr > 0, f"sae.lr: {self.lr} must be > 0")
        check(self.decoder_lr_scale > 0, f"sae.decoder_lr_scale: {self.decoder_lr_scale} must be > 0")
        for name in ("lr_warmup_fraction", "lr_decay_fraction"):
            value = getattr(self, name)
            check(0 <= value <= 1, f"sae.{name}: {value} must be in [0, 1]")
        check(
            self.lr_warmup_fraction + self.lr_decay_fraction <= 1,
            f"sae.lr_warmup_fraction + sae.lr_decay_fraction: {self.lr_warmup_fraction} + {self.lr_decay_fraction} "
            "exceeds 1",
        )
        check(self.batch_size > 0, f"sae.batch_size: {self.batch_size} must be > 0")
        check(
            (self.train_tokens is None) != (self.epochs is None),
            f"sae.train_tokens / sae.epochs: {self.train_tokens} / {self.epochs}; set exactly one, the other null",
        )
        check(self.train_tokens is None or self.train_tokens > 0, f"sae.train_tokens: {self.train_tokens} must be > 0")
        check(self.epochs is None or self.epochs > 0, f"sae.epochs: {self.epochs} must be > 0")
        check(0 < self.held_out_share < 1, f"sae.held_out_share: {self.held_out_share} must be in (0, 1)")
        check(
            self.buffer_tokens >= self.batch_size,
            f"sae.buffer_tokens: {self.buffer_tokens} must be >= sae.batch_size ({self.batch_size})",
        )
        check(self.read_block_tokens > 0, f"sae.read_block_tokens: {self.read_block_tokens} must be > 0")
        check(self.cpu_threads >= 0, f"sae.cpu_threads: {self.cpu_threads} must be >= 0 (0 = torch's setting)")
        check(self.hooks_per_group >= 1, f"sae.hooks_per_group: {self.hooks_per_group} must be >= 1")
        check(len(self.filters.phases) > 0, "sae.filters.phases: empty; valid: prompt, post_instruction, generated")
        check(
            len(set(self.filters.phases)) == len(self.filters.phases),
            f"sae.filters.phases: {[p.value for p in self.filters.phases]} lists a phase twice",
        )
        check(
            self.filters.outlier_factor is None or self.filters.outlier_factor > 1,
            f"sae.filters.outlier_factor: {self.filters.outlier_factor} must be > 1 or null (keep all)",
        )
        check(self.stats_tokens >= 16, f"sae.stats_tokens: {self.stats_tokens} must be >= 16")
        check(self.checkpoint_every >= 0, f"sae.checkpoint_every: {self.checkpoint_every} must be >= 0 (0 = none)")
        check(self.eval_tokens > 0, f"sae.eval_tokens: {self.eval_tokens} must be > 0")
        check(0 < self.dense_threshold <= 1, f"sae.dense_threshold: {self.dense_threshold} must be in (0, 1]")
        check(self.ce_max_samples >= 0, f"sae.ce_max_samples: {self.ce_max_samples} must be >= 0 (0 = skip)")
        check(self.ce_batch_size > 0, f"sae.ce_batch_size: {self.ce_batch_size} must be > 0")
        check(self.log_every > 0, f"sae.log_every: {self.log_every} must be > 0")
        if errors:
            raise ConfigError("; ".join(errors))
