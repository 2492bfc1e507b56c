"""The collect stage end to end on tiny Llama/Mistral models: the store holds the right tokens.

Every stored activation is compared with an independent unpadded forward pass over the
sample's prompt + response (`output_hidden_states` and plain module hooks), which checks the
recorder, the gather of valid cells, positions, phases and padding together.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

from refusal_lab.config import (
    DataConfig,
    DataSource,
    Device,
    InferenceConfig,
    ModelConfig,
    Positions,
    RunConfig,
    Stage,
    TrackingConfig,
    WandbMode,
)
from refusal_lab.pipeline import run
from refusal_lab.store import ActivationStore, Phase

N_PROMPTS = 7


def make_cfg(model_dir: Path, shared_data: Path, tmp: Path, **inference) -> RunConfig:
    return RunConfig(
        model=ModelConfig(
            name=str(model_dir),
            device=Device.cpu,
            local_files_only=True,
            activation_layers=["all", "mlp_1", "attention_0-1"],
            refusal_tokens=["▁I"],
        ),
        inference=InferenceConfig(batch_size="3", max_new_tokens=inference.pop("max_new_tokens", 6), **inference),
        data=DataConfig(source=DataSource.or_bench, path=str(shared_data / "or_bench"), limit=N_PROMPTS),
        tracking=TrackingConfig(wandb=WandbMode.disabled),
        stages=[Stage.collect],
        artifacts_dir=str(tmp / "artifacts"),
    )


def reference(model, sequence: list[int]) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_m, _a, out):
            outputs[name] = (out[0] if isinstance(out, tuple) else out)[0]

        return hook

    handles = [model.model.layers[1].mlp.register_forward_hook(keep("mlp_1"))]
    handles += [model.model.layers[i].self_attn.register_forward_hook(keep(f"attention_{i}")) for i in (0, 1)]
    with torch.no_grad():
        out = model(torch.tensor([sequence]), output_hidden_states=True)
    for handle in handles:
        handle.remove()
    for layer in range(len(model.model.layers)):
        outputs[f"residuals_{layer}"] = out.hidden_states[layer][0]
    return outputs


def stored_by_sample(store: ActivationStore) -> dict[int, np.ndarray]:
    tokens = store.tokens()
    return {int(s): np.flatnonzero(tokens["sample_id"] == s) for s in np.unique(tokens["sample_id"])}


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_mistral"])
def test_store_equals_full_forward_for_every_token(kind, request, shared_data, tmp_path):
    cfg = make_cfg(request.getfixturevalue(kind), shared_data, tmp_path)
    summary = run(cfg, tmp_path / "run", tmp_path)
    store = ActivationStore.open(Path(summary["collect"]["store"]))
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name).eval()
    samples = store.samples()
    tokens = store.tokens()
    assert store.n_samples == N_PROMPTS and sorted(samples["sample_id"]) == list(range(N_PROMPTS))
    assert store.hook_points == ["residuals_0", "residuals_1", "residuals_2", "mlp_1", "attention_0", "attention_1"]
    n_post = None
    for row, sample in enumerate(samples["sample_id"]):
        idx = stored_by_sample(store)[int(sample)]
        n_prompt, n_gen = int(samples["n_prompt_tokens"][row]), int(samples["n_generated_tokens"][row])
        # Every real token once, no padding: positions 0..n-1 in order, phases prompt -> template -> generated.
        assert tokens["position"][idx].tolist() == list(range(n_prompt + n_gen))
        phases = tokens["phase"][idx]
        assert (np.diff(phases) >= 0).all() and phases[0] == Phase.PROMPT
        assert (phases == Phase.GENERATED).sum() == n_gen
        n_post = n_post or int((phases == Phase.POST_INSTRUCTION).sum())
        assert int((phases == Phase.POST_INSTRUCTION).sum()) == n_post > 0
        sequence = tokens["token_id"][idx].tolist()
        assert sequence[0] == 1  # BOS from the chat template
        want = reference(model, sequence)
        for hook in store.hook_points:
            got = store.read(hook, int(idx[0]), int(idx[-1]) + 1)
            np.testing.assert_allclose(got, want[hook].numpy(), atol=2e-3, rtol=2e-3, err_msg=f"{hook} sample {sample}")
    assert summary["collect"]["tokens"] == len(tokens["sample_id"])
    assert set(summary["collect"]["refusal_rate"]["by_label"]) <= {"safe", "toxic"}


@pytest.mark.parametrize(
    ("positions", "phases"),
    [
        (Positions.last_prompt, {Phase.POST_INSTRUCTION}),
        (Positions.post_instruction, {Phase.POST_INSTRUCTION}),
        (Positions.prompt, {Phase.PROMPT, Phase.POST_INSTRUCTION}),
        (Positions.generated, {Phase.GENERATED}),
    ],
)
def test_positions_policy_keeps_exactly_its_tokens(positions, phases, tiny_llama, shared_data, tmp_path):
    full = run(make_cfg(tiny_llama, shared_data, tmp_path / "a"), tmp_path / "run_full", tmp_path)
    part = run(make_cfg(tiny_llama, shared_data, tmp_path / "b", positions=positions), tmp_path / "run_part", tmp_path)
    full_store = ActivationStore.open(Path(full["collect"]["store"]))
    part_store = ActivationStore.open(Path(part["collect"]["store"]))
    ft, pt = full_store.tokens(), part_store.tokens()
    assert set(np.unique(pt["phase"]).tolist()) == {int(p) for p in phases}
    if positions == Positions.last_prompt:
        assert len(pt["sample_id"]) == N_PROMPTS
    # The same cells as the full store, selected by the policy.
    full_keys = {(s, p): i for i, (s, p) in enumerate(zip(ft["sample_id"], ft["position"], strict=True))}
    for i, (s, p, phase) in enumerate(zip(pt["sample_id"], pt["position"], pt["phase"], strict=True)):
        j = full_keys[(s, p)]
        assert ft["phase"][j] == phase
        np.testing.assert_array_equal(
            part_store.read("residuals_1", i, i + 1), full_store.read("residuals_1", j, j + 1)
        )
    selected = {
        Positions.prompt: ft["phase"] != Phase.GENERATED,
        Positions.generated: ft["phase"] == Phase.GENERATED,
        Positions.post_instruction: ft["phase"] == Phase.POST_INSTRUCTION,
    }
    if positions in selected:
        assert len(pt["sample_id"]) == int(selected[positions].sum())


def test_rerun_is_skipped_and_other_config_gets_another_store(tiny_llama, shared_data, tmp_path):
    cfg = make_cfg(tiny_llama, shared_data, tmp_path)
    first = run(cfg, tmp_path / "r1", tmp_path)
    store = Path(first["collect"]["store"])
    mtime = (store / "manifest.json").stat().st_mtime_ns
    again = run(cfg, tmp_path / "r2", tmp_path)
    assert again["collect"]["store"] == str(store)
    assert (store / "manifest.json").stat().st_mtime_ns == mtime, "a complete store must not be rewritten"
    other = run(replace(cfg, inference=replace(cfg.inference, max_new_tokens=3)), tmp_path / "r3", tmp_path)
    assert other["collect"]["store"] != str(store)


def test_out_of_memory_halves_the_batch_and_loses_no_sample(tiny_llama, shared_data, tmp_path, monkeypatch):
    """`batch_size: auto` semantics on a fake device limit: batches over 2 prompts raise OOM."""
    from refusal_lab import collect_batches

    real_run = collect_batches.BatchRunner.run
    sizes: list[int] = []

    def limited(self, prompts, indices):
        sizes.append(len(indices))
        if len(indices) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(self, prompts, indices)

    monkeypatch.setattr(collect_batches.BatchRunner, "run", limited)
    cfg = make_cfg(tiny_llama, shared_data, tmp_path)
    cfg = replace(cfg, inference=replace(cfg.inference, batch_size="auto"))
    monkeypatch.setattr(collect_batches, "CPU_AUTO_BATCH", 8)
    summary = run(cfg, tmp_path / "run", tmp_path)
    # 7 prompts fail -> 3 fail -> 1 fits, and the size that fit is kept for the rest.
    assert sizes == [7, 3] + [1] * N_PROMPTS, sizes
    store = ActivationStore.open(Path(summary["collect"]["store"]))
    assert sorted(store.samples()["sample_id"]) == list(range(N_PROMPTS))

    reference = run(make_cfg(tiny_llama, shared_data, tmp_path / "ref"), tmp_path / "ref_run", tmp_path)
    ref_store = ActivationStore.open(Path(reference["collect"]["store"]))
    assert store.n_tokens == ref_store.n_tokens


class IndexDevices(TorchFunctionMode):
    """Records (indexed tensor's device, index tensors' devices) of every tensor-indexed `__getitem__`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.device, list[torch.device]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            devices = [i.device for i in index if isinstance(i, torch.Tensor)]
            if devices:
                self.calls.append((args[0].device, devices))
        return func(*args, **(kwargs or {}))


def test_gather_moves_indices_to_each_buffers_device(tiny_llama, shared_data, tmp_path):
    """device_map=auto puts capture buffers on their layers' GPUs while the gather indices come from the
    embedding's device, which PyTorch refuses for two GPUs. On CPU a buffer on the `meta` device stands
    in for the other GPU (meta accepts CPU indices, so the devices are checked at every indexing call)."""
    from refusal_lab.collect_batches import BatchRunner
    from refusal_lab.collect_plan import plan_collect
    from refusal_lab.data import load_prompts
    from refusal_lab.layers import HookPoint, Site
    from refusal_lab.models import load_model, load_tokenizer

    cfg = make_cfg(tiny_llama, shared_data, tmp_path)
    prompts = load_prompts(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    plan = plan_collect(cfg, tokenizer, prompts)
    runner = BatchRunner(cfg, load_model(cfg.model), tokenizer, plan, torch.float32)
    other = HookPoint(Site.MLP, 1)
    runner.recorder._devices[other] = torch.device("meta")  # where load_model(device_map=auto) would put it
    indices = plan.order[:3]
    with IndexDevices() as mode:
        block = runner.run(prompts, indices)
    assert mode.calls
    for tensor_device, index_devices in mode.calls:
        assert all(d == tensor_device for d in index_devices), (tensor_device, index_devices)
    assert block.acts[other.name].device.type == "meta"
    assert block.acts[other.name].shape == (block.n_tokens, plan.d_model)
    # The buffers on the model's device still give the same cells as a run with all buffers there.
    reference = BatchRunner(cfg, runner.model, tokenizer, plan, torch.float32).run(prompts, indices)
    for name, acts in reference.acts.items():
        if name != other.name:
            torch.testing.assert_close(block.acts[name], acts)
