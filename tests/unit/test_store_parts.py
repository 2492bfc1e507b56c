"""A store written in parts and read as one (refusal_lab.store_parts): equal to the single store, errors by part."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from refusal_lab.store import ActivationStore, JoinedStore, Phase, SampleRecord, StoreMismatchError, TokenBlock
from refusal_lab.store_parts import (
    PART_ATTRS,
    MissingPartError,
    index_path,
    part_attrs,
    part_fingerprint,
    register_part,
    shard_order,
)
from refusal_lab.store_writer import StoreWriter

HOOKS = ["residuals_0", "mlp_1"]
D_MODEL = 16
PARENT = "parent-fp"
N_SAMPLES = 17
BATCH = 3  # 6 global batches, the last one of 2 samples


def make_batch(sample_ids: list[int], rng: np.random.Generator) -> TokenBlock:
    """One batch's block: 0-25 stored tokens per sample (0: e.g. positions=generated with an immediate EOS)."""
    samples, sid, pos, tok = [], [], [], []
    for s in sample_ids:
        n = 0 if s == 5 else int(rng.integers(1, 26))
        sid += [s] * n
        pos += range(n)
        tok += rng.integers(0, 1000, n).tolist()
        samples.append(
            SampleRecord(
                sample_id=s, prompt=f"prompt {s} ✓", category="c", label=["harmless", "toxic"][s % 2],
                response=f"response {s}", refused=bool(s % 2), refusal_score=float(s), n_prompt_tokens=n,
                n_generated_tokens=0,
            )
        )  # fmt: skip
    n = len(sid)
    acts = {h: torch.from_numpy(rng.standard_normal((n, D_MODEL), dtype=np.float32)).to(torch.bfloat16) for h in HOOKS}
    return TokenBlock(
        samples=samples,
        sample_id=np.array(sid, dtype=np.int32),
        position=np.array(pos, dtype=np.int32),
        phase=np.full(n, int(Phase.PROMPT), dtype=np.int8),
        token_id=np.array(tok, dtype=np.int32),
        acts=acts,
    )


def write(path: Path, blocks: list[TokenBlock], fp: str, attrs: dict, finish: bool = True) -> None:
    writer = StoreWriter.open(
        path, fingerprint=fp, hook_points=HOOKS, d_model=D_MODEL, model_dtype=torch.bfloat16, encoding="float16",
        chunk_tokens=8, attrs=attrs,
    )  # fmt: skip
    for block in blocks:
        writer.append(block)
    if finish:
        writer.finalize()


@pytest.fixture(scope="module")
def order() -> list[int]:
    """Processing order: prompt indices (= sample ids here) in a scrambled order, as longest-first gives."""
    return np.random.default_rng(1).permutation(N_SAMPLES).tolist()


@pytest.fixture(scope="module")
def batches(order: list[int]) -> list[TokenBlock]:
    rng = np.random.default_rng(0)
    return [make_batch(order[k : k + BATCH], rng) for k in range(0, N_SAMPLES, BATCH)]


def write_parts(root: Path, order: list[int], batches: list[TokenBlock], shards: int, skip: int | None = None) -> Path:
    """Parts as shard jobs write them (each its own batches, registered in the index); returns the index folder."""
    joined = root / "joined.zarr"
    for shard in range(shards):
        mine = shard_order(order, BATCH, shards, shard)
        blocks = [b for b in batches if b.samples[0].sample_id in mine]
        assert [s.sample_id for b in blocks for s in b.samples] == mine
        part = root / "disk" / f"part{shard}.zarr"
        register_part(
            joined, parent=PARENT, shards=shards, shard=shard, batch_size=BATCH, n_samples=N_SAMPLES, part=part
        )
        fp = part_fingerprint(PARENT, shards, shard, BATCH)
        write(part, blocks, fp, {PART_ATTRS: part_attrs(PARENT, shards, shard, BATCH)}, finish=shard != skip)
    return joined


def test_shard_order_takes_whole_batches_round_robin(order: list[int]) -> None:
    parts = [shard_order(order, BATCH, 4, i) for i in range(4)]
    assert parts[0] == order[0:3] + order[12:15] and parts[1] == order[3:6] + order[15:17]
    assert parts[3] == order[9:12], "shard 3 gets global batch 3 only (batch 7 does not exist)"
    assert sorted(sum(parts, [])) == sorted(order), "every prompt in exactly one part"


@pytest.mark.parametrize("shards", [1, 3, 4, 7])
def test_joined_parts_equal_the_single_store(tmp_path: Path, order, batches, shards: int) -> None:
    single = tmp_path / "single.zarr"
    write(single, batches, PARENT, {})
    joined_path = write_parts(tmp_path, order, batches, shards)
    one, joined = ActivationStore.open(single), ActivationStore.open(joined_path)
    assert isinstance(joined, JoinedStore) and len(joined.parts) == shards
    assert joined.fingerprint == one.fingerprint == PARENT
    assert (joined.n_samples, joined.n_tokens) == (one.n_samples, one.n_tokens)
    for name, column in one.tokens().items():
        assert np.array_equal(joined.tokens()[name], column), name
    for name, column in one.samples().items():
        assert np.array_equal(np.asarray(joined.samples()[name]), np.asarray(column)), name
    for hook in HOOKS:
        whole = one.read(hook, 0, one.n_tokens)
        assert np.array_equal(joined.read(hook, 0, joined.n_tokens).view(np.uint32), whole.view(np.uint32))
        for start, stop in [(0, 1), (5, 40), (37, 38), (20, one.n_tokens), (one.n_tokens, one.n_tokens)]:
            assert np.array_equal(joined.read(hook, start, stop), whole[start:stop]), (start, stop)
        # Scattered rows through acts(): what readers of a single store's zarr array call (circuits.direction).
        rows = np.random.default_rng(shards).choice(one.n_tokens, size=25, replace=False)
        stored = np.asarray(one.acts(hook).get_orthogonal_selection((np.sort(rows), slice(None))))
        assert np.array_equal(joined.acts(hook).get_orthogonal_selection((np.sort(rows), slice(None))), stored)
        assert np.array_equal(joined.acts(hook)[3:30], np.asarray(one.acts(hook)[3:30]))
    assert joined.overflow_counts() == one.overflow_counts()
    assert joined.attrs["chunk_tokens"] == 8 and PART_ATTRS not in joined.attrs


def test_a_missing_part_is_named(tmp_path: Path, order, batches) -> None:
    joined = write_parts(tmp_path, order, batches, 3)
    index = json.loads(index_path(joined).read_text())
    del index["parts"]["1"]
    index_path(joined).write_text(json.dumps(index))
    with pytest.raises(MissingPartError, match=r"part 1 of 3 is missing.*inference.shard=1"):
        ActivationStore.open(joined)


def test_a_deleted_part_is_named(tmp_path: Path, order, batches) -> None:
    joined = write_parts(tmp_path, order, batches, 3)
    part2 = tmp_path / "disk" / "part2.zarr"
    for f in sorted(part2.rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    part2.rmdir()
    with pytest.raises(MissingPartError, match=rf"part 2 of 3 is missing at {part2}"):
        ActivationStore.open(joined)


def test_an_incomplete_part_is_named(tmp_path: Path, order, batches) -> None:
    joined = write_parts(tmp_path, order, batches, 3, skip=0)
    with pytest.raises(MissingPartError, match=r"part 0 of 3 at .*part0.zarr is incomplete \(6 samples committed"):
        ActivationStore.open(joined)


def test_a_part_of_another_run_is_refused(tmp_path: Path, order, batches) -> None:
    joined = write_parts(tmp_path, order, batches, 2)
    index = json.loads(index_path(joined).read_text())
    index["fingerprint"] = "other-parent"
    index_path(joined).write_text(json.dumps(index))
    with pytest.raises(StoreMismatchError, match="part 0 of 2 .* belongs to another run"):
        ActivationStore.open(joined)


def test_an_index_of_another_split_is_refused(tmp_path: Path, order, batches) -> None:
    joined = write_parts(tmp_path, order, batches, 2)
    with pytest.raises(StoreMismatchError, match="indexes another split"):
        register_part(joined, parent=PARENT, shards=3, shard=0, batch_size=BATCH, n_samples=N_SAMPLES, part=tmp_path)
