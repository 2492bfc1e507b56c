"""Every shipped config composes into a valid RunConfig; bad values fail at compose time."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from refusal_lab.config import ConfigError, Positions, RunConfig, register_configs

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("experiment", "hydra", "local"))
"""Every config group folder (a new group is composed by the tests below as soon as it exists)."""


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make(overrides: list[str], hydra_cfg: bool = False):
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_cfg)


def typed(overrides: list[str]) -> RunConfig:
    cfg = OmegaConf.to_object(make(overrides))
    assert isinstance(cfg, RunConfig)
    return cfg


def test_every_yaml_is_covered():
    covered = {CONF / "config.yaml"}
    for group in [*GROUPS, "experiment", "hydra/launcher"]:
        covered |= set((CONF / group).glob("*.yaml"))
    assert set(CONF.rglob("*.yaml")) <= covered | set(CONF.glob("local/*.yaml"))


@pytest.mark.parametrize("group_option", [f"{g}={o}" for g in GROUPS for o in options(g)])
def test_each_group_option_composes(group_option):
    cfg = typed([group_option])
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_each_experiment_composes(experiment):
    cfg = typed([f"experiment={experiment}"])
    # Every preset picks a real model (not the organism default): a hub id or an installed package.
    assert cfg.model.name.startswith(("meta-llama/", "mistralai/", "package:"))


@pytest.mark.parametrize("launcher", options("hydra/launcher"))
def test_each_launcher_composes(launcher):
    from hydra.utils import get_class

    cfg = make([f"hydra/launcher={launcher}"], hydra_cfg=True)
    # By name: Hydra's plugin discovery may import the submitit plugin module a second time.
    bases = {f"{c.__module__}.{c.__name__}" for c in get_class(cfg.hydra.launcher._target_).__mro__}
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.BaseSubmititLauncher" in bases


def test_default_is_the_organism_on_all_layers():
    cfg = typed([])
    assert cfg.model.name == "organism"
    assert cfg.model.activation_layers == ["all"]
    assert cfg.inference.max_new_tokens == 20


def test_layers_group_sets_the_models_spec():
    assert typed(["layers=middle"]).model.activation_layers == ["residuals_10-21"]
    assert typed(["model=mistral_7b", "layers=all"]).model.name == "mistralai/Mistral-7B-Instruct-v0.1"
    custom = typed(["model.activation_layers=[residuals_1,mlp_0-2]"])
    assert custom.model.activation_layers == ["residuals_1", "mlp_0-2"]


def test_misspelled_key_fails_at_compose_time():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        make(["inference.max_new_token=5"])


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(ConfigCompositionException) as err:
        make(["model=gpt5"])
    assert "llama2_7b" in str(err.value) and "mistral_7b" in str(err.value)


def test_bad_enum_value_fails_at_compose_time():
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        make(["inference.positions=everything"])
    assert "last_prompt" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["inference.max_new_tokens=-1"], "inference.max_new_tokens: -1"),
        (["inference.batch_size=zero"], "inference.batch_size: 'zero'"),
        (["model.activation_layers=[residuals_x]"], "model.activation_layers: invalid layer spec 'residuals_x'"),
        (["data.limit=0"], "data.limit: 0"),
    ],
)
def test_post_init_errors_name_key_and_value(override, needle):
    with pytest.raises((ConfigError, ValidationError)) as err:
        typed(override)
    assert needle in str(err.value)


def test_positions_enum_parses():
    assert typed(["inference.positions=last_prompt"]).inference.positions == Positions.last_prompt


def test_sae_config_errors_need_no_import_of_the_run_config():
    """sae/config.py and config.py used to import each other for ConfigError; errors.py breaks the cycle."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from refusal_lab.errors import ConfigError\n"
        "from refusal_lab.sae.config import SaeConfig\n"
        "try:\n"
        "    SaeConfig(k=0)\n"
        "except ConfigError as err:\n"
        "    assert 'sae.k' in str(err), err\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "assert 'refusal_lab.config' not in sys.modules, 'sae.config pulled in refusal_lab.config'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
