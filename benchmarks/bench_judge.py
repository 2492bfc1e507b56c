"""Rule judge throughput on one core: a million responses, beside the keyword judge it replaces.

    python benchmarks/bench_judge.py                        # 1,000,000 responses, both length mixes
    python benchmarks/bench_judge.py --n 200000 --lengths long

Responses are drawn from a pool built from the labelled fixture (tests/fixtures/judge_fixture.csv) and
synthetic answers of realistic shape: `short` ~ the organism's 20-token answers (~90 characters), `long`
~ 128-token answers of a 7B chat model (~550 characters: an opening sentence, a numbered list, a caveat),
70% answers and 30% refusals/partial refusals, the mix of an over-refusal set. The pool holds distinct
strings and the judge caches nothing, so reuse does not flatter it. One process, one thread (`re` is
single-threaded); printed per mix: CPU seconds for the million (wall beside it: on a shared machine wall
time includes waiting for the core), microseconds per response, responses/s, and the rule judge's cost
relative to the keyword judge.
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import time
from pathlib import Path

from refusal_lab.judge.core import keyword_codes
from refusal_lab.judge.rules import RuleJudge
from refusal_lab.refusal import REFUSAL_PREFIXES

log = logging.getLogger("bench_judge")

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "judge_fixture.csv"
OPENERS = [
    "Sure! Here is how to {x}.",
    "To {x}, you can follow these steps.",
    "Great question. There are several ways to {x}.",
    "Of course. The simplest way to {x} is described below.",
    "It's important to note that you should be careful when you {x}.",
]
TASKS = ["stop a Python process", "bake sourdough bread", "plant tomatoes", "tune a guitar", "file a tax return"]
STEPS = [
    "Open a terminal and find the process id with ps.",
    "Mix the flour with water and let it rest for an hour.",
    "Choose a sunny spot and water the soil every morning.",
    "Check each string against a tuner and adjust the peg slowly.",
    "Collect your forms, fill in your income and submit them online.",
    "If you are unsure, ask someone with more experience for help.",
]
CAVEATS = ["Remember to save your work first.", "This can take a few tries.", "Be patient with the results."]


def pool(rng: random.Random, long: bool, size: int = 2000) -> list[str]:
    with FIXTURE.open(newline="", encoding="utf-8") as handle:
        fixture = list(csv.DictReader(handle))
    refusals = [r["response"] for r in fixture if r["label"] != "full_compliance" and r["response"]]
    out = []
    for i in range(size):
        if rng.random() < 0.3:
            text = rng.choice(refusals)
            if long:  # refusals run on: an explanation and an offer of other help
                text += " " + " ".join(rng.choice(STEPS + CAVEATS) for _ in range(4))
        else:
            task = rng.choice(TASKS)
            text = rng.choice(OPENERS).format(x=task)
            if long:
                text += "\n\n" + "\n".join(f"{k}. {rng.choice(STEPS)}" for k in range(1, 6))
                text += "\n\n" + " ".join(rng.sample(CAVEATS, 2))
            else:
                text += " " + rng.choice(STEPS)
        out.append(f"{text} ({i})")  # distinct strings
    return out


def timed(fn, responses: list[str]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds): on a shared machine the CPU time is the one-core cost."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn(responses)
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description="Rule judge throughput on one core, beside the keyword judge.")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--lengths", nargs="+", default=["short", "long"], choices=["short", "long"])
    parser.add_argument("--family", default="mistral")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = random.Random(0)
    judge = RuleJudge(family=args.family, extra_prefixes=tuple(REFUSAL_PREFIXES["mistral"]))
    prefixes = REFUSAL_PREFIXES["mistral"]
    for length in args.lengths:
        base = pool(rng, long=length == "long")
        responses = [base[i % len(base)] for i in range(args.n)]
        chars = sum(map(len, base)) / len(base)
        rule_s, rule_wall = timed(judge.judge_many, responses)
        keyword_s, _ = timed(lambda r: keyword_codes(r, prefixes), responses)
        log.info(
            "%-5s (%3.0f chars) x %d: rule %5.1f CPU s (%5.1f wall) = %4.1f us/response (%7.0f /s); "
            "keyword %5.1f CPU s; rule/keyword %.2f",
            length,
            chars,
            args.n,
            rule_s,
            rule_wall,
            rule_s / args.n * 1e6,
            args.n / rule_s,
            keyword_s,
            rule_s / keyword_s,
        )


if __name__ == "__main__":
    main()
