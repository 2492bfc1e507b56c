"""Shared helpers of the circuits integration tests: untrained SAEs built in the test, random prompts, a metric.

Fixtures stay in each test module, one line each over the loaders here (importing fixtures would shadow
their use as arguments for ruff)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from refusal_lab.circuits.batches import PromptBatch, make_batches
from refusal_lab.circuits.config import MetricKind
from refusal_lab.circuits.metric import MetricSpec, refusal_metric
from refusal_lab.sae.config import Architecture
from refusal_lab.sae.model import Sae

HOOKS = ["residuals_1", "mlp_1", "attention_2"]
N_POST = 4


def load_tiny(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def tiny_pad_id(path: Path) -> int:
    return int(AutoTokenizer.from_pretrained(path).eos_token_id)


def small_batch(pad_id: int) -> PromptBatch:
    return make_batches(random_prompts(5, seed=1), N_POST, pad_id, batch_size=8)[0]


def random_saes(d_model: int, d_sae: int = 128, k: int = 8, seed: int = 0) -> dict[str, Sae]:
    """Untrained SAEs: their reconstructions are far from the activations (a bad SAE)."""
    gen = torch.Generator().manual_seed(seed)
    saes = {}
    for hook in HOOKS:
        sae = Sae(d_model, d_sae, Architecture.topk, k=k)
        sae.reset_parameters(gen)
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.1, generator=gen)
        saes[hook] = sae.requires_grad_(False)
    return saes


def random_prompts(n: int, seed: int, lo: int = 6, hi: int = 14) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=gen))
        out.append([1] + torch.randint(3, 32000, (length - 1,), generator=gen).tolist())
    return out


def capture_layer_input(model, layer: int, out: dict):
    """A pre-hook registered after the splice's, so it sees the spliced (edited) residual."""

    def hook(_module, args, kwargs):
        out["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    return model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)


def first_token_metric(logits, batch):
    spec = MetricSpec(MetricKind.first_token_score, (306, 1724))
    return refusal_metric(logits, batch, spec)
