"""The real config, composed as the CLI would, for tests that check it in process."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import detox_exp.cli  # noqa: F401 - registers what composing conf/ needs (register_config)
from tests.helpers.run import CONF_DIR


def compose_cfg(overrides: list[str], tmp_path: Path):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg
