"""Collect planning: what a collect run will store and whether it fits, all before weights load.

Reads: the model's config (no weights), the tokenizer, the prompts. Writes nothing.
`plan_collect` validates the layer spec against the model's depth, tokenises every prompt and
sizes the store; `check_disk` compares that size with the free space where the store goes.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from refusal_lab.config import InferenceConfig, Positions, RunConfig
from refusal_lab.data import Prompt
from refusal_lab.errors import ConfigError
from refusal_lab.generation import GreedySettings, greedy_settings
from refusal_lab.hooks import check_sites_supported
from refusal_lab.layers import HookPoint, expand_layer_spec
from refusal_lab.models import ChatFormat, chat_format, encode_prompts, resolve_model_path, source_kwargs
from refusal_lab.store import MANIFEST, estimate_store_bytes, read_json, store_meta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectPlan:
    """Everything decided before the model's weights are loaded."""

    hook_points: list[HookPoint]
    token_ids: list[list[int]]
    order: list[int]
    """Prompt indices in processing order (longest first)."""
    fmt: ChatFormat
    d_model: int
    n_layers: int
    estimated_tokens: int
    estimated_bytes: int
    buffer_bytes_per_prompt: int
    """Device memory of the capture buffers for one prompt of the longest batch."""
    chat_template: str = ""
    """The chat template string the prompts were formatted with (part of the collect fingerprint)."""
    greedy: GreedySettings = field(default_factory=GreedySettings)
    """The model's generation_config fields that change greedy decoding."""


def tokens_per_prompt(n_prompt: int, n_post: int, max_new_tokens: int, positions: Positions) -> int:
    """Upper bound of the tokens stored for one prompt under a positions policy."""
    return {
        Positions.all: n_prompt + max_new_tokens,
        Positions.prompt: n_prompt,
        Positions.last_prompt: 1,
        Positions.post_instruction: n_post,
        Positions.generated: max_new_tokens,
    }[positions]


def plan_collect(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt]) -> CollectPlan:
    """Validate the layer spec against the model's config and size the run, all before loading weights."""
    where = dict(
        revision=cfg.model.revision, cache_dir=cfg.model.cache_dir, local_files_only=cfg.model.local_files_only
    )
    path = resolve_model_path(cfg.model)
    full_config = AutoConfig.from_pretrained(
        path, trust_remote_code=cfg.model.trust_remote_code, **where, **source_kwargs(cfg.model)
    )
    model_config = full_config.get_text_config()
    n_layers = int(model_config.num_hidden_layers)
    hook_points = expand_layer_spec(cfg.model.activation_layers, n_layers, cfg.model.name)
    check_sites_supported(hook_points, str(model_config.model_type), cfg.model.name)
    greedy = greedy_settings(_generation_config(path, full_config, where), cfg.model.name)
    fmt, _ = chat_format(cfg.model, tokenizer)
    token_ids = encode_prompts(cfg.model, tokenizer, [p.text for p in prompts], cfg.inference.max_prompt_tokens)
    order = sorted(range(len(prompts)), key=lambda i: (-len(token_ids[i]), i))
    inf = cfg.inference
    n_tokens = sum(
        tokens_per_prompt(len(t), fmt.n_post_instruction_tokens, inf.max_new_tokens, inf.positions) for t in token_ids
    )
    n_hooks = len(hook_points) if inf.save_activations else 0
    d_model = int(model_config.hidden_size)
    model_dtype = getattr(torch, cfg.model.torch_dtype.value)
    # store_dtype raw keeps the model dtype's width: 4 bytes a value for float32 weights.
    n_bytes = estimate_store_bytes(n_tokens, n_hooks, d_model, inf.store_dtype.value, model_dtype)
    prompt_cols, decode_cols = recorded_columns(inf, max(map(len, token_ids)), fmt.n_post_instruction_tokens)
    element = torch.finfo(model_dtype).bits // 8
    buffer_bytes = (prompt_cols + decode_cols) * d_model * element * n_hooks
    template = tokenizer.chat_template
    assert isinstance(template, str), "load_tokenizer refuses a tokenizer without a chat template"
    return CollectPlan(
        hook_points, token_ids, order, fmt, d_model, n_layers, n_tokens, n_bytes, buffer_bytes, template, greedy
    )


def _generation_config(path: str, model_config: PretrainedConfig, where: dict) -> GenerationConfig:
    """The generation_config `from_pretrained` gives the model: its file, else one derived from the config."""
    try:
        return GenerationConfig.from_pretrained(path, **where)
    except OSError:
        return GenerationConfig.from_model_config(model_config)


def committed_fraction(plan: CollectPlan, store_path: Path) -> float | None:
    """How much of the planned store is already committed at `store_path`: 1.0 when it is complete,
    committed tokens / estimated tokens when it is partial, None when there is no store there.

    The fingerprint is not checked here; opening the store for writing refuses another run's store.
    """
    if store_meta(store_path) is None:
        return None
    manifest = read_json(store_path / MANIFEST)
    if manifest is None:
        return 0.0
    if manifest.get("complete"):
        return 1.0
    return min(1.0, int(manifest.get("committed_tokens", 0)) / max(1, plan.estimated_tokens))


def check_disk(plan: CollectPlan, store_path: Path, inf: InferenceConfig) -> None:
    """Fail before any compute when what the store still has to write cannot fit on its disk.

    A complete store needs nothing more (a rerun after a later stage failed must not be refused
    because the store itself took the space); a partial one needs what its committed tokens do
    not cover yet.
    """
    done = committed_fraction(plan, store_path)
    if done == 1.0:
        log.info("collect: %s is complete; no disk space needed", store_path)
        return
    needed = int(plan.estimated_bytes * (1.0 - (done or 0.0)))
    probe = store_path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    log.info(
        "collect: %d prompts, %d hook points, positions policy stores <= %d tokens: estimated store %.2f GB "
        "(uncompressed, store_dtype %s; %.1f MB per 1000 prompts)%s, %.1f GB free at %s",
        len(plan.token_ids),
        len(plan.hook_points),
        plan.estimated_tokens,
        plan.estimated_bytes / 1e9,
        inf.store_dtype.value,
        plan.estimated_bytes / max(1, len(plan.token_ids)) * 1000 / 1e6,
        "" if done is None else f", {needed / 1e9:.2f} GB of it still to write",
        free / 1e9,
        probe,
    )
    longest = max(map(len, plan.token_ids))
    log.info(
        "collect: capture buffers need %.1f MB of device memory per prompt in a batch (longest prompt %d tokens); "
        "host memory holds at most inference.writer_queue=%d batches in flight plus the tokens waiting for a "
        "commit (inference.commit_tokens=%d, at most %.0f MB)",
        plan.buffer_bytes_per_prompt / 1e6,
        longest,
        inf.writer_queue,
        inf.commit_tokens,
        inf.commit_tokens * len(plan.hook_points) * plan.d_model * 4 / 1e6,  # float32 at most
    )
    if needed > free:
        what = "the store needs" if done is None else f"the partial store at {store_path} still needs"
        raise ConfigError(
            f"store_path: {what} about {needed / 1e9:.1f} GB but {probe} has "
            f"{free / 1e9:.1f} GB free; choose fewer layers, a narrower inference.positions, or another disk"
        )


def recorded_columns(inf: InferenceConfig, seq: int, n_post: int) -> tuple[int, int]:
    """(prompt columns, decode columns) the recorder keeps for a batch of padded length `seq`."""
    if not inf.save_activations:
        return 0, 0
    prompt_cols = {
        Positions.all: seq,
        Positions.prompt: seq,
        Positions.last_prompt: 1,
        Positions.post_instruction: min(n_post, seq),
        Positions.generated: 0,
    }[inf.positions]
    decode_cols = inf.max_new_tokens if inf.positions in (Positions.all, Positions.generated) else 0
    return prompt_cols, decode_cols
