"""The Zarr activation store: round trips, layout, overflow, commit/resume (incl. SIGKILL), background writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from refusal_lab.store import (
    MANIFEST,
    ActivationStore,
    Phase,
    SampleRecord,
    StoreIncompleteError,
    StoreMismatchError,
    TokenBlock,
    estimate_store_bytes,
)
from refusal_lab.store_writer import WRITER_NICE, BackgroundWriter, StoreWriter, disk_write_bandwidth

HOOKS = ["residuals_0", "mlp_1", "attention_2"]
D_MODEL = 48
CHUNK = 64  # small, so blocks straddle chunk boundaries
FP = "fp-test"


def make_blocks(
    n_blocks: int = 6, dtype: torch.dtype = torch.bfloat16, seed: int = 0, scale: float = 4.0
) -> list[TokenBlock]:
    """Deterministic blocks of 1-4 samples, 5-60 tokens each, with unicode and empty strings."""
    rng = np.random.default_rng(seed)
    blocks, k = [], 0
    for _ in range(n_blocks):
        samples, sid, pos, phase, tok = [], [], [], [], []
        for _ in range(int(rng.integers(1, 5))):
            sample_id = (k * 7) % 101  # ids are prompt-list indices, not processing order
            n_prompt, n_gen = int(rng.integers(4, 40)), int(rng.integers(0, 20))
            sid += [sample_id] * (n_prompt + n_gen)
            pos += range(n_prompt + n_gen)
            phase += [Phase.PROMPT] * (n_prompt - 3) + [Phase.POST_INSTRUCTION] * 3 + [Phase.GENERATED] * n_gen
            tok += rng.integers(0, 32000, n_prompt + n_gen).tolist()
            samples.append(
                SampleRecord(
                    sample_id=sample_id,
                    prompt=f"prompt {k}: naïve ✓ 日本",
                    category=["privacy", "illegal"][k % 2],
                    label=["benign", "toxic"][k % 2],
                    response="" if k % 3 == 0 else "I cannot " * int(rng.integers(1, 30)),
                    refused=bool(k % 2),
                    refusal_score=float(rng.normal()),
                    n_prompt_tokens=n_prompt,
                    n_generated_tokens=n_gen,
                )
            )
            k += 1
        n = len(sid)
        acts = {
            h: torch.from_numpy(rng.standard_normal((n, D_MODEL), dtype=np.float32) * scale).to(dtype) for h in HOOKS
        }
        blocks.append(
            TokenBlock(
                samples=samples,
                sample_id=np.array(sid, dtype=np.int32),
                position=np.array(pos, dtype=np.int32),
                phase=np.array(phase, dtype=np.int8),
                token_id=np.array(tok, dtype=np.int32),
                acts=acts,
            )
        )
    return blocks


def open_writer(path: Path, encoding: str = "raw", dtype: torch.dtype = torch.bfloat16, fp: str = FP) -> StoreWriter:
    return StoreWriter.open(
        path,
        fingerprint=fp,
        hook_points=HOOKS,
        d_model=D_MODEL,
        model_dtype=dtype,
        encoding=encoding,
        chunk_tokens=CHUNK,
        attrs={"model": "tiny", "config": {"a": 1, "path": Path("/x")}},
    )


def write_store(
    path: Path, blocks: list[TokenBlock], encoding: str = "raw", dtype: torch.dtype = torch.bfloat16
) -> None:
    writer = open_writer(path, encoding, dtype)
    for block in blocks:
        writer.append(block)
    writer.finalize({"collect_stats": {"seconds": 1.0}})


def store_contents(path: Path) -> dict[str, object]:
    """Every array (committed rows) and the manifest, for exact comparison."""
    manifest = json.loads((path / MANIFEST).read_text())
    group = zarr.open_group(path, mode="r")
    out: dict[str, object] = {"manifest": manifest}
    for name in [f"acts/{h}" for h in HOOKS] + [f"tokens/{k}" for k in ("sample_id", "position", "phase", "token_id")]:
        assert group[name].shape[0] == manifest["committed_tokens"], name  # type: ignore[union-attr]
        out[name] = group[name][:]
    for name in group["samples"].array_keys():  # type: ignore[union-attr]
        assert group[f"samples/{name}"].shape[0] == manifest["committed_samples"], name  # type: ignore[union-attr]
        out[f"samples/{name}"] = group[f"samples/{name}"][:].tolist()
    return out


def assert_same_store(a: Path, b: Path, coalesced: bool = False) -> None:
    """Identical stores; with `coalesced`, `a` may have committed several of `b`'s blocks at once."""
    ca, cb = store_contents(a), store_contents(b)
    assert ca.keys() == cb.keys()
    if coalesced:
        ma, mb = dict(ca.pop("manifest")), dict(cb.pop("manifest"))  # type: ignore[arg-type]
        ends_a = {blk["samples"][1] for blk in ma.pop("blocks")}
        ends_b = {blk["samples"][1] for blk in mb.pop("blocks")}
        assert ends_a <= ends_b, "commit points must be block boundaries of the uncoalesced run"
        assert ma == mb
    for key in ca:
        if isinstance(ca[key], np.ndarray):
            assert ca[key].dtype == cb[key].dtype and np.array_equal(ca[key], cb[key]), key  # type: ignore[union-attr]
        else:
            assert ca[key] == cb[key], key


@pytest.fixture(scope="module")
def blocks() -> list[TokenBlock]:
    return make_blocks()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, blocks: list[TokenBlock]) -> Path:
    path = tmp_path_factory.mktemp("ref") / "store"
    write_store(path, blocks)
    return path


def test_float16_round_trip_from_bf16(tmp_path: Path, blocks: list[TokenBlock]) -> None:
    with warnings.catch_warnings():
        # The string columns must use a dtype with a zarr v3 spec: zarr warns for the others.
        warnings.simplefilter("error", zarr.errors.UnstableSpecificationWarning)
        write_store(tmp_path / "s", blocks, encoding="float16")
    store = ActivationStore.open(tmp_path / "s")
    assert store.n_tokens == sum(b.n_tokens for b in blocks) and store.n_samples == sum(len(b.samples) for b in blocks)
    for hook in HOOKS:
        expected = torch.cat([b.acts[hook] for b in blocks]).to(torch.float16).float().numpy()
        got = store.read(hook, 0, store.n_tokens)
        assert got.dtype == np.float32 and np.array_equal(got, expected)
        assert np.array_equal(store.read(hook, 100, 170), expected[100:170])
    tokens = store.tokens()
    for name in ("sample_id", "position", "phase", "token_id"):
        assert np.array_equal(tokens[name], np.concatenate([getattr(b, name) for b in blocks]))
    samples = store.samples()
    records = [s for b in blocks for s in b.samples]
    assert samples["prompt"] == [r.prompt for r in records] and samples["response"] == [r.response for r in records]
    assert np.array_equal(samples["sample_id"], [r.sample_id for r in records])
    assert np.array_equal(samples["refused"], [r.refused for r in records])
    assert np.array_equal(samples["refusal_score"], np.array([r.refusal_score for r in records], dtype=np.float32))
    assert np.array_equal(samples["n_generated_tokens"], [r.n_generated_tokens for r in records])
    assert store.attrs["config"] == {"a": 1, "path": "/x"} and store.attrs["collect_stats"] == {"seconds": 1.0}
    assert store.attrs["model_dtype"] == "bfloat16" and store.fingerprint == FP
    assert store.overflow_counts() == dict.fromkeys(HOOKS, 0)
    with pytest.raises(IndexError):
        store.read(HOOKS[0], 0, store.n_tokens + 1)
    with pytest.raises(KeyError, match="residuals_0"):
        store.acts("residuals_9")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_raw_round_trip_is_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    blocks = make_blocks(3, dtype=dtype, seed=1)
    write_store(tmp_path / "s", blocks, encoding="raw", dtype=dtype)
    store = ActivationStore.open(tmp_path / "s")
    for hook in HOOKS:
        source = torch.cat([b.acts[hook] for b in blocks])
        bits = source.view(torch.uint16) if dtype != torch.float32 else source
        assert np.array_equal(store.acts(hook)[:], bits.numpy())
        assert np.array_equal(store.read(hook, 0, store.n_tokens), source.float().numpy())


def test_layout_is_plain_zarr(reference: Path) -> None:
    group = zarr.open_group(reference, mode="r")
    meta = group.attrs["refusal_lab"]
    assert meta["hook_points"] == HOOKS and meta["d_model"] == D_MODEL and meta["encoding"] == "raw"  # type: ignore[index]
    assert meta["format_version"] == 1 and meta["fingerprint"] == FP and meta["model"] == "tiny"  # type: ignore[index]
    manifest = json.loads((reference / MANIFEST).read_text())
    n = manifest["committed_tokens"]
    acts = group["acts/mlp_1"]
    assert acts.shape == (n, D_MODEL) and acts.chunks == (CHUNK, D_MODEL) and acts.dtype == np.uint16  # type: ignore[union-attr]
    assert acts.attrs["dtype"] == "bfloat16" and acts.metadata.zarr_format == 3  # type: ignore[union-attr]
    codecs = [c.to_dict() for c in acts.metadata.codecs]  # type: ignore[union-attr]
    assert [c["name"] for c in codecs] == ["bytes", "blosc"]
    assert codecs[1]["configuration"]["shuffle"] == "bitshuffle" and codecs[1]["configuration"]["typesize"] == 2
    assert group["tokens/position"].metadata.codecs[-1].to_dict()["name"] == "zstd"  # type: ignore[union-attr]
    assert group["tokens/phase"].dtype == np.int8 and group["tokens/position"].shape == (n,)  # type: ignore[union-attr]
    assert group["samples/prompt"][:2].tolist() == ["prompt 0: naïve ✓ 日本", "prompt 1: naïve ✓ 日本"]  # type: ignore[index,union-attr]
    assert group["samples/refused"].dtype == np.bool_ and group["samples/refusal_score"].dtype == np.float32  # type: ignore[union-attr]
    assert manifest["complete"] and manifest["committed_samples"] == group["samples/sample_id"].shape[0]  # type: ignore[union-attr]
    spans = manifest["blocks"]
    assert spans[0]["tokens"][0] == 0 and spans[-1]["tokens"][1] == n
    assert all(
        a["tokens"][1] == b["tokens"][0] and a["samples"][1] == b["samples"][0]
        for a, b in zip(spans, spans[1:], strict=False)
    )


def test_float16_overflow_is_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    block = make_blocks(1, dtype=torch.float32, seed=2)[0]
    hot = block.acts["mlp_1"]
    hot[0, 0], hot[1, 1], hot[2, 2] = 7e4, -1e6, 65519.0  # 65519 rounds to 65504: no overflow
    hot[3, 3] = float("inf")  # already infinite in the model: not a float16 overflow
    with caplog.at_level("WARNING"):
        write_store(tmp_path / "s", [block], encoding="float16", dtype=torch.float32)
    store = ActivationStore.open(tmp_path / "s")
    assert store.overflow_counts() == {"residuals_0": 0, "mlp_1": 2, "attention_2": 0}
    got = store.read("mlp_1", 0, 4)
    assert got[0, 0] == np.inf and got[1, 1] == -np.inf and got[2, 2] == 65504.0
    assert any("mlp_1" in r.message and "float16" in r.message for r in caplog.records)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_overflow_count_is_the_same_one_block_at_a_time_and_grouped(tmp_path: Path, dtype: torch.dtype) -> None:
    """A grouped commit (several blocks in one append) counts exactly what one append per block counts."""
    blocks = make_blocks(3, dtype=dtype, seed=4)
    blocks[0].acts["mlp_1"][0, 0] = float("inf")  # the model's own inf: never an overflow
    blocks[1].acts["mlp_1"][1, 1] = float("-inf")
    if dtype == torch.float32:
        blocks[2].acts["mlp_1"][2, 2] = 1e6  # beyond float16: the one overflow
    single = open_writer(tmp_path / "single", "float16", dtype)
    for block in blocks:
        single.append(block)
    grouped = open_writer(tmp_path / "grouped", "float16", dtype)
    grouped.append(*blocks)
    expected = {"residuals_0": 0, "mlp_1": 1 if dtype == torch.float32 else 0, "attention_2": 0}
    assert single._manifest["overflow_counts"] == grouped._manifest["overflow_counts"] == expected
    single.finalize()
    stored = ActivationStore.open(tmp_path / "single").read("mlp_1", 0, sum(b.n_tokens for b in blocks))
    as_half = torch.cat([b.acts["mlp_1"] for b in blocks]).to(torch.float16).float().numpy()
    assert np.array_equal(stored, as_half)  # float16 blocks appended one by one into float16 chunks, bits intact


def test_reader_refuses_incomplete_store(tmp_path: Path, blocks: list[TokenBlock]) -> None:
    writer = open_writer(tmp_path / "s")
    with pytest.raises(StoreIncompleteError, match="0 samples committed"):
        ActivationStore.open(tmp_path / "s")
    writer.append(blocks[0])
    # Data written after the last commit (a later append that never committed) stays invisible.
    zarr.open_array(tmp_path / "s" / "acts" / "mlp_1", mode="r+").resize((10_000, D_MODEL))
    with pytest.raises(StoreIncompleteError):
        ActivationStore.open(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s", allow_incomplete=True)
    assert store.n_tokens == blocks[0].n_tokens and store.n_samples == len(blocks[0].samples)
    assert len(store.tokens()["token_id"]) == blocks[0].n_tokens and len(store.samples()["prompt"]) == store.n_samples
    with pytest.raises(IndexError):
        store.read("mlp_1", 0, blocks[0].n_tokens + 1)


def test_mismatched_or_foreign_path_is_refused(tmp_path: Path, blocks: list[TokenBlock]) -> None:
    open_writer(tmp_path / "s").append(blocks[0])
    with pytest.raises(StoreMismatchError) as err:
        open_writer(tmp_path / "s", fp="other-fp")
    assert all(s in str(err.value) for s in (str(tmp_path / "s"), FP, "other-fp", "store_path", "delete"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(StoreMismatchError, match="not an activation store"):
        open_writer(tmp_path / "foreign")
    with pytest.raises(StoreMismatchError, match="encoding"):
        open_writer(tmp_path / "s", encoding="float16")  # same fingerprint, different layout: a caller bug
    (tmp_path / "empty").mkdir()
    assert open_writer(tmp_path / "empty").committed_samples == 0


def test_complete_store_is_recognised(reference: Path, blocks: list[TokenBlock]) -> None:
    writer = open_writer(reference)
    assert writer.complete and writer.committed_samples == sum(len(b.samples) for b in blocks)
    with pytest.raises(RuntimeError, match="complete"):
        writer.append(blocks[0])


def test_failed_append_is_discarded_on_resume(
    tmp_path: Path, blocks: list[TokenBlock], reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = open_writer(tmp_path / "s")
    for block in blocks[:3]:
        writer.append(block)
    with monkeypatch.context() as m:
        m.setattr(StoreWriter, "_commit", lambda self, manifest: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError):
            writer.append(blocks[3])
    assert zarr.open_array(tmp_path / "s" / "tokens" / "token_id").shape[0] > writer.committed_tokens
    resumed = open_writer(tmp_path / "s")
    assert resumed.committed_samples == sum(len(b.samples) for b in blocks[:3])
    assert zarr.open_array(tmp_path / "s" / "tokens" / "token_id").shape[0] == resumed.committed_tokens
    for block in blocks[3:]:
        resumed.append(block)
    resumed.finalize({"collect_stats": {"seconds": 1.0}})
    assert_same_store(tmp_path / "s", reference)


def test_store_without_manifest_is_reset(tmp_path: Path, blocks: list[TokenBlock]) -> None:
    open_writer(tmp_path / "s").append(blocks[0])
    (tmp_path / "s" / MANIFEST).unlink()
    writer = open_writer(tmp_path / "s")
    assert writer.committed_samples == 0 and len(writer.committed_sample_ids()) == 0
    assert zarr.open_array(tmp_path / "s" / "acts" / "mlp_1").shape == (0, D_MODEL)


# One helper process pays for importing torch once, then forks a writer per kill point and
# SIGKILLs it when it prints the given line (plus a delay). The writers write `make_blocks()`;
# "during" announces each finished array of a block, "before_manifest" stalls after block 3's data.
ZYGOTE = """
import json, os, signal, sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_store import make_blocks, open_writer
from refusal_lab.store_writer import StoreWriter

def stalling_commit(self, manifest, commit=StoreWriter._commit):
    if len(manifest["blocks"]) == 4:
        print("manifest 3", flush=True)
        time.sleep(60)
    commit(self, manifest)

def announcing_touched(self, *args, touched=StoreWriter._touched):
    print("wrote an array of block", len(self._manifest["blocks"]))  # while other threads write the rest
    return touched(self, *args)

def write(name, fd):
    sys.stdout = os.fdopen(fd, "w", buffering=1)
    if name == "before_manifest":
        StoreWriter._commit = stalling_commit
    if name == "during":
        StoreWriter._touched = announcing_touched
    writer = open_writer(Path(sys.argv[1]) / name)
    for i, block in enumerate(make_blocks()):
        print("begin", i)
        writer.append(block)
        print("committed", i)
    time.sleep(60)

for name, (line, delay) in json.loads(sys.argv[2]).items():
    r, w = os.pipe()
    pid = os.fork()  # before this process ran any torch op or started zarr's event loop
    if pid == 0:
        os.close(r)
        try:
            write(name, w)
        finally:
            os._exit(1)
    os.close(w)
    with os.fdopen(r) as lines:
        for got in lines:
            if got.strip() == line:
                time.sleep(delay)
                break
        os.kill(pid, signal.SIGKILL)
    status = os.waitpid(pid, 0)[1]
    print(name, os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, flush=True)
os._exit(0)  # skip interpreter teardown (seconds with torch loaded)
"""


def test_sigkill_then_resume_matches_uninterrupted_run(
    tmp_path: Path, blocks: list[TokenBlock], reference: Path
) -> None:
    rng = np.random.default_rng(0)
    # (line to wait for, delay before SIGKILL): between blocks, amid a block's array writes,
    # between data and manifest, and at a random moment after the first commit.
    kill_points = {
        "between": ("committed 1", 0.0),
        "during": ("wrote an array of block 3", 0.0),
        "before_manifest": ("manifest 3", 0.0),
        "random": ("begin 1", float(rng.uniform(0, 0.1))),
    }
    script = ZYGOTE.format(tests=str(Path(__file__).resolve().parent))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-c", script, str(tmp_path), json.dumps(kill_points)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [w for name in kill_points for w in (name, "True")], done.stdout
    starts = np.cumsum([0] + [len(b.samples) for b in blocks])
    for name in kill_points:
        path = tmp_path / name
        if name in ("during", "before_manifest"):  # some or all of block 3's data is on disk, its commit is not
            assert json.loads((path / MANIFEST).read_text())["committed_samples"] == starts[3]
            grown = [zarr.open_array(path / a).shape[0] for a in ("samples/sample_id", "tokens/token_id", "acts/mlp_1")]
            # The writer's threads finish block 3's arrays in any order: some array, not a given one, has grown.
            committed_rows = {"samples": starts[3], "tokens": sum(b.n_tokens for b in blocks[:3])}
            committed_rows["acts"] = committed_rows["tokens"]
            group = zarr.open_group(path, mode="r")
            rows = {
                (kind, name): arr.shape[0]
                for kind in committed_rows
                for name, arr in group[kind].arrays()  # type: ignore[union-attr]
            }
            assert any(n > committed_rows[kind] for (kind, _), n in rows.items()), rows
            if name == "before_manifest":
                assert grown == [starts[4], *[sum(b.n_tokens for b in blocks[:4])] * 2]
        writer = open_writer(path)
        assert writer.committed_samples >= len(blocks[0].samples), name
        n_done = int(np.searchsorted(starts, writer.committed_samples))
        assert starts[n_done] == writer.committed_samples, f"{name}: a block was committed in part"
        assert np.array_equal(writer.committed_sample_ids(), [s.sample_id for b in blocks[:n_done] for s in b.samples])
        for block in blocks[n_done:]:
            writer.append(block)
        writer.finalize({"collect_stats": {"seconds": 1.0}})
        assert_same_store(path, reference)
        ids = ActivationStore.open(path).samples()["sample_id"]
        assert len(set(ids.tolist())) == len(ids) == starts[-1]  # type: ignore[union-attr]
        assert not list(path.rglob("*.partial"))


def pending_copy(block: TokenBlock, calls: list[int]) -> TokenBlock:
    """`block` with zeroed activations that only its `ready` fills, like a pending device->host copy."""
    pending = {h: torch.zeros_like(a) for h, a in block.acts.items()}

    def ready() -> None:
        calls.append(1)
        for hook, tensor in pending.items():
            tensor.copy_(block.acts[hook])

    return TokenBlock(block.samples, block.sample_id, block.position, block.phase, block.token_id, pending, ready)


def spy_on_appends(writer: StoreWriter, record: Callable[[tuple[TokenBlock, ...]], object]) -> None:
    """Call `record(group)` before each `writer.append(*group)`."""
    real_append = writer.append

    def append(*group: TokenBlock) -> None:
        record(group)
        real_append(*group)

    writer.append = append  # type: ignore[method-assign]


def test_background_writer_matches_synchronous(tmp_path: Path, blocks: list[TokenBlock], reference: Path) -> None:
    writer = open_writer(tmp_path / "s")
    calls: list[int] = []
    with BackgroundWriter(writer, max_queue=2) as sink:
        for block in blocks:
            sink.submit(pending_copy(block, calls))
    sink.close()  # idempotent
    assert len(calls) == len(blocks)
    writer.finalize({"collect_stats": {"seconds": 1.0}})
    assert_same_store(tmp_path / "s", reference, coalesced=True)


def test_background_writer_coalesces_queued_blocks(tmp_path: Path, blocks: list[TokenBlock], reference: Path) -> None:
    writer = open_writer(tmp_path / "s")
    appended: list[int] = []

    def lag(group: tuple[TokenBlock, ...]) -> None:
        appended.append(sum(len(b.samples) for b in group))
        time.sleep(0.2)  # a writer that lags behind compute

    spy_on_appends(writer, lag)
    with BackgroundWriter(writer, max_queue=len(blocks)) as sink:
        for block in blocks:
            sink.submit(block)
    assert len(appended) < len(blocks), "queued blocks must be written in fewer appends"
    assert sum(appended) == sum(len(b.samples) for b in blocks)
    writer.finalize({"collect_stats": {"seconds": 1.0}})
    assert_same_store(tmp_path / "s", reference, coalesced=True)


def test_background_writer_commits_by_tokens_and_age(tmp_path: Path, blocks: list[TokenBlock], reference: Path) -> None:
    writer = open_writer(tmp_path / "s")
    sizes: list[int] = []
    spy_on_appends(writer, lambda group: sizes.append(sum(b.n_tokens for b in group)))
    two_blocks = blocks[0].n_tokens + blocks[1].n_tokens
    with BackgroundWriter(writer, commit_tokens=two_blocks, commit_seconds=60) as sink:
        for block in blocks:
            sink.submit(block)
            time.sleep(0.05)  # the writer sees each block on its own
    assert sizes[0] >= two_blocks and all(size >= min(b.n_tokens for b in blocks) for size in sizes)
    assert len(sizes) < len(blocks) and sum(sizes) == sum(b.n_tokens for b in blocks)
    writer.finalize({"collect_stats": {"seconds": 1.0}})
    assert_same_store(tmp_path / "s", reference, coalesced=True)

    # Far below commit_tokens, a block is still committed once it has waited commit_seconds.
    writer = open_writer(tmp_path / "t")
    with BackgroundWriter(writer, commit_tokens=10**9, commit_seconds=0.2) as sink:
        sink.submit(blocks[0])
        deadline = time.monotonic() + 5
        while writer.committed_samples == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert writer.committed_samples == len(blocks[0].samples)
        sink.submit(blocks[1])
    assert writer.committed_samples == len(blocks[0].samples) + len(blocks[1].samples)


def test_background_writer_surfaces_errors(tmp_path: Path, blocks: list[TokenBlock]) -> None:
    writer = open_writer(tmp_path / "s")
    bad = make_blocks(1, seed=3)[0]
    bad.acts.pop("mlp_1")
    sink = BackgroundWriter(writer, max_queue=1)
    sink.submit(bad)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="store writer failed") as err:
        for block in blocks * 10:  # the queue holds one block, so the failure shows up within a few submits
            sink.submit(block)
    assert isinstance(err.value.__cause__, ValueError) and time.perf_counter() - t0 < 5
    sink.close()  # already reported
    sink.close()
    assert writer.committed_samples == 0  # nothing after the failure was written

    sink = BackgroundWriter(open_writer(tmp_path / "t"))
    sink.submit(bad)
    with pytest.raises(RuntimeError, match="hooks"):
        sink.close()
    sink.close()


def test_estimate_and_disk_bandwidth(tmp_path: Path) -> None:
    assert estimate_store_bytes(1000, 32, 4096, "float16") == 1000 * (32 * 4096 * 2 + 13)
    assert estimate_store_bytes(10, 1, 8, "raw", torch.float32) == 10 * (8 * 4 + 13)
    with pytest.raises(ValueError, match="inference.store_dtype"):
        estimate_store_bytes(10, 1, 8, "bfloat16")
    bandwidth = disk_write_bandwidth(tmp_path / "not" / "yet", n_bytes=4 * 2**20)
    assert bandwidth > 0 and list(tmp_path.iterdir()) == []


def test_store_without_hooks_or_tokens(tmp_path: Path) -> None:
    """`save_activations: false` stores only the sample table; a block may keep no tokens."""
    record = SampleRecord(5, "p", "c", "benign", "", False, -1.5, 7, 0)
    empty = np.zeros(0, dtype=np.int32)
    writer = StoreWriter.open(
        tmp_path / "s", fingerprint=FP, hook_points=[], d_model=8, model_dtype=torch.float32, attrs={}
    )
    writer.append(TokenBlock([record], empty, empty, empty.astype(np.int8), empty, {}))
    writer.finalize()
    store = ActivationStore.open(tmp_path / "s")
    assert (store.n_samples, store.n_tokens, store.hook_points) == (1, 0, [])
    assert store.samples()["response"] == [""] and store.samples()["refusal_score"].tolist() == [-1.5]  # type: ignore[union-attr]


def test_background_writer_runs_below_the_callers_priority(tmp_path: Path, blocks: list[TokenBlock]) -> None:
    if sys.platform != "linux":
        pytest.skip("per-thread nice values are a Linux feature")
    seen: list[int] = []
    writer = open_writer(tmp_path / "s")
    spy_on_appends(writer, lambda _: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with BackgroundWriter(writer) as sink:
        sink.submit(blocks[0])
    assert seen == [min(19, caller + WRITER_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller, "only the writer thread is reniced"
