"""The collect stage's fingerprint: exactly what decides the store's content.

The store's folder is named by a hash of this payload, so any change here that changes what a
store holds must change the payload (bump `COLLECT_ALGORITHM_VERSION` when the code's output
changes without any config field changing).
"""

from __future__ import annotations

from refusal_lab.collect_plan import CollectPlan
from refusal_lab.config import RunConfig


def collect_fingerprint(cfg: RunConfig, plan: CollectPlan, prompts_fp: str) -> dict:
    """Exactly the settings that change what the store holds (batch size and paths do not)."""
    m, inf = cfg.model, cfg.inference
    return {
        "stage": "collect",
        "format": 1,
        "model": {
            "name": m.name,
            "revision": m.revision,
            "torch_dtype": m.torch_dtype.value,
            "system_prompt": m.system_prompt,
            "refusal_prefixes": list(m.refusal_prefixes),
            "refusal_tokens": list(m.refusal_tokens),
        },
        "hook_points": [p.name for p in plan.hook_points] if inf.save_activations else [],
        "inference": {
            "max_new_tokens": inf.max_new_tokens,
            "positions": inf.positions.value,
            "store_dtype": inf.store_dtype.value,
            "chunk_tokens": inf.chunk_tokens,
        },
        "prompts": prompts_fp,
    }
