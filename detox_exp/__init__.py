"""detox_exp: PPO detoxification of seq2seq language models, configured with Hydra."""

# registers the typed PPO schema with Hydra's ConfigStore (`ppo_schema`, composed by
# conf/ppo/default.yaml as /ppo_schema@_here_) whenever the package is imported: the
# entrypoint and every compose
from omegaconf import OmegaConf

from detox_exp.ppo import settings as _settings  # noqa: F401


def _registry_choice(field: str) -> str:
    """``${registry_choice:ppo.advantage_estimator}``: a sweep over every registered name."""
    from detox_exp.ppo.checks import sweep_choice  # torch: only when a config asks

    return sweep_choice(field)


OmegaConf.register_new_resolver("registry_choice", _registry_choice, replace=True)

__version__ = "0.1.0"
