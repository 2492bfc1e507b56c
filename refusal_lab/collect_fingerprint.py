"""The collect stage's fingerprint: exactly what decides the store's content.

The store's folder is named by a hash of this payload, so any change here that changes what a
store holds must change the payload (bump `COLLECT_ALGORITHM_VERSION` when the code's output
changes without any config field changing).
"""

from __future__ import annotations

import hashlib

import numpy as np

from refusal_lab.collect_plan import CollectPlan
from refusal_lab.config import RunConfig
from refusal_lab.gguf_source import gguf_fingerprint
from refusal_lab.judge.core import rule_settings
from refusal_lab.models import gguf_source

COLLECT_ALGORITHM_VERSION = 2
"""Bumped whenever the collect code's output changes with no config field changing.
2: generation_config's greedy fields are applied; the template and the prompts' token ids are hashed."""


def token_ids_digest(token_ids: list[list[int]]) -> str:
    """sha256 of every prompt's token ids, in prompt order (lengths included, so rows cannot run together)."""
    digest = hashlib.sha256()
    for row in token_ids:
        digest.update(np.int64(len(row)).tobytes())
        digest.update(np.asarray(row, dtype=np.int64).tobytes())
    return digest.hexdigest()


def collect_fingerprint(cfg: RunConfig, plan: CollectPlan, prompts_fp: str) -> dict:
    """Exactly what changes what the store holds (batch size and paths do not).

    With `revision: null` the hub's chat template or tokenizer can change under the same model
    name, so the template string and the token ids the prompts were actually formatted into are
    part of it, as are the generation_config fields that change greedy decoding. A GGUF source adds
    its file's size and the sha256 of its header and tensor index (refusal_lab.gguf_source.gguf_fingerprint).
    """
    m, inf = cfg.model, cfg.inference
    fp = {
        "stage": "collect",
        "format": 1,
        "algorithm_version": COLLECT_ALGORITHM_VERSION,
        "chat_template": plan.chat_template,
        "prompt_token_ids": token_ids_digest(plan.token_ids),
        "generation": plan.greedy.to_dict(),
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
        # The samples' `refused` column is the rule judge's binary view (refusal_lab.judge).
        "refused": {
            **rule_settings(cfg.judge, m.name, m.refusal_prefixes),
            "partial_is_refused": cfg.judge.partial_is_refused,
            "max_response_tokens": cfg.judge.max_response_tokens,  # the response text judged
        },
    }
    gguf = gguf_source(m)
    if gguf is not None:
        # Only for GGUF sources, so every other model's fingerprint (and its cached store) stays as it was.
        fp["model"]["gguf"] = gguf_fingerprint(gguf)
    return fp
