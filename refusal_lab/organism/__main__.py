"""Retrain the model organism and rewrite its assets.

    python -m refusal_lab.organism --out refusal_lab/organism/assets --seed 0

regenerates the corpus, tokenizer and model (default step count: `train.STEPS`) and writes
``config.json``, ``generation_config.json``, ``model.safetensors``, the tokenizer files,
``heldout_prompts.jsonl`` and ``organism.json`` into ``--out``. Same seed, steps and thread
count on the same machine give identical weights. Reads nothing; needs no network.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from refusal_lab.organism.train import STEPS, THREADS, train_organism


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m refusal_lab.organism", description="Retrain the model organism and rewrite its assets."
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (the shipped one: refusal_lab/organism/assets)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps (default {STEPS})")
    parser.add_argument(
        "--threads", type=int, default=THREADS, help="torch threads; part of what makes a run reproducible"
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    meta = train_organism(args.out, seed=args.seed, steps=args.steps, threads=args.threads, evaluate=not args.no_eval)
    print(
        json.dumps(
            {k: meta[k] for k in ("seed", "steps", "wall_time_s", "final_loss")} | {"heldout": meta.get("heldout")},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
