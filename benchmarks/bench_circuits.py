"""Circuits-stage attribution cost against a plain forward+backward, side by side in one process.

    python benchmarks/bench_circuits.py                                  # CPU: a d_model-256 Llama, 2 hooks
    python benchmarks/bench_circuits.py --arch llama2-7b --device cuda --dtype bfloat16 \\
        --hooks 0,8,16,24 --expansion 4 --batch 8 --seq 128 --steps 4      # the GPU command

Random weights (speed does not depend on them), random TopK SAEs at `residuals_<i>` for each
hook index. Measured per batch (median of --repeats after a warm-up):
  fwd+bwd        plain model forward + backward of the refusal metric (the unit of cost)
  spliced fwd    forward with every SAE spliced in (features + error nodes)
  attribution    attribution patching (1 clean forward + 1 forward/backward)
  ig             integrated gradients with --steps points (1 clean forward + steps forward/backward)
  edges          edges between successive hooks for --nodes surviving nodes per hook
The ratios to fwd+bwd show the stage's claim: attribution costs a small constant number of
passes (never one per feature); edges cost one backward per surviving downstream node.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from refusal_lab.circuits.attribution import node_effects
from refusal_lab.circuits.baseline import zero_baseline
from refusal_lab.circuits.batches import build_batch
from refusal_lab.circuits.config import Method, MetricKind
from refusal_lab.circuits.edges import edge_effects
from refusal_lab.circuits.metric import MetricSpec, refusal_metric
from refusal_lab.circuits.spliced import forward_batch, spliced
from refusal_lab.sae.config import Architecture
from refusal_lab.sae.model import Sae

ARCHS: dict[str, dict[str, Any]] = {
    "cpu-256": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
}


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="cpu-256")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hooks", default="0,2", help="residual layer indices with an SAE")
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=8, help="surviving nodes per hook for the edge timing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(
        vocab_size=32000, num_key_value_heads=ARCHS[args.arch]["num_attention_heads"], **ARCHS[args.arch]
    )
    with torch.device(args.device):  # initialise on the device: a 7B model's CPU init takes minutes
        model = LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)
    d = config.hidden_size
    hooks = [f"residuals_{int(i)}" for i in args.hooks.split(",")]
    saes = {
        h: Sae(d, args.expansion * d, Architecture.topk, args.k).to(args.device).eval().requires_grad_(False)
        for h in hooks
    }
    prompts = [torch.randint(3, 32000, (args.seq - (i % 4),)).tolist() for i in range(args.batch)]
    batch = build_batch(prompts, n_post=4, pad_id=0, device=args.device)
    spec = MetricSpec(MetricKind.first_token_score, (306,))
    baseline = zero_baseline(saes)

    def plain() -> None:
        with torch.enable_grad():
            emb = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
            out = model(inputs_embeds=emb, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
            refusal_metric(out.logits, batch, spec).sum().backward()

    def splice_fwd() -> None:
        with torch.no_grad(), spliced(model, saes):
            forward_batch(model, batch, logits_to_keep=1)

    nodes = {h: list(range(args.nodes)) for h in hooks}
    runs = {
        "fwd+bwd": plain,
        "spliced fwd": splice_fwd,
        "attribution": lambda: node_effects(model, saes, [batch], baseline, spec, Method.attribution_patching),
        f"ig ({args.steps} steps)": lambda: node_effects(model, saes, [batch], baseline, spec, Method.ig, args.steps),
        f"edges ({args.nodes}/hook)": lambda: edge_effects(model, saes, [batch], baseline, spec, nodes),
    }
    seconds = {name: timed(fn, args.device, args.repeats) for name, fn in runs.items()}
    unit = seconds["fwd+bwd"]
    print(
        f"arch {args.arch}, device {args.device}, dtype {args.dtype}, hooks {hooks}, d_sae {args.expansion * d}, "
        f"batch {args.batch} x {args.seq} tokens"
    )
    print(f"{'measurement':<22}{'s/batch':>10}{'x fwd+bwd':>12}{'prompts/s':>12}")
    for name, s in seconds.items():
        print(f"{name:<22}{s:>10.3f}{s / unit:>12.2f}{args.batch / s:>12.1f}")


if __name__ == "__main__":
    main()
