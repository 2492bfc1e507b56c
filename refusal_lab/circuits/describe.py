"""What a circuit looks like in words: top features with the tokens they fire on, and the prompt tokens that drive it.

Reads and writes nothing; turns NodeEffects into summary.json's `top_features` and
`top_prompt_tokens` (issue 9 item 10).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from refusal_lab.circuits.attribution import NodeEffects, TopActivations
from refusal_lab.store import Phase

PHASE_NAMES = {int(Phase.PROMPT): "prompt", int(Phase.POST_INSTRUCTION): "post_instruction", 2: "generated"}
TOP_TOKENS = 5


def token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([int(token_id)]))


def top_tokens(effects: NodeEffects, hook: str, feature: int, tokenizer: Any) -> list[dict[str, Any]]:
    """The 5 distinct tokens (by text) on which the feature fires most over the set's prompts."""
    return top_tokens_of(effects.top, hook, feature, tokenizer)


def top_tokens_of(tops: dict[str, TopActivations], hook: str, feature: int, tokenizer: Any) -> list[dict[str, Any]]:
    """top_tokens from the top activations alone (hook -> TopActivations)."""
    top = tops[hook]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for k in range(top.values_KF.shape[0]):
        value = float(top.values_KF[k, feature])
        if value <= 0:
            break
        text = token_text(tokenizer, int(top.token_KF[k, feature]))
        if text in seen:
            continue
        seen.add(text)
        out.append({"token": text, "phase": PHASE_NAMES.get(int(top.phase_KF[k, feature]), "?"), "activation": value})
        if len(out) == TOP_TOKENS:
            break
    return out


def top_features(
    effects: NodeEffects, nodes: list[tuple[str, int, float]], tokenizer: Any, n: int
) -> list[dict[str, Any]]:
    """Up to n circuit features, sorted by |effect| (positive: the feature raises the refusal metric)."""
    ranked = sorted(nodes, key=lambda x: -abs(x[2]))[:n]
    return [
        {"hook": h, "feature": f, "effect": e, "top_tokens": top_tokens(effects, h, f, tokenizer)} for h, f, e in ranked
    ]


def top_prompt_tokens(effects: NodeEffects, tokenizer: Any, n: int) -> dict[str, list[dict[str, Any]]]:
    """Per hook: the n prompt-phase tokens with the largest total attributed effect, aggregated by token text.

    A token's effect is everything attributed to its position at that hook (all SAE features
    plus the error node), summed over the set's discovery prompts; `effect_share` divides it by
    the sum of |effect| over all prompt-phase positions at that hook.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    cache: dict[int, str] = {}
    for hook in effects.hooks:
        totals: dict[str, float] = defaultdict(float)
        norm = 0.0
        for i, ids in enumerate(effects.token_ids):
            prompt = effects.phases[i] == int(Phase.PROMPT)
            per_pos = effects.pos_feats[hook][i] + effects.pos_errors[hook][i]
            norm += float(np.abs(per_pos[prompt]).sum())
            for token_id, value in zip(ids[prompt].tolist(), per_pos[prompt].tolist(), strict=True):
                if token_id not in cache:
                    cache[token_id] = token_text(tokenizer, token_id).strip()
                totals[cache[token_id]] += value
        ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:n]
        out[hook] = [{"token": t, "effect_share": v / norm if norm > 0 else 0.0} for t, v in ranked]
    return out
