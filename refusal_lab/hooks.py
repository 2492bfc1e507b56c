"""Hooks on a decoder's hook points, owned by one context manager, and an activation recorder.

A hook point maps to one module of `model.model.layers[N]`:
  residuals_N  -> forward *pre*-hook on layers[N]: its input hidden states (== hidden_states[N])
  mlp_N        -> forward hook on layers[N].mlp: the MLP output, before the residual add
  attention_N  -> forward hook on layers[N].self_attn: output[0] (after o_proj), before the residual add

residuals_N works on any decoder laid out as `model.model.layers`. mlp_N and attention_N mean
"what the sublayer adds to the residual stream" only where the layer is pre-norm with plain
residual adds (residual_{N+1} = residual_N + attention_N + mlp_N); post-norm layers (Gemma-2
normalises the sublayer output before adding it) break that, so these sites are accepted only
for the model types in `DECOMPOSITION_VERIFIED`, each checked by
tests/integration/test_activations.py against `output_hidden_states`.

Every hook function receives the activation tensor [B, T, D] and may return a replacement
(used for splicing SAE reconstructions and ablations) or None to leave it unchanged.

Shape letters: B batch, T sequence positions of one forward call, C recorded columns, D d_model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from refusal_lab.errors import ConfigError
from refusal_lab.layers import HookPoint, Site

DECOMPOSITION_VERIFIED = frozenset({"llama", "mistral"})
"""Model types (config.model_type) whose mlp_N / attention_N outputs add up to the residual stream,
verified by test_decomposition_is_verified_for_every_registered_model_type; add a type only with its test."""

HookFn = Callable[[torch.Tensor], torch.Tensor | None]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """`model.model.layers`, the one structural assumption refusal_lab makes about a decoder."""
    layers = model.get_submodule("model.layers")
    assert isinstance(layers, nn.ModuleList)
    return layers


def check_sites_supported(
    points: list[HookPoint], model_type: str, model_name: str, key: str = "model.activation_layers"
) -> None:
    """Refuse mlp_N / attention_N on a model type whose layer decomposition is not verified."""
    if model_type in DECOMPOSITION_VERIFIED:
        return
    bad = [p.name for p in points if p.site != Site.RESIDUALS]
    if bad:
        shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        raise ConfigError(
            f"{key}: {shown} not supported for {model_name} (model_type {model_type!r}): mlp_N and attention_N are "
            f"verified to add up to the residual stream only for model types {sorted(DECOMPOSITION_VERIFIED)}; "
            "use residuals_N (valid for any decoder with model.model.layers)"
        )


def module_for(model: nn.Module, point: HookPoint) -> nn.Module:
    layer = decoder_layers(model)[point.layer]
    if point.site == Site.RESIDUALS:
        return layer
    return layer.get_submodule("mlp" if point.site == Site.MLP else "self_attn")


def _pre_hook(fn: HookFn) -> Callable[..., Any]:
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # Decoder layers receive hidden_states positionally in transformers 5; accept a kwarg too.
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _output_hook(fn: HookFn) -> Callable[..., Any]:
    def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
        # self_attn returns (attn_output, attn_weights); mlp returns a tensor.
        if isinstance(output, tuple):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        return fn(output)

    return hook


@contextmanager
def hooks_registered(model: nn.Module, fns: Mapping[HookPoint, HookFn]) -> Iterator[None]:
    """Register one hook per hook point for the duration of the block; always removes them."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    check_sites_supported(list(fns), model_type, type(model).__name__, key="hook points")
    handles = []
    try:
        for point, fn in fns.items():
            module = module_for(model, point)
            if point.site == Site.RESIDUALS:
                handles.append(module.register_forward_pre_hook(_pre_hook(fn), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_output_hook(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class ActivationRecorder:
    """Copies every forward call's activations into preallocated device buffers.

    `generate` writes the prefill (the last `prompt_columns` prompt positions) into columns
    [0, prompt_columns) and decode step s into column prompt_columns + s, so nothing a later
    forward call produces overwrites an earlier one. The copy stays on the device; the collect
    stage gathers the valid (non-padding) cells once per batch and moves them to the host in
    one transfer.
    """

    def __init__(self, model: nn.Module, points: list[HookPoint], dtype: torch.dtype) -> None:
        self.model = model
        self.points = points
        self.dtype = dtype
        self.buffers: dict[HookPoint, torch.Tensor] = {}
        self.prompt_columns = 0
        self.column: int | None = None  # decode column the current forward call writes; None = off
        self.prefill = False  # the current forward call is the prefill
        self._devices = {p: next(module_for(model, p).parameters()).device for p in points}

    def reset(self, batch: int, prompt_columns: int, decode_columns: int) -> None:
        """Prepare buffers for one batch ([B, prompt_columns + decode_columns, D] per hook point)."""
        width = prompt_columns + decode_columns
        d_model = int(self.model.get_parameter("model.embed_tokens.weight").shape[1])
        for point in self.points:
            buf = self.buffers.get(point)
            if buf is None or buf.shape[0] < batch or buf.shape[1] < width:
                # Grow only; reusing the allocation avoids churn in the CUDA caching allocator.
                rows = max(batch, 0 if buf is None else buf.shape[0])
                cols = max(width, 0 if buf is None else buf.shape[1])
                self.buffers[point] = torch.empty(rows, cols, d_model, dtype=self.dtype, device=self._devices[point])
        self.prompt_columns = prompt_columns
        self.column = None
        self.prefill = False

    def view(self, point: HookPoint, batch: int, width: int) -> torch.Tensor:
        """The recorded [B, C, D] cells of this batch."""
        return self.buffers[point][:batch, :width]

    def _record(self, point: HookPoint) -> HookFn:
        def record(acts_BTD: torch.Tensor) -> None:
            buf = self.buffers[point]
            batch, seq = acts_BTD.shape[0], acts_BTD.shape[1]
            if self.prefill:  # keep the last prompt_columns positions
                buf[:batch, : self.prompt_columns].copy_(acts_BTD[:, seq - self.prompt_columns :])
            elif self.column is not None:  # one decode step
                buf[:batch, self.column].copy_(acts_BTD[:, -1])
            return None

        return record

    def hook_fns(self) -> dict[HookPoint, HookFn]:
        return {point: self._record(point) for point in self.points}
