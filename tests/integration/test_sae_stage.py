"""The sae stage end to end on a real Zarr store of a tiny Llama's activations: files, metrics, CE
splicing, skipping completed hooks, and resuming a SIGKILLed training run."""

from __future__ import annotations

import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from refusal_lab.hooks import hooks_registered
from refusal_lab.layers import HookPoint
from refusal_lab.sae.config import CeTargets, SaeConfig
from refusal_lab.sae.data import HookStats, plan_tokens
from refusal_lab.sae.saelens import CFG, METRICS, SPARSITY, WEIGHTS, load_sae
from refusal_lab.sae.source import open_store
from refusal_lab.sae.splice import ce_metrics, held_out_sequences
from refusal_lab.sae.stage import run_sae_stage
from refusal_lab.sae.train import CHECKPOINT
from refusal_lab.store import ActivationStore, Phase, SampleRecord, TokenBlock
from refusal_lab.store_writer import StoreWriter

HOOKS = ["residuals_1", "mlp_1", "attention_2"]
REPO = Path(__file__).resolve().parents[2]


def small_cfg(**overrides) -> SaeConfig:
    base = dict(expansion_factor=2, k=8, epochs=3, batch_size=64, buffer_tokens=256, read_block_tokens=128,
                hooks_per_group=2, held_out_share=0.2, ce_batch_size=4, log_every=5)  # fmt: skip
    return SaeConfig(**{**base, **overrides})


def build_store(model, path: Path, n_samples: int = 40, seed: int = 0) -> Path:
    """Record residual/MLP/attention activations of random chat-like sequences into a real store."""
    rng = np.random.default_rng(seed)
    writer = StoreWriter.open(
        path, fingerprint="sae-test", hook_points=HOOKS, d_model=model.config.hidden_size,
        model_dtype=torch.float32, chunk_tokens=64, attrs={"model": "tiny-llama"}, durable=False,
    )  # fmt: skip
    captured: dict[str, torch.Tensor] = {}

    def keep(hook):
        def fn(acts):
            captured[hook] = acts[0].detach().clone()

        return fn

    fns = {HookPoint.from_name(h): keep(h) for h in HOOKS}
    for start in range(0, n_samples, 8):
        samples, sid, pos, phase, tok, acts = [], [], [], [], [], {h: [] for h in HOOKS}
        for s in range(start, min(start + 8, n_samples)):
            n_prompt, n_gen = int(rng.integers(10, 18)), int(rng.integers(0, 6))
            ids = [1, *rng.integers(100, 5000, n_prompt + n_gen - 1).tolist()]
            with torch.no_grad(), hooks_registered(model, fns):
                model(torch.tensor([ids]))
            for h in HOOKS:
                acts[h].append(captured[h])
            sid += [s] * len(ids)
            pos += range(len(ids))
            phase += [Phase.PROMPT] * (n_prompt - 3) + [Phase.POST_INSTRUCTION] * 3 + [Phase.GENERATED] * n_gen
            tok += ids
            samples.append(SampleRecord(s, f"p{s}", ["a", "b"][s % 2], ["safe", "toxic", "harmless"][s % 3],
                                        "r", bool(s % 2), 0.0, n_prompt, n_gen))  # fmt: skip
        writer.append(TokenBlock(samples, np.array(sid), np.array(pos), np.array(phase), np.array(tok),
                                 {h: torch.cat(acts[h]) for h in HOOKS}))  # fmt: skip
    writer.finalize()
    return path


@pytest.fixture(scope="module")
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    return build_store(model, tmp_path_factory.mktemp("store") / "acts.zarr")


@pytest.fixture(scope="module")
def stage_run(store, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae")
    calls = []

    class Tracker:
        def log(self, metrics, step=None):
            calls.append(metrics)

        def image(self, key, path):
            calls.append({key: Path(path)})

    results = run_sae_stage(small_cfg(), store, out, model_loader=lambda: (model, None), seed=0, tracker=Tracker())
    return out, results, calls


def test_every_hook_gets_a_saelens_folder_and_metrics(stage_run):
    out, results, calls = stage_run
    assert sorted(results) == sorted(HOOKS)
    for hook, entry in results.items():
        folder = out / hook
        assert entry["path"] == str(folder)
        for name in (CFG, WEIGHTS, SPARSITY, METRICS, "feature_density.png"):
            assert (folder / name).is_file(), name
        assert not (folder / CHECKPOINT).exists()
        metrics = json.loads((folder / METRICS).read_text())
        assert set(entry) == {"fvu", "explained_variance", "l0", "dead_frac", "dense_frac", "rel_bias",
                              "ce_recovered", "kl", "nonfinite_dropped", "path"}  # fmt: skip
        assert entry["nonfinite_dropped"] == {"stats_rows": 0, "train_draws": 0, "held_out_rows": 0}
        assert np.isclose(metrics["explained_variance"], 1 - metrics["fvu"])
        assert 0 <= metrics["dead_frac"] <= 1 and 0 <= metrics["dense_frac"] <= 1
        assert metrics["l0"] <= 8 + 1e-9
        assert isinstance(entry["ce_recovered"], float) and entry["kl"] >= 0
        assert {"ce_orig", "ce_sae", "ce_zero", "ce_positions"} <= set(metrics)
        assert sum(metrics["density_histogram"]["counts"]) + metrics["density_histogram"]["n_dead"] == 128
        cfg = json.loads((folder / CFG).read_text())
        assert cfg["model_name"] == "tiny-llama" and cfg["refusal_lab"]["hook_point"] == hook
    assert any("sae/step" in c for c in calls) and any(f"sae/{HOOKS[0]}/fvu" in c for c in calls)
    assert any(c.get(f"sae/{HOOKS[0]}/feature_density") == out / HOOKS[0] / "feature_density.png" for c in calls)


def test_ce_orig_matches_an_independent_loss(stage_run, store, model):
    out, results, _ = stage_run
    source = open_store(store)
    plan = plan_tokens(source, small_cfg(), 0)
    seqs, reason = held_out_sequences(source.tokens(), plan.eval_sample_ids, 64)
    assert reason is None
    totals = {target: [0.0, 0] for target in CeTargets}
    with torch.no_grad():
        for ids, phases in zip(seqs.token_ids, seqs.phases, strict=True):
            logits = model(torch.from_numpy(ids)[None]).logits[0, :-1]
            ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(ids[1:]), reduction="none")
            scored = {  # position 0 (BOS) is not spliced, so never scored
                CeTargets.all: np.arange(1, len(ids) - 1),
                CeTargets.response: np.flatnonzero(phases[1:] == Phase.GENERATED),
            }
            for target, positions in scored.items():
                positions = positions[positions >= 1]
                totals[target][0] += float(ce[positions].sum())
                totals[target][1] += len(positions)
    metrics = json.loads((out / HOOKS[0] / METRICS).read_text())  # the stage's default: response
    total, count = totals[CeTargets.response]
    assert 0 < count < totals[CeTargets.all][1]
    assert np.isclose(metrics["ce_orig"], total / count, rtol=1e-4)
    assert metrics["ce_positions"] == count
    stats = HookStats(1.0, float("inf"), np.zeros(1), 1.0, 1, 0)
    everywhere = ce_metrics(model, seqs, {HOOKS[0]: Replace(False)}, {HOOKS[0]: stats}, small_cfg().filters, 4,
                            CeTargets.all)[HOOKS[0]]  # fmt: skip
    total, count = totals[CeTargets.all]
    assert np.isclose(everywhere["ce_orig"], total / count, rtol=1e-4) and everywhere["ce_positions"] == count


class Replace(nn.Module):
    """A stand-in SAE: identity (perfect reconstruction) or zeros."""

    def __init__(self, zero: bool) -> None:
        super().__init__()
        self.zero = zero
        self.b_dec = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.zeros_like(x) if self.zero else x


def test_ce_recovered_is_one_for_a_perfect_reconstruction_and_zero_for_zeros(store, model):
    source = open_store(store)
    plan = plan_tokens(source, small_cfg(), 0)
    seqs, _ = held_out_sequences(source.tokens(), plan.eval_sample_ids, 64)
    stats = HookStats(1.0, float("inf"), np.zeros(1), 1.0, 1, 0)
    for hook, target in itertools.product(HOOKS, CeTargets):
        run = functools.partial(ce_metrics, model, seqs, stats={hook: stats}, filters=small_cfg().filters,
                                batch_size=4, targets=target)  # fmt: skip
        perfect = run(saes={hook: Replace(False)})[hook]
        assert np.isclose(perfect["ce_recovered"], 1.0) and abs(perfect["kl"]) < 1e-6
        zeros = run(saes={hook: Replace(True)})[hook]
        assert np.isclose(zeros["ce_recovered"], 0.0) and zeros["kl"] > 0


def test_completed_hooks_are_not_retrained(stage_run, store, model):
    out, results, _ = stage_run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    def no_model():
        raise AssertionError("a complete stage must not load the model")

    again = run_sae_stage(small_cfg(), store, out, model_loader=no_model, seed=0)
    assert again == results
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_saved_sae_reproduces_its_held_out_fvu(stage_run, store):
    out, results, _ = stage_run
    source = ActivationStore.open(store)
    plan = plan_tokens(source, small_cfg(), 0)
    hook = HOOKS[0]
    acts = torch.from_numpy(source.read(hook, 0, source.n_tokens)[plan.eval_rows])
    sae = load_sae(out / hook)
    max_norm = json.loads((out / hook / CFG).read_text())["refusal_lab"]["max_norm"]
    x = acts[acts.norm(dim=1) <= (max_norm or float("inf"))]
    fvu = float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert np.isclose(fvu, results[hook]["fvu"], rtol=1e-4)
    assert load_file(str(out / hook / WEIGHTS))["W_enc"].shape == (64, 128)


RUNNER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from refusal_lab.sae.config import SaeConfig
    from refusal_lab.sae.stage import run_sae_stage

    class Slow:  # paces training so the parent can kill it mid-run; does not touch the numerics
        def log(self, metrics, step=None):
            time.sleep(0.05)

    cfg = SaeConfig(expansion_factor=2, k=8, epochs=12, batch_size=64, buffer_tokens=256, read_block_tokens=128,
                    hooks_per_group=2, held_out_share=0.2, checkpoint_every=4, log_every=1, ce_max_samples=0)
    run_sae_stage(cfg, Path(sys.argv[1]), Path(sys.argv[2]), model_loader=None, seed=0,
                  tracker=Slow() if sys.argv[3] == "slow" else None)
    """
)


def run_runner(store: Path, out: Path, pace: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(store), str(out), pace], env=env)


def test_sigkilled_training_resumes_and_matches_an_unbroken_run(store, tmp_path):
    killed, unbroken = tmp_path / "killed", tmp_path / "unbroken"
    proc = run_runner(store, killed, "slow")
    checkpoint = killed / HOOKS[0] / CHECKPOINT
    deadline = time.time() + 120
    while not checkpoint.exists():
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / HOOKS[0] / METRICS).exists()
    step_at_kill = torch.load(checkpoint, weights_only=True)["step"]
    assert step_at_kill > 0

    assert run_runner(store, killed, "fast").wait(timeout=300) == 0
    assert run_runner(store, unbroken, "fast").wait(timeout=300) == 0
    for hook in HOOKS:
        metrics = json.loads((killed / hook / METRICS).read_text())
        resumed_from = metrics["train"]["resumed_from_step"]
        assert (resumed_from or 0) > 0 or hook == HOOKS[2]  # the second group had not started when killed
        a, b = load_file(str(killed / hook / WEIGHTS)), load_file(str(unbroken / hook / WEIGHTS))
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=f"{hook} {name}")
    assert json.loads((killed / HOOKS[0] / METRICS).read_text())["train"]["resumed_from_step"] >= step_at_kill
