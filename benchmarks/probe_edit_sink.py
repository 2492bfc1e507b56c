"""Why the weight edit breaks a real model: the attention-sink (massive activation) direction, measured.

Reads a finished run's artifacts (store, SAEs, circuits; the run's own overrides are passed through);
writes nothing. On SmolLM2-135M-Instruct the first token's residual (<|im_start|>) reaches a norm of
~25,000 at layers 15-22 (one dimension carries almost all of it) against ~150-300 for other tokens, and
the span of any 32 active SAE decoder directions holds 0.3-0.5 of that vector's norm, so orthogonalising
every writer against the span (refusal_lab.edit.weights) shrinks the sink every attention head leans on.
This compares, on the edit stage's held-out prompts (keyword judge, KL on harmless prompts), the edit and
random same-size feature sets as the stage builds them with the same edits whose bases are first made
orthogonal to the sink's span (the first token's residual at every layer input up to the last hook).

    python -m refusal_lab experiment=smollm2_cpu data.limit=400 'circuits.sets=[toxic,over_refusal,toxic_refused]' \\
        hydra.run.dir=/tmp/smolfull/run artifacts_dir=/tmp/smolfull/art          # 18 min on 2 cores, once
    python benchmarks/probe_edit_sink.py experiment=smollm2_cpu data.limit=400 \\
        'circuits.sets=[toxic,over_refusal,toxic_refused]' artifacts_dir=/tmp/smolfull/art
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from refusal_lab.circuits.validate import active_features, random_node_sets
from refusal_lab.edit.intervene import Bases, Condition, orthonormal, projection_fns, writer_bases
from refusal_lab.edit.stage import load_nodes, source_path
from refusal_lab.layers import HookPoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finished_run import open_finished_run, print_table  # noqa: E402

N_RANDOM = 4


def without(span_DS: torch.Tensor, bases: Bases) -> Bases:
    """Each writer's basis made orthogonal to the span, then re-orthonormalised."""
    return {p: orthonormal((u - span_DS @ (span_DS.T @ u)).T) for p, u in bases.items()}


def main() -> None:
    run = open_finished_run(sys.argv[1:])
    cfg, ctx, model, saes, prompts = run.cfg, run.ctx, run.model, run.saes, run.prompts
    hooks = list(saes)
    nodes = load_nodes(source_path(ctx), list(cfg.edit.hooks), cfg.edit.max_features)
    first = prompts.batches[0]
    start = int(first.attention_mask[0].nonzero()[0])  # left padding: the first real token of row 0
    with torch.no_grad():
        states = model(first.input_ids[:1], attention_mask=first.attention_mask[:1], output_hidden_states=True)
    last = max(HookPoint.from_name(h).layer for h in hooks)
    sink = torch.stack([states.hidden_states[layer][0, start] for layer in range(last + 1)])
    for layer in sorted({HookPoint.from_name(h).layer for h in hooks}):
        norms = states.hidden_states[layer][0, start:].norm(dim=-1)
        others = float(norms[1:].median())
        print(f"layer {layer} input: first token norm {float(norms[0]):.0f}, median of the others {others:.0f}")
    span = orthonormal(sink)
    bases = writer_bases(model, saes, nodes)
    conditions = [
        Condition("unedited", {}),
        Condition("edit", projection_fns(bases)),
        Condition("edit_sink_kept", projection_fns(without(span, bases))),
    ]
    circuit = {h: torch.tensor(f) for h, f in nodes.items()}
    active = active_features(model, {h: saes[h] for h in nodes}, prompts.batches)
    random_sets, _ = random_node_sets(circuit, active, N_RANDOM, cfg.seed)
    for i, chosen in enumerate(random_sets):
        rand = writer_bases(model, saes, {h: idx.tolist() for h, idx in chosen.items()})
        conditions.append(Condition(f"random_{i}", projection_fns(rand)))
        conditions.append(Condition(f"random_{i}_sink_kept", projection_fns(without(span, rand))))
    print("features:", {h: len(f) for h, f in nodes.items()})
    print_table(run.evaluate(conditions))


if __name__ == "__main__":
    main()
