"""Feature cards: where a circuit feature fires, in context, and on which prompts.

Reads: the activation store (token table, sample table, the hook's activations) and the SAEs.
Writes nothing; the circuits stage saves the result as `feature_cards.json` in each set's
folder, and the report draws it (the report itself never encodes activations).

Per feature: the `n_contexts` highest activations on distinct samples, each with the stored
tokens around it (decoded one by one, the firing token marked) and the sample's category and
label; and the share of samples of each label and category on which it fires on at least
one stored prompt token. Only prompt and post-instruction tokens are encoded, of at most
`max_samples` samples (evenly spaced over the store), so the cost stays bounded on a large store.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refusal_lab.store import ActivationStore, Phase

log = logging.getLogger(__name__)

WINDOW_BEFORE, WINDOW_AFTER = 12, 4
"""Stored tokens shown before and after the firing token."""
ROWS_PER_READ = 1024


def _pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's text as it reads inside the window (decoding a lone token drops SentencePiece's space)."""
    out, prev = [], ""
    for i in range(len(ids)):
        text = str(tokenizer.decode([int(t) for t in ids[: i + 1]]))
        out.append(text[len(prev) :] if text.startswith(prev) else str(tokenizer.decode([int(ids[i])])))
        prev = text
    return out


@torch.no_grad()
def feature_cards(
    store_path: Path | Any,
    saes: Mapping[str, Any],
    features: Sequence[tuple[str, int]],
    tokenizer: Any,
    *,
    max_samples: int = 200,
    n_contexts: int = 5,
) -> dict[str, Any]:
    """Cards for `features` ((hook, feature index) pairs); JSON-ready. `store_path`: a store folder, or an
    open store (anything with tokens(), samples() and read(hook, start, stop), as ActivationStore)."""
    store = ActivationStore.open(Path(store_path)) if isinstance(store_path, str | Path) else store_path
    tokens = store.tokens()
    samples = store.samples()
    sample_ids = np.asarray(samples["sample_id"])
    keep_ids = sample_ids[np.unique(np.linspace(0, len(sample_ids) - 1, min(max_samples, len(sample_ids))).astype(int))]
    row_sample = np.asarray(tokens["sample_id"])
    # Prompt and template tokens only: where the circuits' attribution lives, and the cheaper half to encode.
    rows = np.flatnonzero(np.isin(row_sample, keep_ids) & (np.asarray(tokens["phase"]) != int(Phase.GENERATED)))
    position = np.asarray(tokens["position"])
    token_id = np.asarray(tokens["token_id"])
    info = {int(s): i for i, s in enumerate(sample_ids)}
    label = [str(x) for x in samples["label"]]
    category = [str(x) for x in samples["category"]]
    n_by_label = _counts([label[info[int(s)]] for s in keep_ids])
    n_by_category = _counts([category[info[int(s)]] for s in keep_ids])
    # Rows of each sample ordered by position, to cut context windows.
    by_sample: dict[int, np.ndarray] = defaultdict(lambda: np.empty(0, np.int64))
    order = rows[np.lexsort((position[rows], row_sample[rows]))]
    for s, group in _groups(row_sample[order], order):
        by_sample[s] = group

    cards = []
    wanted: dict[str, list[int]] = defaultdict(list)
    for hook, f in features:
        if hook in saes and f >= 0:
            wanted[hook].append(int(f))
    for hook, feats in wanted.items():
        sae = saes[hook]
        device = next(sae.parameters()).device
        acts = np.zeros((len(rows), len(feats)), np.float32)
        for start in range(0, len(rows), ROWS_PER_READ):
            chunk = rows[start : start + ROWS_PER_READ]
            x = _read_rows(store, hook, chunk)
            z = sae.encode(torch.from_numpy(x).to(device=device, dtype=next(sae.parameters()).dtype))
            acts[start : start + len(chunk)] = z[:, feats].float().cpu().numpy()
        for j, f in enumerate(feats):
            cards.append(
                _card(hook, f, acts[:, j], rows, row_sample, position, token_id, by_sample, info, label, category,
                      n_by_label, n_by_category, tokenizer, n_contexts)
            )  # fmt: skip
    return {
        "n_samples_read": len(keep_ids),
        "window": [WINDOW_BEFORE, WINDOW_AFTER],
        "fires_on_rule": "share of the samples read (of that label or category) with activation > 0 on a prompt token",
        "cards": cards,
    }


def _counts(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for v in values:
        out[v] += 1
    return dict(out)


def _groups(keys: np.ndarray, values: np.ndarray) -> list[tuple[int, np.ndarray]]:
    if not len(keys):
        return []
    cuts = np.flatnonzero(np.diff(keys)) + 1
    return [(int(k[0]), v) for k, v in zip(np.split(keys, cuts), np.split(values, cuts), strict=True)]


def _read_rows(store: Any, hook: str, rows: np.ndarray) -> np.ndarray:
    """Activations of the given (sorted) token rows, read as contiguous runs."""
    out = []
    for run in np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1):
        out.append(store.read(hook, int(run[0]), int(run[-1]) + 1))
    return np.concatenate(out).astype(np.float32)


def _card(
    hook: str,
    feature: int,
    act: np.ndarray,
    rows: np.ndarray,
    row_sample: np.ndarray,
    position: np.ndarray,
    token_id: np.ndarray,
    by_sample: Mapping[int, np.ndarray],
    info: Mapping[int, int],
    label: list[str],
    category: list[str],
    n_by_label: Mapping[str, int],
    n_by_category: Mapping[str, int],
    tokenizer: Any,
    n_contexts: int,
) -> dict[str, Any]:
    contexts: list[dict[str, Any]] = []
    seen: set[int] = set()
    for i in np.argsort(-act, kind="stable"):
        if act[i] <= 0 or len(contexts) == n_contexts:
            break
        row = int(rows[i])
        s = int(row_sample[row])
        if s in seen:
            continue
        seen.add(s)
        sample_rows = by_sample[s]
        at = int(np.searchsorted(position[sample_rows], position[row]))
        window = sample_rows[max(0, at - WINDOW_BEFORE) : at + WINDOW_AFTER + 1]
        k = info[s]
        contexts.append(
            {
                "sample_id": s,
                "tokens": _pieces(tokenizer, [int(token_id[r]) for r in window]),
                "highlight": int(np.flatnonzero(window == row)[0]),
                "activation": float(act[i]),
                "category": category[k],
                "label": label[k],
            }
        )
    fired = {int(row_sample[rows[i]]) for i in np.flatnonzero(act > 0)}
    by_label: dict[str, int] = defaultdict(int)
    by_category: dict[str, int] = defaultdict(int)
    for s in fired:
        by_label[label[info[s]]] += 1
        by_category[category[info[s]]] += 1
    return {
        "hook": hook,
        "feature": int(feature),
        "contexts": contexts,
        "fires_on": {
            "label": {k: by_label[k] / n for k, n in sorted(n_by_label.items())},
            "category": {k: by_category[k] / n for k, n in sorted(n_by_category.items())},
        },
    }


CARDS = "feature_cards.json"


def write_feature_cards(
    store_path: Path,
    sae_root: Path,
    set_dirs: Mapping[str, Path],
    entries: Mapping[str, Mapping[str, Any]],
    tokenizer: Any,
) -> None:
    """`feature_cards.json` in each committed set's folder, for its `top_features` (one pass per hook for all sets)."""
    from refusal_lab.fingerprint import write_json_atomic
    from refusal_lab.sae.saelens import load_sae

    wanted = {
        name: [(str(f["hook"]), int(f["feature"])) for f in (entries.get(name) or {}).get("top_features") or []]
        for name in set_dirs
        if (entries.get(name) or {}).get("status") == "ok"
    }
    features = sorted({key for keys in wanted.values() for key in keys})
    if not features:
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    saes = {hook: load_sae(sae_root / hook).eval().to(device) for hook in sorted({h for h, _ in features})}
    cards = feature_cards(store_path, saes, features, tokenizer)
    by_key = {(c["hook"], c["feature"]): c for c in cards["cards"]}
    for name, keys in wanted.items():
        subset = {**cards, "cards": [by_key[k] for k in keys if k in by_key]}
        write_json_atomic(Path(set_dirs[name]) / CARDS, subset)
    log.info("feature cards: %d features over %d samples -> %s", len(features), cards["n_samples_read"], CARDS)
