"""Entry point: compose the Hydra config, convert it to typed dataclasses once, run the pipeline.

python -m refusal_lab                                   # embedded organism, offline, CPU
python -m refusal_lab model=mistral_7b layers=all       # a GPU node
python -m refusal_lab --multirun hydra/launcher=slurm model=llama2_7b,mistral_7b
python -m refusal_lab --help                            # groups and options
python -m refusal_lab --cfg job                         # the composed config
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from refusal_lab.config import RunConfig, register_configs
from refusal_lab.errors import ConfigError
from refusal_lab.store import StoreMismatchError

log = logging.getLogger("refusal_lab")

register_configs()

# A wheel ships the configs inside the package (setup.py maps conf/ to refusal_lab/conf); a source checkout
# (editable install) has only the top-level conf/, the one users edit. The packaged copy wins when present so an
# unrelated `conf/` beside an installed package can never be picked up.
CONFIG_PATH = "conf" if (Path(__file__).resolve().parent / "conf" / "config.yaml").is_file() else "../conf"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def main(dict_cfg: DictConfig) -> None:
    from refusal_lab.pipeline import run

    try:
        cfg = OmegaConf.to_object(dict_cfg)
    except ConfigError as err:  # raised by a schema's __post_init__
        log.error("invalid config: %s", err)
        raise SystemExit(2) from err
    assert isinstance(cfg, RunConfig)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, run_dir, Path(os.getcwd()))
    except (ConfigError, StoreMismatchError) as err:
        log.error("invalid input: %s", err)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
