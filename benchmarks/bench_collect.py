"""Collect-stage throughput against plain HF and the disk, side by side in one process.

    python benchmarks/bench_collect.py                       # CPU: a d_model-512 Llama, 64 OR-Bench prompts
    python benchmarks/bench_collect.py --arch llama2-7b --device cuda --prompts 512 --batch 64

Same model, prompts and batch for every measurement:
  plain forward   HF forward over the prompt batches (the bound for prompt-only capture)
  plain generate  HF `generate` with max_new_tokens (the bound for capture during generation)
  disk            sequential write bandwidth of the store's disk (fsync'd), in bytes/s
  collect         refusal_lab's collect path (hooks, gather, host copy, background float16
                  conversion, compression, Zarr writes, per-batch commits) into a real store
The disk-limited rate is bandwidth / bytes stored per prompt; the target is
collect >= 0.9 x min(plain, disk-limited). Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from refusal_lab.collect import BatchRunner, CollectPlan, left_pad, open_sink, run_batches
from refusal_lab.config import InferenceConfig, ModelConfig, Positions, RunConfig
from refusal_lab.data import Prompt
from refusal_lab.layers import expand_layer_spec
from refusal_lab.models import chat_format, encode_prompts
from refusal_lab.store_writer import StoreWriter, disk_write_bandwidth

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ARCHS = {
    # d_model >= 512 so that compute, not Python overhead, dominates on a CPU.
    "cpu-512": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "cpu-1024": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
}


def load_prompts(n: int) -> list[Prompt]:
    import csv

    with (SHARED / "or_bench" / "or-bench-hard-1k.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    rows = (rows * (n // len(rows) + 1))[:n]
    return [Prompt(i, r["prompt"], r["category"], "safe", f"or-bench-hard-1k.csv:{i + 2}") for i, r in enumerate(rows)]


def build(arch: str, device: str, dtype: torch.dtype, tmp: Path):
    shutil.copy(SHARED / "tokenizers" / "llama2" / "tokenizer.model", tmp / "tokenizer.model")
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    template = json.loads((SHARED / "chat_templates" / "ollama_template_index.json").read_text())[28]["template"]
    tokenizer.chat_template = template
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, num_key_value_heads=ARCHS[arch]["num_attention_heads"], **ARCHS[arch])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model, tokenizer


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="cpu-512")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--layers", default="all", help="layer spec, comma-separated")
    parser.add_argument("--store-dir", default=None, help="folder on the disk to measure (default: a temp dir)")
    parser.add_argument("--modes", default="prompt,all", help="prompt (prompt-only capture), all (with generation)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved plain/collect pairs per mode")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    work = Path(tempfile.mkdtemp(dir=args.store_dir))
    model, tokenizer = build(args.arch, args.device, dtype, work)
    prompts = load_prompts(args.prompts)
    model_cfg = ModelConfig(
        name="bench", activation_layers=args.layers.split(","), torch_dtype=replace_dtype(args.dtype)
    )
    token_ids = encode_prompts(model_cfg, tokenizer, [p.text for p in prompts], 4096)
    order = sorted(range(len(prompts)), key=lambda i: (-len(token_ids[i]), i))
    points = expand_layer_spec(model_cfg.activation_layers, len(model.model.layers))
    fmt, _ = chat_format(model_cfg, tokenizer)
    device = args.device

    plan_batches = batches(order, args.batch)
    inputs = [left_pad([token_ids[i] for i in b], tokenizer.pad_token_id, torch.device(device)) for b in plan_batches]
    n = len(prompts)
    results: dict[str, Any] = {"prompts": n, "batch": args.batch, "hook_points": len(points)}

    @torch.inference_mode()
    def plain_forward():
        for ids, mask in inputs:
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)

    @torch.inference_mode()
    def plain_generate():
        for ids, mask in inputs:
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                min_new_tokens=args.max_new_tokens,
            )

    timed(lambda: model(input_ids=inputs[0][0][:2], attention_mask=inputs[0][1][:2]), device)  # warm-up
    bandwidth = disk_write_bandwidth(work, 256 * 2**20)
    results["disk_bytes_s"] = bandwidth

    for positions, max_new, plain in [
        (Positions.prompt, 0, plain_forward),
        (Positions.all, args.max_new_tokens, plain_generate),
    ]:
        key = positions.value
        if key not in args.modes.split(","):
            continue
        inf = InferenceConfig(batch_size=str(args.batch), max_new_tokens=max_new, positions=positions)
        cfg = RunConfig(model=replace(model_cfg, refusal_tokens=["▁I"]), inference=inf)
        plan = CollectPlan(points, token_ids, order, fmt, model.config.hidden_size, len(model.model.layers), 0, 0, 0)
        runner = BatchRunner(cfg, model, tokenizer, plan, dtype)
        # Like plain generate (min_new_tokens), never stop early: every prompt generates max_new tokens.
        runner.eos_ids = [-1]
        stats: dict[str, float] = {}

        def collect(store_path: Path, todo=order, runner=runner, stats=stats, inf=inf, key=key) -> None:
            writer = StoreWriter.open(
                store_path,
                fingerprint=key,
                hook_points=[p.name for p in points],
                d_model=model.config.hidden_size,
                model_dtype=dtype,
                chunk_tokens=inf.chunk_tokens,
                attrs={},
            )
            with open_sink(writer, inf) as sink:
                stats.update(run_batches(runner, prompts, todo, 0, sink, progress_every_s=1e9))
            writer.finalize()

        # Interleaved plain / collect pairs: on a shared machine the speed drifts by 20% or more
        # between minutes, so each collect run is compared with the plain run right before it.
        collect(work / f"warm-up-{key}.zarr", order[: args.batch])  # zarr's threads, blosc, first allocations
        pairs = []
        for r in range(args.repeats):
            store_path = work / f"store-{key}-{r}.zarr"
            plain_s = timed(plain, device)
            collect_s = timed(lambda store_path=store_path: collect(store_path), device)
            pairs.append((plain_s, collect_s))
            stored_bytes = sum(f.stat().st_size for f in store_path.rglob("*") if f.is_file())
            shutil.rmtree(store_path)
        raw_bytes = stats["tokens"] * len(points) * model.config.hidden_size * 2
        disk_limited = bandwidth / (raw_bytes / n)
        plain_rate = n / statistics.median(p for p, _ in pairs)
        ratios = [min(n / c, disk_limited) / min(n / p, disk_limited) for p, c in pairs]
        results[f"plain_{key}_prompts_s"] = plain_rate
        results[f"collect_{key}_prompts_s"] = n / statistics.median(c for _, c in pairs)
        results[f"disk_limited_{key}_prompts_s"] = disk_limited
        results[f"compression_ratio_{key}"] = raw_bytes / stored_bytes
        results[f"ratios_{key}"] = ratios
        results[f"ratio_{key}"] = statistics.median(ratios)
        print(
            f"{key:>6}: collect {results[f'collect_{key}_prompts_s']:8.2f} prompts/s | plain {plain_rate:8.2f} | "
            f"disk-limited {disk_limited:8.2f} | ratio to min, median of {args.repeats} pairs "
            f"{results[f'ratio_{key}']:.3f} ({' '.join(f'{r:.2f}' for r in ratios)}) | "
            f"compression {results[f'compression_ratio_{key}']:.3f}x"
        )
    print(f"disk: {bandwidth / 1e9:.2f} GB/s; device {device}, arch {args.arch}, dtype {args.dtype}")
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def replace_dtype(name: str):
    from refusal_lab.config import TorchDtype

    return TorchDtype(name)


if __name__ == "__main__":
    main()
