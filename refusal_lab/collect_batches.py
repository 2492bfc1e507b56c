"""The collect stage's batch loop: one batch through generation with hooks into a store block,
and the loop over batches that halves the batch size on out-of-memory without losing a sample.

Reads: the model, the tokenised prompts of a `CollectPlan`. Writes: `TokenBlock`s to a sink
(normally refusal_lab.store_writer's BackgroundWriter).

Shape letters: B batch, T padded prompt length, M max_new_tokens, C recorded columns, N tokens kept, D d_model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.collect_plan import CollectPlan, recorded_columns
from refusal_lab.config import InferenceConfig, RunConfig
from refusal_lab.data import Prompt
from refusal_lab.generation import Generation, generate_greedy, left_pad
from refusal_lab.hooks import ActivationRecorder, hooks_registered
from refusal_lab.judge.continuation import continue_responses
from refusal_lab.judge.core import refused_by_rule, rule_judge_for
from refusal_lab.models import input_device
from refusal_lab.progress import progress_bar
from refusal_lab.refusal import refusal_score, refusal_token_ids
from refusal_lab.store import Phase, SampleRecord, TokenBlock
from refusal_lab.store_writer import BackgroundWriter, StoreWriter

log = logging.getLogger(__name__)

CPU_AUTO_BATCH = 32
"""`batch_size: auto` on CPU: no out-of-memory signal to search with, and larger batches gain little there."""


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
        self.rule_judge = rule_judge_for(cfg.judge, cfg.model.name, cfg.model.refusal_prefixes)  # `refused`
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
                settings=self.plan.greedy,
            )
        keep_BC, table = token_table(gen, mask_BT, ids_BT, prompt_cols, decode_cols, n_post)
        b_idx, c_idx = keep_BC.nonzero(as_tuple=True)  # row-major: each sample's tokens in order
        width = prompt_cols + decode_cols
        views = {p.name: self.recorder.view(p, len(rows), width) for p in self.recorder.points}
        acts = {name: _to_host(cells) for name, cells in gather_cells(views, b_idx, c_idx).items()}
        ready = _copies_done(acts)
        scores = refusal_score(gen.first_logits_BV, self.refusal_ids).cpu().tolist()
        tokens = gen.tokens_BM.cpu()
        valid = gen.valid_BM.cpu()
        n_generated = valid.sum(-1).tolist()
        # The judges read up to judge.max_response_tokens: capped rows are continued outside the hooks.
        response_ids = continue_responses(
            self.model,
            rows,
            tokens,
            valid,
            self.cfg.judge.max_response_tokens,
            self.eos_ids,
            self.pad_id,
            self.device,
            self.plan.greedy,
        )
        samples: list[SampleRecord] = []
        for row, index in enumerate(indices):
            prompt = prompts[index]
            response = str(self.tokenizer.decode(response_ids[row], skip_special_tokens=True))
            samples.append(
                SampleRecord(
                    sample_id=prompt.sample_id,
                    prompt=prompt.text,
                    category=prompt.category,
                    label=prompt.label,
                    response=response,
                    refused=refused_by_rule(self.rule_judge, response, self.cfg.judge.partial_is_refused, prompt.text),
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


def gather_cells(views: dict[str, torch.Tensor], b_idx: torch.Tensor, c_idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """views[name][b_idx, c_idx] for every capture buffer, each on its own device.

    With `device_map=auto` the buffers live on their layers' GPUs while the indices come from the
    embedding's device, and PyTorch refuses indices on another GPU: move them once per device.
    """
    moved: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, view_BCD in views.items():
        device = view_BCD.device
        if device not in moved:
            moved[device] = (b_idx.to(device, non_blocking=True), c_idx.to(device, non_blocking=True))
        b, c = moved[device]
        out[name] = view_BCD[b, c]
    return out


def _copies_done(acts: dict[str, torch.Tensor]) -> Callable[[], None] | None:
    """What the writer waits on before reading `acts`: one CUDA event per source GPU of the async copies."""
    devices = {a.device for a in acts.values() if a.device.type == "cuda"}
    if not devices:
        return None
    events = []
    for device in devices:
        with torch.cuda.device(device):
            event = torch.cuda.Event()
            event.record()  # on the device's current stream, where its copy to pinned memory was queued
            events.append(event)

    def wait() -> None:
        for event in events:
            event.synchronize()

    return wait


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
    bar = progress_bar(total=len(order), initial=start, desc="collect: prompts")
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
        bar.update(len(indices))
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
    bar.close()
    elapsed = time.perf_counter() - t0
    return {"batch_size": float(batch_size), "seconds": elapsed, "tokens": float(n_tokens)}


def open_sink(writer: StoreWriter, inf: InferenceConfig) -> BackgroundWriter:
    """The background writer for a collect run, with the config's queue bound and commit policy."""
    return BackgroundWriter(
        writer, max_queue=inf.writer_queue, commit_tokens=inf.commit_tokens, commit_seconds=inf.commit_seconds
    )
