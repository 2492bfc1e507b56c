"""The layer-spec language: user-facing strings -> concrete hook points.

Grammar (one term per list entry, any mix in one list):

    residuals_N      residual stream *input* to decoder layer N (== output_hidden_states[N])
    mlp_N            output of layer N's MLP (before it is added to the residual)
    attention_N      output of layer N's self-attention (after o_proj, before the residual add)
    SITE_A-B         inclusive range, e.g. residuals_10-21, mlp_5-15
    SITE_all         every layer for that site: residuals_all, mlp_all, attention_all
    all              every residual layer (same as residuals_all)

mlp_N and attention_N are accepted only on model types whose decomposition is verified
(refusal_lab.hooks.check_sites_supported, called where the model's config is known).

`parse_layer_spec` checks the syntax without a model (so config validation can fail
before anything is loaded); `expand_layer_spec` resolves against the model's depth.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from refusal_lab.errors import ConfigError


class Site(StrEnum):
    """Where in a decoder layer a hook reads."""

    RESIDUALS = "residuals"
    MLP = "mlp"
    ATTENTION = "attention"


@dataclass(frozen=True, order=True)
class HookPoint:
    """One concrete activation site: a site at a layer index."""

    site: Site
    layer: int

    @property
    def name(self) -> str:
        return f"{self.site.value}_{self.layer}"

    @classmethod
    def from_name(cls, name: str) -> HookPoint:
        """Inverse of `name` ("mlp_3" -> HookPoint(MLP, 3))."""
        match = _SINGLE.fullmatch(name)
        if match is None:
            raise ValueError(f"{name!r} is not a hook point name; expected e.g. residuals_3, mlp_0, attention_5")
        return cls(Site(match["site"]), int(match["layer"]))


@dataclass(frozen=True)
class LayerTerm:
    """One parsed term: a site and a layer selection (None bounds mean 'all layers')."""

    site: Site
    first: int | None
    last: int | None
    text: str


_SITES = "|".join(s.value for s in Site)
_SINGLE = re.compile(rf"(?P<site>{_SITES})_(?P<layer>\d+)")
_RANGE = re.compile(rf"(?P<site>{_SITES})_(?P<first>\d+)-(?P<last>\d+)")
_ALL = re.compile(rf"(?P<site>{_SITES})_all")

VALID_FORMS = (
    "residuals_N, mlp_N, attention_N (single layer); residuals_A-B, mlp_A-B, attention_A-B "
    "(inclusive range); residuals_all, mlp_all, attention_all; all (= residuals_all)"
)


class LayerSpecError(ConfigError):
    """A layer spec that is malformed or out of range; the message names the key and valid forms."""


def parse_layer_spec(spec: Sequence[str], key: str = "model.activation_layers") -> list[LayerTerm]:
    """Check the syntax of every term; raise one error listing all bad terms."""
    if isinstance(spec, str):
        spec = [spec]
    if len(spec) == 0:
        raise LayerSpecError(f"{key}: the layer spec is empty; valid forms: {VALID_FORMS}")
    terms: list[LayerTerm] = []
    bad: list[str] = []
    for raw in spec:
        text = str(raw).strip()
        if text == "all":
            terms.append(LayerTerm(Site.RESIDUALS, None, None, text))
        elif m := _ALL.fullmatch(text):
            terms.append(LayerTerm(Site(m["site"]), None, None, text))
        elif m := _RANGE.fullmatch(text):
            first, last = int(m["first"]), int(m["last"])
            if first > last:
                bad.append(f"{text!r} (range start {first} is after its end {last})")
                continue
            terms.append(LayerTerm(Site(m["site"]), first, last, text))
        elif m := _SINGLE.fullmatch(text):
            layer = int(m["layer"])
            terms.append(LayerTerm(Site(m["site"]), layer, layer, text))
        else:
            bad.append(repr(text))
    if bad:
        raise LayerSpecError(f"{key}: invalid layer spec {', '.join(bad)}; valid forms: {VALID_FORMS}")
    return terms


def expand_layer_spec(
    spec: Sequence[str], n_layers: int, model_name: str = "the model", key: str = "model.activation_layers"
) -> list[HookPoint]:
    """Resolve a spec against a model with `n_layers` decoder layers.

    Duplicates collapse; order is the order of first appearance (a range expands ascending),
    so the same spec always yields the same hook-point order.
    """
    points: dict[HookPoint, None] = {}
    out_of_range: list[str] = []
    for term in parse_layer_spec(spec, key):
        first = 0 if term.first is None else term.first
        last = n_layers - 1 if term.last is None else term.last
        if last >= n_layers:
            out_of_range.append(term.text)
            continue
        for layer in range(first, last + 1):
            points.setdefault(HookPoint(term.site, layer), None)
    if out_of_range:
        raise LayerSpecError(
            f"{key}: {', '.join(out_of_range)} {'is' if len(out_of_range) == 1 else 'are'} out of range for "
            f"{model_name} ({n_layers} layers: 0-{n_layers - 1})"
        )
    return list(points)
