"""check_disk asks only for the space the store still needs: nothing for a complete store,
the uncommitted share of the estimate for a partial one (issue 8, item 1).

The stores are real (written by StoreWriter); only the free space the disk reports is faked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from refusal_lab import collect_plan
from refusal_lab.collect_plan import CollectPlan, check_disk
from refusal_lab.config import InferenceConfig
from refusal_lab.errors import ConfigError
from refusal_lab.layers import HookPoint, Site
from refusal_lab.models import ChatFormat
from refusal_lab.store import Phase, SampleRecord, TokenBlock
from refusal_lab.store_writer import StoreWriter

D_MODEL = 8
TOKENS_PER_SAMPLE = 10
N_SAMPLES = 4
ESTIMATE = 1_000_000_000  # bytes the plan says the full store takes


def plan() -> CollectPlan:
    return CollectPlan(
        hook_points=[HookPoint(Site.RESIDUALS, 0)],
        token_ids=[[1] * TOKENS_PER_SAMPLE] * N_SAMPLES,
        order=list(range(N_SAMPLES)),
        fmt=ChatFormat("[INST] ", " [/INST]", 4),
        d_model=D_MODEL,
        n_layers=1,
        estimated_tokens=N_SAMPLES * TOKENS_PER_SAMPLE,
        estimated_bytes=ESTIMATE,
        buffer_bytes_per_prompt=0,
        chat_template="{{ messages }}",
    )


def block(sample_id: int) -> TokenBlock:
    n = TOKENS_PER_SAMPLE
    record = SampleRecord(sample_id, "p", "c", "toxic", "r", False, 0.0, n, 0)
    return TokenBlock(
        samples=[record],
        sample_id=np.full(n, sample_id, np.int32),
        position=np.arange(n, dtype=np.int32),
        phase=np.full(n, int(Phase.PROMPT), np.int8),
        token_id=np.ones(n, np.int32),
        acts={"residuals_0": torch.randn(n, D_MODEL)},
    )


def write_store(path: Path, n_samples: int, complete: bool) -> Path:
    writer = StoreWriter.open(
        path, fingerprint="fp", hook_points=["residuals_0"], d_model=D_MODEL, model_dtype=torch.float32, attrs={}
    )
    for i in range(n_samples):
        writer.append(block(i))
    if complete:
        writer.finalize()
    return path


def fake_free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    class Usage:
        pass

    usage = Usage()
    usage.free = free  # type: ignore[attr-defined]
    monkeypatch.setattr(collect_plan.shutil, "disk_usage", lambda _path: usage)


def test_new_store_needs_the_whole_estimate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_free(monkeypatch, ESTIMATE - 1)
    with pytest.raises(ConfigError, match=r"store_path: the store needs about 1\.0 GB"):
        check_disk(plan(), tmp_path / "new.zarr", InferenceConfig())
    fake_free(monkeypatch, ESTIMATE)
    check_disk(plan(), tmp_path / "new.zarr", InferenceConfig())


def test_complete_store_needs_no_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rerun after a later stage failed: the store took the space it was estimated to take."""
    store = write_store(tmp_path / "done.zarr", N_SAMPLES, complete=True)
    fake_free(monkeypatch, 0)
    check_disk(plan(), store, InferenceConfig())


def test_partial_store_needs_only_what_remains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 1 of 4 equal samples committed: 3/4 of the estimate is still to write.
    store = write_store(tmp_path / "partial.zarr", 1, complete=False)
    remaining = ESTIMATE * 3 // 4
    fake_free(monkeypatch, remaining)
    check_disk(plan(), store, InferenceConfig())
    fake_free(monkeypatch, remaining - 10_000_000)
    with pytest.raises(ConfigError, match=r"partial store at .* still needs about 0\.8 GB but .* has 0\.7 GB free"):
        check_disk(plan(), store, InferenceConfig())
