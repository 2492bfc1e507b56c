"""Which stored tokens an SAE sees, and the seeded, resumable stream of shuffled training batches.

Reads: an `ActivationSource` (the store's token and sample tables, and activation rows in
contiguous blocks). Writes nothing.

* Held-out split: a seeded share of each label's distinct prompts (by a hash of the prompt text,
  so duplicates stay together) is never trained on.
* Filters: BOS (position 0), token phases, and per hook norm outliers (> factor x median norm)
  and rows holding inf/NaN (float16 overflow); the last two are dropped per batch by the trainer,
  since a token can be an outlier at one hook only.
* Balance: with `balance: label_category` each epoch draws its rows over the whole training set
  (systematic sampling on the label/category weights), then packs them into windows as below.
* Stream: the store is cut into blocks of `read_block_tokens` rows. Each epoch shuffles the
  blocks (seeded by epoch) and packs them into windows of at most `buffer_tokens` training
  rows; a window is read (one contiguous read per block and hook), shuffled, and cut into
  batches, while the next window loads in a background thread. The order is a pure function
  of (seed, epoch), so batch `s` is always the same rows and training resumes at any step.

Shape letters: N tokens, B batch, H hook points read together, D d_model.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from refusal_lab.sae.config import Balance, SaeConfig, TokenFilterConfig, TokenPhase
from refusal_lab.sae.source import ActivationSource

log = logging.getLogger(__name__)

PHASE_CODES = {TokenPhase.prompt: 0, TokenPhase.post_instruction: 1, TokenPhase.generated: 2}
"""The store's tokens/phase codes."""


def prompt_hash(text: str, seed: int) -> int:
    """A seeded 64-bit hash of a prompt's text: identical prompts always land on the same side of the split."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest(), "little")


def held_out_samples(
    sample_ids: np.ndarray, labels: np.ndarray, prompts: np.ndarray, share: float, seed: int
) -> np.ndarray:
    """Sorted sample ids held out: about `share` of each label's distinct prompts, every copy of a prompt together.

    The split is by a seeded hash of the prompt text, not by sample id: data sets selected together can
    hold the same prompt twice (or-bench-hard-1k is part of or-bench-80k), and a copy on each side would
    put a training sequence among the held-out ones. Each distinct prompt is stratified under the label of
    its first sample (lowest id); within a label, the round(share * n) distinct prompts with the smallest
    hashes are held out.
    """
    prompts = np.asarray([str(p) for p in prompts])
    order = np.argsort(sample_ids, kind="stable")
    unique, first = np.unique(prompts[order], return_index=True)
    stratum = labels[order][first]
    hashes = np.array([prompt_hash(t, seed) for t in unique.tolist()], dtype=np.uint64)
    held_prompts: list[np.ndarray] = []
    for label in sorted(set(stratum.tolist())):
        in_label = np.flatnonzero(stratum == label)
        n_held = int(round(share * len(in_label)))
        if len(in_label) >= 2:
            n_held = min(max(n_held, 1), len(in_label) - 1)  # every label on both sides when it can be
        by_hash = in_label[np.argsort(hashes[in_label], kind="stable")]
        held_prompts.append(unique[by_hash[:n_held]])
    if not held_prompts:
        return np.zeros(0, dtype=np.int64)
    held = np.isin(prompts, np.concatenate(held_prompts))
    return np.sort(np.asarray(sample_ids)[held]).astype(np.int64)


def token_filter_mask(tokens: dict[str, np.ndarray], filters: TokenFilterConfig) -> np.ndarray:
    """Tokens kept by the BOS and phase filters (norm outliers are judged per hook later)."""
    keep = np.isin(tokens["phase"], [PHASE_CODES[p] for p in filters.phases])
    if filters.drop_bos:
        keep &= tokens["position"] != 0
    return keep


def balance_weights(labels: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """Per-token sampling weights: each label gets equal mass, and within it each category equal mass."""
    weights = np.zeros(len(labels), dtype=np.float64)
    label_values = sorted(set(labels.tolist()))
    for label in label_values:
        in_label = labels == label
        cats = sorted(set(categories[in_label].tolist()))
        for cat in cats:
            cell = in_label & (categories == cat)
            weights[cell] = 1.0 / (len(label_values) * len(cats) * cell.sum())
    return weights


@dataclass
class TokenPlan:
    """Rows (global token indices, ascending) to train and evaluate on."""

    train_rows: np.ndarray
    train_weights: np.ndarray | None  # sampling weights (balance), None = uniform
    eval_rows: np.ndarray
    eval_sample_ids: np.ndarray  # held-out samples whose tokens are in eval_rows
    held_out_ids: np.ndarray  # every held-out sample id
    train_sample_ids: np.ndarray


def plan_tokens(source: ActivationSource, cfg: SaeConfig, seed: int) -> TokenPlan:
    tokens = source.tokens()
    samples = source.samples()
    sample_ids = np.asarray(samples["sample_id"]).astype(np.int64)
    labels = np.asarray([str(x) for x in samples["label"]])
    categories = np.asarray([str(x) for x in samples["category"]])
    if "prompt" in samples:
        prompts = np.asarray([str(x) for x in samples["prompt"]])
    else:  # an in-memory source without prompt texts: every sample counts as a distinct prompt
        log.warning("sae: the source has no prompt texts; the held-out split treats every sample as distinct")
        prompts = np.asarray([f"sample {i}" for i in sample_ids.tolist()])
    held_ids = held_out_samples(sample_ids, labels, prompts, cfg.held_out_share, seed)

    token_sample = np.asarray(tokens["sample_id"]).astype(np.int64)
    keep = token_filter_mask(tokens, cfg.filters)
    held = np.isin(token_sample, held_ids)
    train_rows = np.flatnonzero(keep & ~held)
    eval_all = np.flatnonzero(keep & held)

    # Cap the evaluation set by whole samples (ascending sample id), so CE sequences match it. The store is in
    # processing order (longest prompt first), not sorted by sample id: count each sample's rows, never diff
    # first-occurrence indices.
    eval_samples, counts = np.unique(token_sample[eval_all], return_counts=True)
    n_samples = int(np.searchsorted(np.cumsum(counts), cfg.eval_tokens, side="right"))
    n_samples = max(1, n_samples) if len(eval_samples) else 0
    eval_samples = eval_samples[:n_samples]
    eval_rows = eval_all[np.isin(token_sample[eval_all], eval_samples)]

    weights = None
    if cfg.balance == Balance.label_category:
        order = np.argsort(sample_ids)
        where = order[np.searchsorted(sample_ids[order], token_sample[train_rows])]
        weights = balance_weights(labels[where], categories[where])
    train_samples = np.unique(token_sample[train_rows])
    assert not np.isin(train_samples, held_ids).any()
    if len(train_rows) == 0 or len(eval_rows) == 0:
        raise ValueError(
            f"sae: {len(train_rows)} training and {len(eval_rows)} held-out tokens survive the filters "
            f"(sae.filters={cfg.filters}, sae.held_out_share={cfg.held_out_share}, {len(sample_ids)} samples)"
        )
    return TokenPlan(train_rows, weights, eval_rows, eval_samples, held_ids, train_samples)


def block_tokens(source: ActivationSource, cfg: SaeConfig) -> int:
    """Rows per read: sae.read_block_tokens rounded to whole store chunks (no chunk decoded twice), <= buffer_tokens."""
    attrs = getattr(source, "attrs", None)
    chunk = int(attrs.get("chunk_tokens") or 0) if isinstance(attrs, dict) else 0
    size = cfg.read_block_tokens
    if chunk > 0:
        size = max(1, round(size / chunk)) * chunk
    return max(1, min(size, cfg.buffer_tokens))


def blocks_of(rows: np.ndarray, n_tokens: int, block_tokens: int) -> list[tuple[int, int, np.ndarray]]:
    """(start, stop, rows inside) for every block of the store that holds at least one of `rows`."""
    out = []
    for start in range(0, n_tokens, block_tokens):
        stop = min(start + block_tokens, n_tokens)
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            out.append((start, stop, rows[lo:hi]))
    return out


def read_rows(source: ActivationSource, hooks: list[str], blocks: list[tuple[int, int, np.ndarray]]) -> np.ndarray:
    """The given blocks' selected rows for every hook: [H, N, D] float32, one contiguous read per block and hook."""
    n = sum(len(r) for _, _, r in blocks)
    out = np.empty((len(hooks), n, source.d_model), dtype=np.float32)
    i = 0
    for start, stop, rows in blocks:
        for h, hook in enumerate(hooks):
            out[h, i : i + len(rows)] = source.read(hook, start, stop)[rows - start]
        i += len(rows)
    return out


def sample_rows(rows: np.ndarray, budget: int, n_tokens: int, block_tokens: int) -> list[tuple[int, int, np.ndarray]]:
    """Evenly spread blocks holding about `budget` of `rows` (all of them when they are fewer)."""
    blocks = blocks_of(rows, n_tokens, block_tokens)
    total = sum(len(r) for _, _, r in blocks)
    if total <= budget:
        return blocks
    n_blocks = max(1, int(np.ceil(len(blocks) * budget / total)))
    picks = np.unique(np.linspace(0, len(blocks) - 1, n_blocks).round().astype(int))
    return [blocks[i] for i in picks]


@dataclass
class Window:
    blocks: list[tuple[int, int, np.ndarray]]
    order: np.ndarray  # indices into the window's rows (concatenated block rows), in batch order


class WindowStream:
    """Seeded, resumable, shuffled training batches for several hooks read together."""

    def __init__(
        self,
        source: ActivationSource,
        hooks: list[str],
        rows: np.ndarray,
        weights: np.ndarray | None,
        batch_size: int,
        buffer_tokens: int,
        block_size: int,
        seed: int,
    ) -> None:
        self.source, self.hooks, self.batch_size, self.seed = source, hooks, batch_size, seed
        self.buffer_tokens = buffer_tokens
        self.blocks = blocks_of(rows, source.n_tokens, min(block_size, buffer_tokens))
        self.n_rows = len(rows)
        self.weights = weights
        sizes = [len(r) for _, _, r in self.blocks]
        self.block_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # block b: rows[s[b]:s[b+1]]

    def epoch_draws(self, epoch: int) -> list[np.ndarray] | None:
        """Per block, how often each of its rows is drawn in the epoch (balance), or None: every row once.

        The draws are made over the whole training set, not per window: the store is in prompt-length
        order, which can cluster labels, and a window renormalised on its own would give every window
        the same number of draws whatever its mix. Systematic sampling (n equally spaced points on the
        weights' cumulative sum, rows in a seeded random order) draws exactly n rows per epoch, each row
        floor or ceil of n * weight times, so the realised label/category shares match the target.
        """
        if self.weights is None:
            return None
        n = self.n_rows
        rng = np.random.default_rng([self.seed, epoch, 0xBA1])
        perm = rng.permutation(n)
        cum = np.cumsum(self.weights[perm], dtype=np.float64)
        cum *= n / cum[-1]
        points = rng.random() + np.arange(n)
        picked = np.minimum(np.searchsorted(cum, points, side="right"), n - 1)
        counts = np.zeros(n, dtype=np.int64)
        counts[perm] = np.bincount(picked, minlength=n)
        return [counts[self.block_starts[b] : self.block_starts[b + 1]] for b in range(len(self.blocks))]

    def windows(self, epoch: int) -> list[Window]:
        """The epoch's windows: shuffled blocks packed up to buffer_tokens rows, each shuffled inside."""
        rng = np.random.default_rng([self.seed, epoch, 0x57])
        perm = rng.permutation(len(self.blocks))
        draws = self.epoch_draws(epoch)
        if draws is not None:  # blocks none of whose rows is drawn this epoch are not read
            perm = perm[[bool(draws[b].any()) for b in perm.tolist()]]
        groups: list[list[int]] = [[]]
        size = 0
        for b in perm.tolist():
            n = len(self.blocks[b][2])
            if groups[-1] and size + n > self.buffer_tokens:
                groups.append([])
                size = 0
            groups[-1].append(b)
            size += n
        out = []
        for group in groups:
            n = sum(len(self.blocks[b][2]) for b in group)
            if draws is None:
                order = rng.permutation(n)
            else:  # each row as often as the epoch's global draw says, in random order
                counts = np.concatenate([draws[b] for b in group])
                order = rng.permutation(np.repeat(np.arange(n), counts))
            out.append(Window([self.blocks[b] for b in group], order))
        return out

    def _windows_from(self, epoch: int) -> Iterator[Window]:
        for e in itertools.count(epoch):
            yield from self.windows(e)

    def batches(self, start_step: int = 0) -> Generator[tuple[int, np.ndarray], None, None]:
        """Yield (step, acts [H, B, D]) forever, starting at `start_step`, exactly as an unbroken run would."""
        epoch, offset = divmod(start_step * self.batch_size, self.n_rows)  # position in the endless epoch sequence
        windows = self._windows_from(epoch)
        window = next(windows)
        while offset >= len(window.order):  # skip whole windows before the resume point without reading them
            offset -= len(window.order)
            window = next(windows)
        step = start_step
        pending: list[np.ndarray] = []
        n_pending = 0
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sae-read") as pool:
            future: Future = pool.submit(read_rows, self.source, self.hooks, window.blocks)
            while True:
                data = future.result()
                upcoming = next(windows)
                future = pool.submit(read_rows, self.source, self.hooks, upcoming.blocks)  # prefetch
                order = window.order[offset:]
                offset = i = 0
                while i < len(order):
                    take = min(self.batch_size - n_pending, len(order) - i)
                    pending.append(data[:, order[i : i + take]])
                    n_pending += take
                    i += take
                    if n_pending == self.batch_size:
                        yield step, pending[0] if len(pending) == 1 else np.concatenate(pending, axis=1)
                        step += 1
                        pending, n_pending = [], 0
                del data
                window = upcoming


@dataclass
class HookStats:
    """Per-hook statistics of the training tokens, fixed before training starts."""

    median_norm: float
    max_norm: float  # outlier threshold (inf: keep all)
    mean: np.ndarray  # [D] mean of the kept tokens (b_dec's initial value)
    scale: float  # training input = activation * scale, so that E|x|^2 = d_model (1.0 when not normalising)
    n_tokens: int  # tokens the statistics were computed on
    n_outliers: int
    n_nonfinite: int = 0  # rows of the statistics sample holding inf or NaN (dropped before any statistic)

    def as_dict(self) -> dict:
        return {
            "median_norm": self.median_norm,
            "max_norm": None if np.isinf(self.max_norm) else self.max_norm,
            "input_scale": self.scale,
            "stats_tokens": self.n_tokens,
            "stats_outliers": self.n_outliers,
            "stats_nonfinite": self.n_nonfinite,
        }


def hook_stats(source: ActivationSource, hooks: list[str], rows: np.ndarray, cfg: SaeConfig) -> dict[str, HookStats]:
    """Median norm, outlier threshold, mean and input scale per hook, from about `stats_tokens` training rows.

    Rows holding inf or NaN (a value beyond float16's range in a float16 store is inf) are dropped before
    any statistic: one of them would make the mean, the median and the input scale inf, 0 or NaN.
    """
    blocks = sample_rows(rows, cfg.stats_tokens, source.n_tokens, block_tokens(source, cfg))
    out = {}
    for hook in hooks:  # one hook at a time bounds memory at stats_tokens x d_model floats
        acts = read_rows(source, [hook], blocks)[0]
        finite = np.isfinite(acts).all(axis=1)
        n_nonfinite = int((~finite).sum())
        if n_nonfinite:
            log.warning("sae: %s: %d of %d statistics rows hold inf/NaN; dropped", hook, n_nonfinite, len(acts))
        acts = acts[finite]
        if len(acts) == 0:
            raise ValueError(f"sae: {hook}: every one of the {n_nonfinite} statistics rows holds inf or NaN")
        norms = np.linalg.norm(acts.astype(np.float64), axis=1)
        median = float(np.median(norms))
        factor = cfg.filters.outlier_factor
        max_norm = float("inf") if factor is None else factor * median
        keep = norms <= max_norm
        mean_sq = float((norms[keep] ** 2).mean())
        scale = float(np.sqrt(source.d_model / mean_sq)) if cfg.normalize_activations and mean_sq > 0 else 1.0
        mean = acts[keep].mean(0, dtype=np.float64).astype(np.float32)
        out[hook] = HookStats(median, max_norm, mean, scale, len(acts), int((~keep).sum()), n_nonfinite)
    return out
