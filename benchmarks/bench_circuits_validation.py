"""Held-out circuit validation on a collected store and its SAEs: the numbers of issue 9 item 11, and their cost.

For the `toxic` set (toxic prompts vs harmless contrast) and `over_refusal` (safe refused vs safe
answered): split by prompt hash, mean baseline from the contrast's discovery half, node effects
by integrated gradients (refusal_lab.circuits.attribution) on the target's discovery half, the
top `--size` features as the circuit, then `validate_circuit` on the held-out halves (metric
faithfulness/completeness/random sets, generation with ablation/steering/random sets judged by
the keyword judge, KL on harmless prompts, difference-in-means direction from the store).
Prints JSON and wall seconds per part.

    python -m refusal_lab "stages=[collect,sae]" artifacts_dir=/tmp/art tracking=disabled
    python benchmarks/bench_circuits_validation.py --store /tmp/art/collect/<fp>.zarr --sae /tmp/art/sae/<fp>
    # GPU (real model; store and SAEs from the same run):
    python benchmarks/bench_circuits_validation.py --model llama2_7b --store ... --sae ... --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from refusal_lab.circuits.attribution import node_effects
from refusal_lab.circuits.baseline import mean_baseline
from refusal_lab.circuits.batches import make_text_batches, prefix_token_count
from refusal_lab.circuits.config import Method
from refusal_lab.circuits.direction import directions_from_store
from refusal_lab.circuits.edges import select_nodes
from refusal_lab.circuits.held_out import ablation_summary, validate_circuit
from refusal_lab.circuits.metric import logits_needed, metric_spec, refusal_metric
from refusal_lab.circuits.sets import is_validation, text_hash
from refusal_lab.config import RunConfig, register_configs
from refusal_lab.models import chat_format, load_model, load_tokenizer
from refusal_lab.refusal import keyword_refusal
from refusal_lab.sae.saelens import load_sae
from refusal_lab.store import ActivationStore

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--sae", required=True, help="the sae stage's folder holding one folder per hook")
    ap.add_argument("--model", default="organism")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n-random", type=int, default=10)
    ap.add_argument("--sets", default="toxic,over_refusal")
    ap.add_argument("--max-validation", type=int, default=32, help="held-out prompts validated on (first by hash)")
    ap.add_argument("--curve-to", type=int, default=0, help="extend the faithfulness curve to this many nodes")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", [f"model={args.model}", f"model.device={args.device}"]))
    assert isinstance(cfg, RunConfig)
    circ = cfg.circuits
    tokenizer = load_tokenizer(cfg.model)
    t0 = time.perf_counter()
    model = load_model(cfg.model)
    for p in model.parameters():
        p.requires_grad_(False)
    store = ActivationStore.open(Path(args.store))
    saes = {h: load_sae(Path(args.sae) / h, args.device) for h in store.hook_points if (Path(args.sae) / h).is_dir()}
    samples = store.samples()
    prompts, labels = list(samples["prompt"]), list(samples["label"])
    refused = np.asarray(samples["refused"], dtype=bool)
    sample_id = np.asarray(samples["sample_id"]).tolist()
    held = np.array([is_validation(p, circ.validation_share) for p in prompts])
    spec = metric_spec(circ.metric, tokenizer, cfg.model.refusal_tokens)
    fmt, _ = chat_format(cfg.model, tokenizer)
    n_prefix = prefix_token_count(tokenizer, fmt)

    def batches(idx):
        return make_text_batches(
            cfg.model, tokenizer, [prompts[i] for i in idx], circ.batch_size, cfg.inference.max_prompt_tokens,
            device=args.device,
        )  # fmt: skip

    def where(mask):
        return np.flatnonzero(mask).tolist()

    lab = np.array(labels)
    harmless_val = where((lab == "harmless") & held)
    toxic_ref_disc = where((lab == "toxic") & refused & ~held)
    harmless_ans_disc = where((lab == "harmless") & ~refused & ~held)
    directions = directions_from_store(
        store, list(saes), [sample_id[i] for i in toxic_ref_disc], [sample_id[i] for i in harmless_ans_disc]
    )
    timings: dict[str, float] = {"load": time.perf_counter() - t0}
    sets = {
        "toxic": (
            where((lab == "toxic") & ~held),
            where((lab == "harmless") & ~held),
            where((lab == "toxic") & held),
            None,
        ),
        "over_refusal": (
            where((lab == "safe") & refused & ~held),
            where((lab == "safe") & ~refused & ~held),
            where((lab == "safe") & refused & held) + where((lab == "toxic") & held),
            "safe",
        ),
    }
    results = {}
    for name in args.sets.split(","):
        disc, contrast, val, target_label = sets[name]
        t1 = time.perf_counter()
        baseline = mean_baseline(model, saes, batches(contrast), n_prefix)
        effects = node_effects(model, saes, batches(disc), baseline, spec, Method.ig, circ.ig_steps)
        ranking = select_nodes(
            {h: effects.mean_feats(h) for h in effects.hooks}, 0.0, 1.0, max(args.size, args.curve_to)
        )
        t2 = time.perf_counter()
        val = sorted(val, key=lambda i: text_hash(prompts[i]))[: args.max_validation]
        val_batches = batches(val)
        is_target = [target_label is None or labels[i] == target_label for i in val]
        out = validate_circuit(
            model, saes, baseline, [(h, f) for h, f, _ in ranking], lambda lg, b: refusal_metric(lg, b, spec),
            val_batches, size=args.size, n_random=args.n_random,
            sizes=sorted({*circ.faithfulness_sizes, *[n for n in (64, 128, 256, 512, 1024) if n <= args.curve_to]}),
            labels=[labels[i] for i in val], is_target=is_target, harmless_batches=batches(harmless_val),
            judge=lambda rs: [keyword_refusal(r, cfg.model.refusal_prefixes) for r in rs], tokenizer=tokenizer,
            steer_alpha=circ.steer_alpha, max_new_tokens=circ.max_new_tokens, directions=directions,
            logits_to_keep=lambda b: logits_needed(b, spec),
        )  # fmt: skip
        timings[f"{name}_discovery"] = t2 - t1
        timings[f"{name}_validation"] = time.perf_counter() - t2
        results[name] = {
            "n_discovery": len(disc),
            "circuit_hooks": dict(Counter(h for h, _, _ in ranking[: args.size])),
            "n_validation": len(val),
            "faithfulness": out["faithfulness"],
            "faithfulness_curve": out["faithfulness_curve"],
            "completeness": out["completeness"],
            "metric_random": {
                k: out["metric"]["random"][k] for k in ("effect", "random_median", "percentile", "p_value")
            },
            "ablation": ablation_summary(out),
            "by_label": out["ablation"]["by_label"],
            "steered": out["ablation"]["refusal_rate_drop_steered"],
            "kl_harmless_steered": out["ablation"]["kl_harmless_steered"],
            "direction": {
                k: out["direction"][k] for k in ("refusal_rate_drop", "refusal_rate_drop_by_label", "kl_harmless")
            },
            "direction_cosine": {
                k: out["direction"]["cosines"][k]
                for k in ("max_abs_cosine", "mean_abs_cosine", "random_mean_abs_cosine")
            },
            "validation_seconds": out["seconds"],
        }
    print(json.dumps({"results": results, "seconds": timings, "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
