"""Feature cards on a planted store: the firing token is highlighted, firing shares are counted per label."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from refusal_lab.report.cards import feature_cards
from refusal_lab.store import Phase

WORDS = ["<s>", " how", " to", " steal", " bake", " a", " car", " cake", " [/INST]", " Sorry"]


class Tokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(WORDS[i] for i in ids)


class Store:
    """Four samples; activations one-hot on the token id, so feature f fires exactly on token f."""

    def __init__(self) -> None:
        prompts = [[0, 1, 2, 3, 5, 6, 8, 9], [0, 1, 2, 4, 5, 7, 8], [0, 1, 2, 3, 5, 7, 8, 9], [0, 1, 2, 4, 5, 6, 8]]
        self.labels = ["toxic", "harmless", "toxic", "safe"]
        rows = [(s, p, t) for s, ids in enumerate(prompts) for p, t in enumerate(ids)]
        self.table = {
            "sample_id": np.array([r[0] for r in rows]),
            "position": np.array([r[1] for r in rows]),
            "token_id": np.array([r[2] for r in rows]),
            # the last token of a refused sample is generated: never encoded, never shown
            "phase": np.array([int(Phase.GENERATED) if t == 9 else int(Phase.PROMPT) for *_, t in rows]),
        }
        self.acts = np.eye(len(WORDS), dtype=np.float32)[self.table["token_id"]]

    def tokens(self) -> dict[str, np.ndarray]:
        return self.table

    def samples(self) -> dict[str, Any]:
        return {"sample_id": np.arange(4), "label": self.labels, "category": ["crime", "food", "crime", "food"]}

    def read(self, hook: str, start: int, stop: int) -> np.ndarray:
        return self.acts[start:stop]


class IdentitySae(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_cards_highlight_the_firing_token_and_count_firing_shares() -> None:
    out = feature_cards(Store(), {"residuals_0": IdentitySae()}, [("residuals_0", 3), ("residuals_0", 9)], Tokenizer())
    steal, sorry = out["cards"]
    assert [c["sample_id"] for c in steal["contexts"]] == [0, 2]  # one context per sample that has " steal"
    for ctx in steal["contexts"]:
        assert ctx["tokens"][ctx["highlight"]] == " steal" and ctx["label"] == "toxic"
        assert "".join(ctx["tokens"]).startswith("<s> how to steal a")
    assert steal["fires_on"]["label"] == {"harmless": 0.0, "safe": 0.0, "toxic": 1.0}
    assert steal["fires_on"]["category"] == {"crime": 1.0, "food": 0.0}
    assert sorry["contexts"] == [] and sorry["fires_on"]["label"]["toxic"] == 0.0  # generated tokens are left out
    assert out["n_samples_read"] == 4
