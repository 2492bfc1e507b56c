"""SmolLM2-135M-Instruct through every stage (issue 15 items 5, 6): a reduced `experiment=smollm2_cpu` run.

`python -m refusal_lab experiment=smollm2_cpu` with a few dozen prompts, two hook points, few new
tokens and small SAE / circuits / edit budgets. The checks are structure and sanity on a real
model, not figures (those are in the README's SmolLM2 section): every stage's entry is there and
finite, every circuits set is ok or skipped with its reason, the report renders, and the stored
activations (float16, prompt and generated tokens, written from left-padded batches) equal
`output_hidden_states` of an unpadded forward. A second check compares the recorder's float32
activations with `output_hidden_states` directly, as tests/integration/test_activations.py does
on the tiny models. Needs the `smollm2` extra (README: SmolLM2).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refusal_lab.generation import generate_greedy, left_pad
from refusal_lab.hooks import ActivationRecorder, hooks_registered
from refusal_lab.layers import expand_layer_spec
from refusal_lab.models import encode_prompts, load_model, load_tokenizer
from refusal_lab.store import ActivationStore, Phase
from tests.integration.test_activations import reference
from tests.integration.test_smollm2_loading import SMOL, needs_smollm2

pytestmark = [needs_smollm2, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
HOOKS = ["residuals_8", "residuals_15"]
N_PROMPTS = 32  # 16 OR-Bench hard-1k `safe` + 16 `toxic`, balanced over categories
REDUCED = [
    "experiment=smollm2_cpu",
    f"data.limit={N_PROMPTS}",
    f"model.activation_layers=[{','.join(HOOKS)}]",
    "inference.max_new_tokens=12",
    "sae.expansion_factor=4",
    "circuits.contrast_data.limit=16",
    "circuits.max_prompts=16",
    "circuits.n_random=4",
    "circuits.faithfulness_sizes=[1,8,64]",
    "circuits.max_circuit_size=64",
    "edit.n_random=2",
    "edit.max_prompts=8",
    "tracking.wandb=disabled",
]
SETS = ("toxic", "safe", "over_refusal", "toxic_refused")


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("smollm2_run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "refusal_lab", *REDUCED, f"hydra.run.dir={tmp / 'run'}", f"artifacts_dir={tmp / 'a'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((tmp / "run" / "summary.json").read_text()), tmp / "run"


@pytest.fixture(scope="module")
def smollm2() -> tuple:
    return load_tokenizer(SMOL), load_model(SMOL).eval()


def test_collect_and_judges_report_refusal_rates_by_label(smol_run):
    collect = smol_run[0]["collect"]
    assert collect["samples"] == N_PROMPTS and collect["hook_points"] == HOOKS
    rates = collect["refusal_rate"]["by_label"]
    assert sorted(rates) == ["safe", "toxic"], rates
    assert all(0.0 <= r <= 1.0 for r in rates.values()), rates
    judges = smol_run[0]["judges"]
    assert set(judges["pairs"]) == {"rule~keyword", "rule~score", "keyword~score"}
    for pair in judges["pairs"].values():
        assert pair["binary"]["n"] == N_PROMPTS
        assert sum(map(sum, pair["binary"]["confusion"])) == N_PROMPTS


def test_sae_metrics_are_finite_per_hook_point(smol_run):
    sae = smol_run[0]["sae"]
    assert sorted(sae) == sorted(HOOKS)
    for hook, m in sae.items():
        values = [m["fvu"], m["l0"], m["dead_frac"], m["ce_recovered"]]
        assert all(math.isfinite(v) for v in values), (hook, m)
        # Sanity, not targets: better than predicting the mean, at most k active latents, a fraction dead.
        assert 0 < m["fvu"] < 1, (hook, m)
        assert 0 < m["l0"] <= 32 and 0 <= m["dead_frac"] <= 1, (hook, m)


def test_every_circuits_set_is_ok_or_skipped_with_its_reason(smol_run):
    circuits = smol_run[0]["circuits"]
    assert set(SETS) <= circuits.keys()
    for name in SETS:
        entry = circuits[name]
        assert entry["status"] in ("ok", "skipped"), (name, entry)
        if entry["status"] == "skipped":
            assert entry["reason"], name
            continue
        ablation = entry["ablation"]
        assert math.isfinite(ablation["refusal_rate_drop"]) and math.isfinite(ablation["kl_harmless"]), ablation
        assert ablation["n_random"] == 4 and math.isfinite(entry["faithfulness"]), (name, entry)
        assert sorted(entry["top_prompt_tokens"]) == sorted(HOOKS)
    # toxic and safe contrast every prompt of a label with harmless ones: they never lack prompts.
    assert circuits["toxic"]["status"] == circuits["safe"]["status"] == "ok"


def test_edit_is_ok_or_skipped_with_its_reason(smol_run):
    edit = smol_run[0]["edit"]
    assert edit.get("status", "ok") in ("ok", "skipped"), edit
    if edit.get("status") == "skipped":
        assert edit["reason"]
    else:
        assert {"unedited", "edit"} <= edit["table"].keys()


def test_report_renders_every_stage(smol_run):
    summary, run_dir = smol_run
    page = (run_dir / "report.html").read_text()
    assert "judges-by-label" in page and "judge stage did not run" not in page
    for hook in HOOKS:
        assert hook in page
    for name in SETS:
        assert name in page


def test_store_equals_output_hidden_states_for_prompt_and_generated_tokens(smol_run, smollm2):
    """The collect stage's float16 cells (written from left-padded batches) against unpadded forwards."""
    tokenizer, model = smollm2
    store = ActivationStore.open(Path(smol_run[0]["collect"]["store"]))
    samples, tokens = store.samples(), store.tokens()
    # SmolLM2's residual stream fits float16 at these layers: an overflow would be an inf cell the SAE drops.
    assert store.overflow_counts() == dict.fromkeys(HOOKS, 0)
    n_gen = samples["n_generated_tokens"]
    lengths = samples["n_prompt_tokens"] + n_gen
    assert len(set(lengths.tolist())) > 1, "rows of one batch differ in length, so some were padded"
    # The shortest, the longest and two more rows, each with generated tokens.
    order = np.argsort(lengths)
    rows = [int(r) for r in {order[0], order[-1], order[len(order) // 2], order[1]}]
    layers = [int(h.split("_")[1]) for h in HOOKS]
    for row in rows:
        sample = int(samples["sample_id"][row])
        idx = np.flatnonzero(tokens["sample_id"] == sample)
        assert (tokens["phase"][idx] == Phase.GENERATED).sum() == n_gen[row] > 0
        sequence = tokens["token_id"][idx].tolist()
        # ChatML's <|im_start|> is SmolLM2's BOS: once, first (the template writes it, nothing adds another).
        assert sequence[0] == tokenizer.bos_token_id and sequence.count(tokenizer.bos_token_id) >= 1
        assert sequence[1] != tokenizer.bos_token_id
        with torch.no_grad():
            hidden = model(torch.tensor([sequence]), output_hidden_states=True).hidden_states
        for hook, layer in zip(HOOKS, layers, strict=True):
            got = store.read(hook, int(idx[0]), int(idx[-1]) + 1).astype(np.float32)
            want = hidden[layer][0].numpy()
            assert np.isfinite(got).all()
            # float16 keeps 11 significant bits: a relative error of 2^-11 of each cell, plus float32 batch noise.
            scale = np.abs(want).max(axis=-1, keepdims=True)
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-3 * float(scale.max()), err_msg=f"{hook} {sample}")


def test_recorder_equals_output_hidden_states_in_a_padded_batch(smollm2):
    """residuals_N (the input of layer N) for prompt and generated tokens, float32, as on the tiny models."""
    tokenizer, model = smollm2
    prompts = ["Hi", "How do I kill a Python process that hangs?", "Write a haiku about the sea, please, in English."]
    rows = encode_prompts(SMOL, tokenizer, prompts, 512)
    pad = int(tokenizer.pad_token_id)
    ids, mask = left_pad(rows, pad, torch.device("cpu"))  # the padding collect uses
    width = ids.shape[1]
    n_layers = len(model.model.layers)
    points = expand_layer_spec(["residuals_0", "residuals_15", "residuals_29", "mlp_15", "attention_15"], n_layers)
    max_new = 6
    eos = [int(tokenizer.eos_token_id)]
    recorder = ActivationRecorder(model, points, torch.float32)
    recorder.reset(len(rows), width, max_new)
    with hooks_registered(model, recorder.hook_fns()):
        gen = generate_greedy(model, ids, mask, max_new, eos, pad, recorder, record_generated=True)
    for b, prompt in enumerate(rows):
        n_gen = int(gen.valid_BM[b].sum())
        assert n_gen > 0
        sequence = prompt + gen.tokens_BM[b, :n_gen].tolist()
        want = reference(model, sequence, n_layers)
        for point in points:
            buf = recorder.view(point, len(rows), width + max_new)[b]
            got = torch.cat([buf[width - len(prompt) : width], buf[width : width + n_gen]])
            scale = float(want[point.name].abs().max())
            torch.testing.assert_close(got, want[point.name], atol=1e-5 * scale, rtol=1e-4, msg=f"row {b} {point.name}")
