"""Collect on a model split over devices gives the store blocks of the same model on one device.

The case issue 8 (item 12) found: with `model.device_map=auto` over several GPUs the capture
buffers live on their layers' GPUs while the gather indices come from the embedding's GPU, which
PyTorch refuses. This script splits the organism's layers round-robin over every visible GPU
(with one GPU: the embedding on the CPU, the layers on cuda:0) and compares each batch's block
with a single-device run. Needs a GPU; on CPU, tests/integration/test_collect.py covers the gather.

    python benchmarks/check_device_map.py            # exit code 0 = blocks equal
"""

from __future__ import annotations

import logging
import sys

import torch
from transformers import AutoModelForCausalLM

from refusal_lab.collect_batches import BatchRunner
from refusal_lab.collect_plan import plan_collect
from refusal_lab.config import Device, ModelConfig, RunConfig
from refusal_lab.data import load_prompts
from refusal_lab.models import ORGANISM_DIR, load_tokenizer

log = logging.getLogger("check_device_map")


def split_map(n_layers: int) -> dict[str, str | int]:
    gpus = list(range(torch.cuda.device_count()))
    first: str | int = gpus[0] if len(gpus) > 1 else "cpu"  # the embedding's device
    layers = {f"model.layers.{i}": gpus[(i + 1) % len(gpus)] for i in range(n_layers)}
    return {
        "model.embed_tokens": first,
        "model.rotary_emb": first,
        **layers,
        "model.norm": gpus[-1],
        "lm_head": gpus[-1],
    }


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("needs a GPU")
        return 2
    cfg = RunConfig(model=ModelConfig(device=Device.cuda, activation_layers=["all", "mlp_all", "attention_all"]))
    prompts = load_prompts(cfg.data)[:24]
    tokenizer = load_tokenizer(cfg.model)
    plan = plan_collect(cfg, tokenizer, prompts)
    single = AutoModelForCausalLM.from_pretrained(ORGANISM_DIR, dtype=torch.float32).eval()
    torch.nn.Module.to(single, "cuda:0")  # HF types `.to` too narrowly for pyright
    device_map = split_map(plan.n_layers)
    split = AutoModelForCausalLM.from_pretrained(ORGANISM_DIR, dtype=torch.float32, device_map=device_map).eval()
    log.info("device map: %s", device_map)
    runners = [BatchRunner(cfg, m, tokenizer, plan, torch.float32) for m in (single, split)]
    ok = True
    for start in range(0, len(plan.order), 8):
        indices = plan.order[start : start + 8]
        want, got = (r.run(prompts, indices) for r in runners)
        for block in (want, got):
            if block.ready is not None:
                block.ready()
        same_tokens = (want.token_id == got.token_id).all() and (want.position == got.position).all()
        worst = max((want.acts[h].float() - got.acts[h].float()).abs().max().item() for h in want.acts)
        devices = sorted({str(b.device) for b in runners[1].recorder.buffers.values()})
        log.info("batch at %d: tokens equal %s, max |diff| %.2e, buffers on %s", start, same_tokens, worst, devices)
        ok &= bool(same_tokens) and worst < 1e-4
    log.info("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
