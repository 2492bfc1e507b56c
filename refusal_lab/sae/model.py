"""The sparse autoencoder: TopK, ReLU (+L1) and BatchTopK (JumpReLU at inference), with a sparse training path.

Reads and writes nothing; `refusal_lab.sae.saelens` saves and loads it.

Parameters follow SAELens's meaning (x_hat = f(x - b_dec) @ W_dec + b_dec), but the encoder is
stored row-per-latent like the decoder (`encoder` [F, D] = W_enc transposed): the sparse
backward then writes whole contiguous rows, and "encoder initialised as (a multiple of) the
decoder transpose" is a plain copy. `W_enc` gives the SAELens-shaped [D, F] view.

Training never forms the dense code matrix. The encoder matmul is dense (it has to score
every latent), but the selected pre-activations carry a custom backward whose weight
gradient is a sparse x dense product over the E selected entries (E = N*k for TopK), and
the decoder is an `embedding_bag` over the selected rows whose backward again touches only
those rows. A dense step costs about 6 matmuls of N x D x F; this one costs one, plus
O(E x D) work.

Shape letters: N tokens, D d_in, F d_sae, E selected (token, latent) entries, K k.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from refusal_lab.sae.config import Architecture

ENCODER_INIT_SCALE = 0.5
"""Encoder rows start as this multiple of the (unit) decoder rows.

At 1.0 (the encoder exactly the decoder transpose) each of the k selected latents starts at the
full projection <d, x>, so with k overlapping directions the first reconstructions overshoot and
the first steps go to shrinking them: on the organism's store the SAE then reached a held-out FVU
of 0.112 after 45 steps, where SAELens (decoder rows at norm 0.1) and sparsify (nn.Linear init,
about 0.58 here) reach 0.06. Chosen by measurement with benchmarks/bench_sae_quality.py (numbers
in the README's SAE section)."""


@dataclass
class SparseCodes:
    """Nonzero-candidate latents of N tokens in COO form, rows ascending (one bag per token)."""

    rows: torch.Tensor  # [E] token index
    cols: torch.Tensor  # [E] latent index
    vals: torch.Tensor  # [E] activation
    n: int

    def offsets(self) -> torch.Tensor:
        """Start of each token's entries ([N]), as embedding_bag wants them."""
        counts = torch.bincount(self.rows, minlength=self.n)
        return torch.cumsum(counts, 0) - counts

    def dense(self, d_sae: int) -> torch.Tensor:
        out = torch.zeros(self.n, d_sae, dtype=self.vals.dtype, device=self.vals.device)
        out[self.rows, self.cols] = self.vals
        return out


def scatter_rows(cols: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor, dense_ND: torch.Tensor, n_out: int):
    """out[cols[e]] += vals[e] * dense_ND[rows[e]] for every entry e, as one CSR x dense product ([n_out, D])."""
    order = torch.argsort(cols)
    counts = torch.bincount(cols, minlength=n_out)
    crow = torch.zeros(n_out + 1, dtype=torch.long, device=cols.device)
    crow[1:] = torch.cumsum(counts, 0)
    with warnings.catch_warnings():  # CSR x dense is all we use of sparse tensors; its "beta" notice is noise
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        matrix = torch.sparse_csr_tensor(
            crow, rows[order], vals[order].to(dense_ND.dtype), (n_out, dense_ND.shape[0]), check_invariants=False
        )
    return matrix @ dense_ND


def gather_dot(codes: SparseCodes, offsets: torch.Tensor, a_ND: torch.Tensor, b_FD: torch.Tensor) -> torch.Tensor:
    """<a_ND[rows[e]], b_FD[cols[e]]> for every entry ([E]).

    This is exactly the gradient of embedding_bag's per-sample weights, so we let that
    kernel compute it: it never materialises the [E, D] gather.
    """
    with torch.enable_grad():
        weights = torch.zeros(codes.cols.shape[0], dtype=b_FD.dtype, device=b_FD.device, requires_grad=True)
        bags = F.embedding_bag(codes.cols, b_FD.detach(), offsets, mode="sum", per_sample_weights=weights)
        (grad,) = torch.autograd.grad(bags, weights, a_ND.to(b_FD.dtype))
    return grad


class SelectedPreacts(torch.autograd.Function):
    """Identity on already-computed selected pre-activations; backward gives the encoder's sparse gradients."""

    @staticmethod
    def forward(ctx, pre_E, x_ND, b_dec, encoder_FD, b_enc, rows, cols):  # type: ignore[override]
        ctx.save_for_backward(x_ND, b_dec, encoder_FD, rows, cols)
        return pre_E.clone()

    @staticmethod
    def backward(ctx, grad_E):  # type: ignore[override]
        x_ND, b_dec, encoder_FD, rows, cols = ctx.saved_tensors
        n_latents = encoder_FD.shape[0]
        grad_b_enc = torch.zeros(n_latents, dtype=grad_E.dtype, device=grad_E.device).index_add_(0, cols, grad_E)
        grad_encoder = scatter_rows(cols, rows, grad_E, x_ND - b_dec, n_latents)
        # d pre[n, f] / d b_dec = -encoder[f]; summed over the selected entries that is -grad_b_enc @ encoder.
        grad_b_dec = -(grad_b_enc @ encoder_FD)
        return None, None, grad_b_dec, grad_encoder, grad_b_enc, None, None


class SparseDecode(torch.autograd.Function):
    """sum_e vals[e] * W_dec[cols[e]] per token; backward touches only the selected decoder rows."""

    @staticmethod
    def forward(ctx, vals_E, w_dec_FD, rows, cols, offsets, n):  # type: ignore[override]
        ctx.save_for_backward(vals_E, w_dec_FD, rows, cols, offsets)
        ctx.n = n
        return F.embedding_bag(cols, w_dec_FD, offsets, mode="sum", per_sample_weights=vals_E.to(w_dec_FD.dtype))

    @staticmethod
    def backward(ctx, grad_ND):  # type: ignore[override]
        vals_E, w_dec_FD, rows, cols, offsets = ctx.saved_tensors
        codes = SparseCodes(rows, cols, vals_E, ctx.n)
        grad_vals = gather_dot(codes, offsets, grad_ND, w_dec_FD) if ctx.needs_input_grad[0] else None
        grad_w = scatter_rows(cols, rows, vals_E, grad_ND, w_dec_FD.shape[0]) if ctx.needs_input_grad[1] else None
        return grad_vals, grad_w, None, None, None, None


@dataclass
class TrainOutput:
    x_hat: torch.Tensor  # [N, D]
    codes: SparseCodes
    aux_recon: torch.Tensor | None  # [N, D] dead latents' reconstruction of the residual (AuxK)
    l1: torch.Tensor | None  # [N] L1 norm of the codes (relu)


class Sae(nn.Module):
    """One sparse autoencoder; `architecture` picks the sparsity mechanism."""

    threshold: torch.Tensor

    def __init__(self, d_in: int, d_sae: int, architecture: Architecture, k: int = 32) -> None:
        super().__init__()
        if architecture in (Architecture.topk, Architecture.batchtopk) and not 1 <= k <= d_sae:
            raise ValueError(f"sae.k: {k} must be in [1, d_sae={d_sae}]")
        self.d_in, self.d_sae, self.architecture, self.k = d_in, d_sae, architecture, k
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.encoder = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # JumpReLU threshold used at inference by batchtopk SAEs (per latent, as SAELens stores it).
        self.register_buffer("threshold", torch.zeros(d_sae))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows; encoder = ENCODER_INIT_SCALE x decoder transpose; zero biases."""
        w = torch.randn(self.d_sae, self.d_in, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.encoder.copy_(self.W_dec * ENCODER_INIT_SCALE)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @property
    def W_enc(self) -> torch.Tensor:
        """SAELens-shaped encoder [D, F] (a view)."""
        return self.encoder.T

    # ---- inference ----

    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        return F.linear(x_ND - self.b_dec, self.encoder, self.b_enc)

    def select(self, pre_NF: torch.Tensor) -> SparseCodes:
        """Inference-time selection (batchtopk uses its JumpReLU threshold, as the saved SAE does)."""
        n = pre_NF.shape[0]
        if self.architecture == Architecture.topk:
            vals, idx = pre_NF.topk(self.k, dim=1, sorted=False)
            rows = torch.arange(n, device=pre_NF.device).repeat_interleave(self.k)
            return SparseCodes(rows, idx.flatten(), vals.flatten().relu(), n)
        mask = pre_NF > 0
        if self.architecture == Architecture.batchtopk:
            mask &= pre_NF > self.threshold
        rows, cols = mask.nonzero(as_tuple=True)
        return SparseCodes(rows, cols, pre_NF[rows, cols], n)

    def encode_sparse(self, x_ND: torch.Tensor) -> SparseCodes:
        return self.select(self.pre_acts(x_ND))

    def decode_sparse(self, codes: SparseCodes) -> torch.Tensor:
        bags = F.embedding_bag(codes.cols, self.W_dec, codes.offsets(), mode="sum", per_sample_weights=codes.vals)
        return bags + self.b_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations [..., F] (SAELens's `encode`)."""
        flat = x.reshape(-1, self.d_in)
        return self.encode_sparse(flat).dense(self.d_sae).reshape(*x.shape[:-1], self.d_sae)

    def decode(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of x [..., D]."""
        flat = x.reshape(-1, self.d_in)
        return self.decode_sparse(self.encode_sparse(flat)).reshape(x.shape)

    # ---- training ----

    def train_forward(
        self,
        x_ND: torch.Tensor,
        autocast_dtype: torch.dtype | None = None,
        dead_F: torch.Tensor | None = None,
        auxk_k: int = 0,
    ) -> TrainOutput:
        """Reconstruction with gradients (sparse path for topk/batchtopk, dense for relu)."""
        n = x_ND.shape[0]
        if self.architecture == Architecture.relu:
            acts = self.pre_acts(x_ND).relu()
            rows, cols = acts.detach().nonzero(as_tuple=True)
            codes = SparseCodes(rows, cols, acts.detach()[rows, cols], n)
            return TrainOutput(self.decode(acts), codes, None, acts.sum(-1))
        with torch.no_grad():
            autocast = torch.autocast(x_ND.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
            with autocast:
                pre = F.linear(x_ND - self.b_dec, self.encoder, self.b_enc)
            if self.architecture == Architecture.topk:
                idx = pre.topk(self.k, dim=1, sorted=False).indices
                rows = torch.arange(n, device=x_ND.device).repeat_interleave(self.k)
                cols = idx.flatten()
            else:  # batchtopk: the k * N largest positive pre-activations anywhere in the batch
                flat = pre.relu().flatten().topk(self.k * n, sorted=False).indices.sort().values
                rows, cols = flat // self.d_sae, flat % self.d_sae
            pre_sel = pre[rows, cols].to(self.encoder.dtype)
        codes, x_hat = self._sparse_decode(pre_sel, x_ND, rows, cols, n)
        x_hat = x_hat + self.b_dec
        aux = None
        if dead_F is not None and auxk_k > 0 and bool(dead_F.any()):
            with torch.no_grad():
                k_aux = min(auxk_k, int(dead_F.sum()))
                idx = pre.masked_fill(~dead_F, -math.inf).topk(k_aux, dim=1, sorted=False).indices
                aux_rows = torch.arange(n, device=x_ND.device).repeat_interleave(k_aux)
                aux_cols = idx.flatten()
                aux_pre = pre[aux_rows, aux_cols].to(self.encoder.dtype)
            _, aux = self._sparse_decode(aux_pre, x_ND, aux_rows, aux_cols, n)
        return TrainOutput(x_hat, codes, aux, None)

    def _sparse_decode(self, pre_E, x_ND, rows, cols, n) -> tuple[SparseCodes, torch.Tensor]:
        vals = SelectedPreacts.apply(pre_E, x_ND, self.b_dec, self.encoder, self.b_enc, rows, cols).relu()
        codes = SparseCodes(rows, cols, vals, n)
        out = SparseDecode.apply(vals, self.W_dec, rows, cols, codes.offsets(), n)
        return codes, out

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each (unit) decoder row, so a step mostly rotates it."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(-1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on x * scale act on x itself (exact: TopK/threshold choices are scale-free).

        Biases and the threshold shrink by `scale`; encoder and unit decoder rows stay, so
        feature activations come out in the activations' own units.
        """
        self.b_enc /= scale
        self.b_dec /= scale
        self.threshold /= scale
