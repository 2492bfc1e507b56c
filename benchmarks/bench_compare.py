"""Cost of the category comparison (refusal_lab.circuits.compare): time per label permutation by problem size.

    python benchmarks/bench_compare.py                       # default sizes (the organism's and larger)
    python benchmarks/bench_compare.py --sizes 2000x1000x10  # prompts x pool features x categories

Per size: planted per-prompt effects (a shared mechanism plus 3 category-specific features per
category), one compare_categories call with 1000 permutations and 200 bootstrap draws; printed:
ms per permutation (as the stage reports it), total seconds, and the overall verdict (partly_shared
expected). One process, CPU, numpy.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from refusal_lab.circuits.compare import compare_categories

log = logging.getLogger("bench_compare")


def planted(n: int, pool: int, cats: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = np.zeros((cats, pool))
    means[:, :10] = np.linspace(5, 2, 10)
    for c in range(cats):
        means[c, 10 + 3 * c : 13 + 3 * c] = 3.0
    codes = np.arange(n) % cats
    return means[codes] + rng.standard_normal((n, pool)), np.asarray([f"c{c}" for c in codes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", nargs="+", default=["37x41x10", "90x200x10", "500x300x10", "2000x1000x10"])
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("%-14s %12s %9s %s", "NxPxC", "ms/perm", "total s", "verdict")
    for size in args.sizes:
        n, pool, cats = (int(x) for x in size.split("x"))
        effects, categories = planted(n, pool, cats)
        out = compare_categories(
            effects, categories, ["residuals_0"] * pool, np.arange(pool), size=13,
            n_permutations=args.permutations, n_bootstrap=args.bootstrap, seed=0,
        )  # fmt: skip
        log.info(
            "%-14s %12.3f %9.2f %s", size, 1e3 * out.get("seconds_per_permutation", 0.0), out.get("seconds", 0.0),
            out.get("verdict", out.get("status")),
        )  # fmt: skip


if __name__ == "__main__":
    main()
