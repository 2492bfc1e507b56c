"""Save and load SAEs in the SAELens folder layout.

Writes, per hook point folder: `cfg.json`, `sae_weights.safetensors` (W_enc [d_in, d_sae],
W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in], and `threshold` [d_sae] for JumpReLU) and
`sparsity.safetensors` (log10 feature density on held-out tokens, key `sparsity`), each via a
temp file and a rename. Reads the same.

Loading:

    from refusal_lab.sae.saelens import load_sae
    sae = load_sae("artifacts/sae/<fp>/residuals_3")          # refusal_lab.sae.model.Sae
    x_hat = sae(acts)                                           # acts [..., d_in], raw activations

    from sae_lens import SAE                                    # SAELens >= 6
    sae = SAE.load_from_disk("artifacts/sae/<fp>/residuals_3")

cfg.json follows SAELens 6 (`metadata` holds model and hook; `sae_lens_version` selects that
reader) and repeats the hook keys flat for pre-6 readers. `hook_name` is the TransformerLens
name of the same site (residuals_N = blocks.N.hook_resid_pre, mlp_N = blocks.N.hook_mlp_out,
attention_N = blocks.N.hook_attn_out), so the SAE attaches to a HookedSAETransformer as is;
the refusal_lab hook point and how it maps onto the HF module are under `refusal_lab`.
Weights act on raw activations (`normalize_activations: none`): the training-time input scale
is folded into the biases.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from refusal_lab.layers import HookPoint, Site
from refusal_lab.sae.config import Architecture
from refusal_lab.sae.model import Sae

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SPARSITY = "sparsity.safetensors"
METRICS = "metrics.json"
DENSITY_PNG = "feature_density.png"

SAELENS_FORMAT = "6.0.0"
"""cfg.json format version written (SAELens reads configs from 6.0.0 on without conversion)."""

SAELENS_ARCHITECTURE = {Architecture.topk: "topk", Architecture.relu: "standard", Architecture.batchtopk: "jumprelu"}
FROM_SAELENS = {v: k for k, v in SAELENS_ARCHITECTURE.items()}

_TL_SUFFIX = {Site.RESIDUALS: "hook_resid_pre", Site.MLP: "hook_mlp_out", Site.ATTENTION: "hook_attn_out"}
_HF_SITE = {
    Site.RESIDUALS: "input of model.model.layers[{n}] (forward pre-hook)",
    Site.MLP: "output of model.model.layers[{n}].mlp (forward hook)",
    Site.ATTENTION: "output[0] of model.model.layers[{n}].self_attn (forward hook)",
}


def transformer_lens_name(hook: str) -> str:
    point = HookPoint.from_name(hook)
    return f"blocks.{point.layer}.{_TL_SUFFIX[point.site]}"


def sae_cfg(sae: Sae, hook: str, model_name: str, extra: dict[str, Any]) -> dict[str, Any]:
    """cfg.json content: SAELens 6 keys, flat copies for older readers, and refusal_lab's own section."""
    point = HookPoint.from_name(hook)
    architecture = SAELENS_ARCHITECTURE[sae.architecture]
    tl_name = transformer_lens_name(hook)
    meta = {
        "model_name": model_name,
        "hook_name": tl_name,
        "hook_layer": point.layer,
        "hook_head_index": None,
        "prepend_bos": True,
        "context_size": None,
        "dataset_path": extra.get("store"),
        "sae_lens_version": SAELENS_FORMAT,
        "sae_lens_training_version": None,
    }
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        **{k: v for k, v in meta.items() if k not in ("sae_lens_version",)},
        "activation_fn": "topk" if sae.architecture == Architecture.topk else "relu",
        "refusal_lab": {
            "architecture": sae.architecture.value,
            "hook_point": hook,
            "hf_module": _HF_SITE[point.site].format(n=point.layer),
            "k": sae.k,
            **extra,
        },
    }
    if sae.architecture == Architecture.topk:
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
        cfg["activation_fn_kwargs"] = {"k": sae.k}
    return cfg


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_sae(
    sae: Sae, folder: Path, hook: str, model_name: str, extra: dict[str, Any], density: np.ndarray | None = None
) -> None:
    """Write cfg.json, the weights and (given the held-out density) sparsity.safetensors into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {
        "W_enc": sae.W_enc.detach().float().cpu().contiguous(),
        "W_dec": sae.W_dec.detach().float().cpu().contiguous(),
        "b_enc": sae.b_enc.detach().float().cpu().contiguous(),
        "b_dec": sae.b_dec.detach().float().cpu().contiguous(),
    }
    if sae.architecture == Architecture.batchtopk:
        weights["threshold"] = sae.threshold.detach().float().cpu().contiguous()
    _atomic(folder / WEIGHTS, lambda p: save_file(weights, str(p)))
    if density is not None:
        sparsity = torch.from_numpy(np.log10(density + 1e-10).astype(np.float32))
        _atomic(folder / SPARSITY, lambda p: save_file({"sparsity": sparsity}, str(p)))
    text = json.dumps(sae_cfg(sae, hook, model_name, extra), indent=2, default=str)
    _atomic(folder / CFG, lambda p: p.write_text(text))


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> Sae:
    """An SAE from a folder in the SAELens layout (ours, or SAELens's topk / standard / jumprelu ones)."""
    folder = Path(folder)
    cfg = json.loads((folder / CFG).read_text())
    name = cfg.get("architecture", "standard")
    if name not in FROM_SAELENS:
        raise ValueError(f"{folder / CFG}: architecture {name!r} is not supported; valid: {sorted(FROM_SAELENS)}")
    architecture = FROM_SAELENS[name]
    unsupported = {
        "apply_b_dec_to_input": (cfg.get("apply_b_dec_to_input", True), True),
        "normalize_activations": (cfg.get("normalize_activations") or "none", "none"),
    }
    for key, (value, valid) in unsupported.items():
        if value != valid:
            raise ValueError(f"{folder / CFG}: {key}={value!r} is not supported by load_sae; valid: {valid!r}")
    k = cfg.get("k") or cfg.get("activation_fn_kwargs", {}).get("k") or cfg.get("refusal_lab", {}).get("k") or 1
    weights = load_file(str(folder / WEIGHTS))
    sae = Sae(int(cfg["d_in"]), int(cfg["d_sae"]), architecture, int(k))
    with torch.no_grad():
        sae.encoder.copy_(weights["W_enc"].T)
        sae.W_dec.copy_(weights["W_dec"])
        sae.b_enc.copy_(weights["b_enc"])
        sae.b_dec.copy_(weights["b_dec"])
        if architecture == Architecture.batchtopk:
            sae.threshold.copy_(weights["threshold"])
    return sae.requires_grad_(False).to(device).eval()
