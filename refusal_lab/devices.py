"""The device choice shared by every stage's config (model, sae), and its resolution."""

from __future__ import annotations

from enum import StrEnum

import torch

from refusal_lab.errors import ConfigError


class Device(StrEnum):
    """Member names are lowercase: OmegaConf 2.3 matches YAML values against member names."""

    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


def resolve_device(device: Device, key: str) -> torch.device:
    """auto -> cuda when visible, else cpu; an explicit cuda without a GPU is an error naming `key`."""
    if device == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError(f"{key}: 'cuda' was requested but no CUDA device is visible; use cpu or auto")
    return torch.device(device.value)
