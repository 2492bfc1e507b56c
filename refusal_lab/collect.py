"""The collect stage: prompts -> chat template -> greedy generation with hooks -> activation store.

Reads: the prompts (refusal_lab.data), the model and tokenizer (refusal_lab.models).
Writes: a Zarr activation store (refusal_lab.store) holding, per requested hook point, the
activations of the tokens chosen by `inference.positions`, each token's sample id, position,
phase and token id, and per sample the prompt, category, label, response and refusal judgements.

The store is committed batch by batch; a rerun of the same config resumes after the last
committed batch. Prompts are processed longest first: padding is minimal within a batch and
the first batch is the largest, so `batch_size: auto` finds its limit there.

Shape letters: B batch, T padded prompt length, M max_new_tokens, C recorded columns, N tokens kept, D d_model.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.config import ConfigError, InferenceConfig, Positions, RunConfig
from refusal_lab.data import Prompt
from refusal_lab.generation import Generation, generate_greedy
from refusal_lab.hooks import ActivationRecorder, hooks_registered
from refusal_lab.layers import HookPoint, expand_layer_spec
from refusal_lab.models import (
    ChatFormat,
    chat_format,
    encode_prompts,
    input_device,
    load_model,
    n_layers,
    resolve_model_path,
)
from refusal_lab.refusal import keyword_refusal, refusal_score, refusal_token_ids
from refusal_lab.store import Phase, SampleRecord, TokenBlock, estimate_store_bytes
from refusal_lab.store_writer import BackgroundWriter, StoreWriter

log = logging.getLogger(__name__)

CPU_AUTO_BATCH = 32
"""`batch_size: auto` on CPU: no out-of-memory signal to search with, and larger batches gain little there."""


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
    model_config = AutoConfig.from_pretrained(
        resolve_model_path(cfg.model),
        revision=cfg.model.revision,
        cache_dir=cfg.model.cache_dir,
        trust_remote_code=cfg.model.trust_remote_code,
        local_files_only=cfg.model.local_files_only,
    ).get_text_config()
    n_layers = int(model_config.num_hidden_layers)
    hook_points = expand_layer_spec(cfg.model.activation_layers, n_layers, cfg.model.name)
    fmt, _ = chat_format(cfg.model, tokenizer)
    token_ids = encode_prompts(cfg.model, tokenizer, [p.text for p in prompts], cfg.inference.max_prompt_tokens)
    order = sorted(range(len(prompts)), key=lambda i: (-len(token_ids[i]), i))
    inf = cfg.inference
    n_tokens = sum(
        tokens_per_prompt(len(t), fmt.n_post_instruction_tokens, inf.max_new_tokens, inf.positions) for t in token_ids
    )
    n_hooks = len(hook_points) if inf.save_activations else 0
    d_model = int(model_config.hidden_size)
    n_bytes = estimate_store_bytes(n_tokens, n_hooks, d_model, inf.store_dtype.value)
    prompt_cols, decode_cols = recorded_columns(inf, max(map(len, token_ids)), fmt.n_post_instruction_tokens)
    element = torch.finfo(getattr(torch, cfg.model.torch_dtype.value)).bits // 8
    buffer_bytes = (prompt_cols + decode_cols) * d_model * element * n_hooks
    return CollectPlan(hook_points, token_ids, order, fmt, d_model, n_layers, n_tokens, n_bytes, buffer_bytes)


def check_disk(plan: CollectPlan, store_path: Path, inf: InferenceConfig) -> None:
    """Fail before any compute when the store cannot fit on its disk."""
    probe = store_path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    log.info(
        "collect: %d prompts, %d hook points, positions policy stores <= %d tokens: estimated store %.2f GB "
        "(uncompressed float16; %.1f MB per 1000 prompts), %.1f GB free at %s",
        len(plan.token_ids),
        len(plan.hook_points),
        plan.estimated_tokens,
        plan.estimated_bytes / 1e9,
        plan.estimated_bytes / max(1, len(plan.token_ids)) * 1000 / 1e6,
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
    if plan.estimated_bytes > free:
        raise ConfigError(
            f"store_path: the store needs about {plan.estimated_bytes / 1e9:.1f} GB but {probe} has "
            f"{free / 1e9:.1f} GB free; choose fewer layers, a narrower inference.positions, or another disk"
        )


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `rows`, padded on the left to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


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


def token_table(
    gen: Generation, mask_BT: torch.Tensor, ids_BT: torch.Tensor, prompt_cols: int, decode_cols: int, n_post: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Which recorded cells are real tokens, and their sample-relative position, phase and token id.

    Returns `keep_BC` and per-cell tables [B, C]; cells of padding and of rows that already
    ended never reach the store.
    """
    seq = ids_BT.shape[1]
    cols = slice(seq - prompt_cols, seq)
    position_BT = mask_BT.cumsum(-1) - 1
    n_prompt_B = mask_BT.sum(-1)
    phase_BT = torch.full_like(ids_BT, int(Phase.PROMPT))
    phase_BT[:, seq - n_post :] = int(Phase.POST_INSTRUCTION)
    steps = torch.arange(decode_cols, device=ids_BT.device)
    keep = torch.cat([mask_BT[:, cols].bool(), gen.valid_BM[:, :decode_cols]], dim=1)
    table = {
        "position": torch.cat([position_BT[:, cols], n_prompt_B[:, None] + steps[None, :]], dim=1),
        "phase": torch.cat(
            [phase_BT[:, cols], torch.full_like(gen.tokens_BM[:, :decode_cols], int(Phase.GENERATED))], 1
        ),
        "token_id": torch.cat([ids_BT[:, cols], gen.tokens_BM[:, :decode_cols]], dim=1),
    }
    return keep, table


class BatchRunner:
    """Runs one batch: generation with hooks, judgements, and the block for the store."""

    def __init__(
        self,
        cfg: RunConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        plan: CollectPlan,
        store_dtype_model: torch.dtype,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.plan = plan
        self.device = input_device(model)
        points = plan.hook_points if cfg.inference.save_activations else []
        self.recorder = ActivationRecorder(model, points, store_dtype_model)
        self.refusal_ids = refusal_token_ids(tokenizer, cfg.model.refusal_tokens)
        eos = tokenizer.eos_token_id
        assert isinstance(eos, int), "a chat model's tokenizer has an EOS token"
        self.eos_ids = [eos]
        generation_eos = getattr(model.generation_config, "eos_token_id", None)
        if generation_eos is not None:
            extra = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos)
            self.eos_ids = sorted(set(self.eos_ids) | {int(e) for e in extra})
        self.pad_id = int(tokenizer.pad_token_id)  # type: ignore[arg-type]

    def run(self, prompts: list[Prompt], indices: list[int]) -> TokenBlock:
        inf = self.cfg.inference
        rows = [self.plan.token_ids[i] for i in indices]
        ids_BT, mask_BT = left_pad(rows, self.pad_id, self.device)
        n_post = self.plan.fmt.n_post_instruction_tokens
        prompt_cols, decode_cols = recorded_columns(inf, ids_BT.shape[1], n_post)
        self.recorder.reset(len(rows), prompt_cols, decode_cols)
        with hooks_registered(self.model, self.recorder.hook_fns()):
            gen = generate_greedy(
                self.model,
                ids_BT,
                mask_BT,
                inf.max_new_tokens,
                self.eos_ids,
                self.pad_id,
                self.recorder,
                record_generated=decode_cols > 0,
            )
        keep_BC, table = token_table(gen, mask_BT, ids_BT, prompt_cols, decode_cols, n_post)
        b_idx, c_idx = keep_BC.nonzero(as_tuple=True)  # row-major: each sample's tokens in order
        acts = {
            p.name: _to_host(self.recorder.view(p, len(rows), prompt_cols + decode_cols)[b_idx, c_idx])
            for p in self.recorder.points
        }
        ready = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            ready = event.synchronize
        scores = refusal_score(gen.first_logits_BV, self.refusal_ids).cpu().tolist()
        tokens = gen.tokens_BM.cpu()
        valid = gen.valid_BM.cpu()
        n_generated = valid.sum(-1).tolist()
        samples: list[SampleRecord] = []
        for row, index in enumerate(indices):
            prompt = prompts[index]
            response = str(self.tokenizer.decode(tokens[row, : n_generated[row]].tolist(), skip_special_tokens=True))
            samples.append(
                SampleRecord(
                    sample_id=prompt.sample_id,
                    prompt=prompt.text,
                    category=prompt.category,
                    label=prompt.label,
                    response=response,
                    refused=keyword_refusal(response, self.cfg.model.refusal_prefixes),
                    refusal_score=float(scores[row]),
                    n_prompt_tokens=len(rows[row]),
                    n_generated_tokens=int(n_generated[row]),
                )
            )
        sample_ids = torch.tensor([prompts[i].sample_id for i in indices], dtype=torch.int32)
        b_cpu = b_idx.cpu()
        return TokenBlock(
            samples=samples,
            sample_id=sample_ids[b_cpu].numpy(),
            position=table["position"][b_idx, c_idx].cpu().numpy().astype(np.int32),
            phase=table["phase"][b_idx, c_idx].cpu().numpy().astype(np.int8),
            token_id=table["token_id"][b_idx, c_idx].cpu().numpy().astype(np.int32),
            acts=acts,
            ready=ready,
        )


def _to_host(acts_ND: torch.Tensor) -> torch.Tensor:
    """Start the device-to-host copy into pinned memory without waiting for it."""
    if acts_ND.device.type != "cuda":
        return acts_ND  # advanced indexing already made a copy the recorder will not touch
    host = torch.empty(acts_ND.shape, dtype=acts_ND.dtype, pin_memory=True)
    host.copy_(acts_ND, non_blocking=True)
    return host


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_batches(
    runner: BatchRunner,
    prompts: list[Prompt],
    order: list[int],
    start: int,
    sink: BackgroundWriter | None,
    progress_every_s: float = 10.0,
) -> dict[str, float]:
    """Process prompts order[start:] in batches; halves the batch on out-of-memory without losing samples."""
    inf = runner.cfg.inference
    fixed = inf.fixed_batch_size
    if fixed is not None:
        batch_size = fixed
    elif runner.device.type == "cuda":
        batch_size = inf.max_batch_size
    else:
        batch_size = CPU_AUTO_BATCH
    i = start
    n_tokens = 0
    t0 = last_report = time.perf_counter()
    while i < len(order):
        indices = order[i : i + batch_size]
        try:
            block = runner.run(prompts, indices)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err) or batch_size == 1:
                raise
            batch_size = max(1, len(indices) // 2)
            runner.recorder.buffers.clear()
            if runner.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("collect: out of memory at batch %d; retrying with batch size %d", len(indices), batch_size)
            continue
        if sink is not None:
            sink.submit(block)
        i += len(indices)
        n_tokens += len(block.token_id)
        now = time.perf_counter()
        if now - last_report > progress_every_s or i == len(order):
            log.info(
                "collect: %d/%d prompts, %.0f stored tokens/s, batch %d",
                i,
                len(order),
                n_tokens / (now - t0),
                batch_size,
            )
            last_report = now
    elapsed = time.perf_counter() - t0
    return {"batch_size": float(batch_size), "seconds": elapsed, "tokens": float(n_tokens)}


def open_sink(writer: StoreWriter, inf: InferenceConfig) -> BackgroundWriter:
    """The background writer for a collect run, with the config's queue bound and commit policy."""
    return BackgroundWriter(
        writer, max_queue=inf.writer_queue, commit_tokens=inf.commit_tokens, commit_seconds=inf.commit_seconds
    )


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


def run_collect(
    cfg: RunConfig,
    prompts: list[Prompt],
    tokenizer: PreTrainedTokenizerBase,
    plan: CollectPlan,
    store_path: Path,
    fingerprint: str,
    attrs: dict,
) -> None:
    """Fill (or resume) the store at `store_path`; returns when it is committed complete."""
    inf = cfg.inference
    dtype = getattr(torch, cfg.model.torch_dtype.value)
    writer = StoreWriter.open(
        store_path,
        fingerprint=fingerprint,
        hook_points=[p.name for p in plan.hook_points] if inf.save_activations else [],
        d_model=plan.d_model,
        model_dtype=dtype,
        encoding=inf.store_dtype.value,
        chunk_tokens=inf.chunk_tokens,
        attrs=attrs,
    )
    if writer.complete:
        log.info("collect: %s is complete for this config; skipping", store_path)
        return
    start = writer.committed_samples
    done_ids = writer.committed_sample_ids()
    expected = np.array([prompts[i].sample_id for i in plan.order[:start]], dtype=done_ids.dtype)
    if not np.array_equal(done_ids, expected):
        raise RuntimeError(f"{store_path}: committed samples do not match the processing order; delete the store")
    if start:
        log.info("collect: resuming after %d committed samples", start)
    model = load_model(cfg.model)
    if n_layers(model) != plan.n_layers:
        raise ConfigError(
            f"model.name: {cfg.model.name} has {n_layers(model)} layers but its config says {plan.n_layers}"
        )
    runner = BatchRunner(cfg, model, tokenizer, plan, dtype)
    with open_sink(writer, inf) as sink:
        stats = run_batches(runner, prompts, plan.order, start, sink)
    writer.finalize({"collect_stats": stats})
    log.info(
        "collect: %d prompts in %.1f s (%.0f stored tokens/s)",
        len(prompts) - start,
        stats["seconds"],
        stats["tokens"] / max(stats["seconds"], 1e-9),
    )
