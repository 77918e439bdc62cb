"""Print the docs tables of the registered estimators and modes (docs/design.md,
"Registries"); tests/test_registry.py checks that the docs hold exactly these tables.

    python scripts/registry_tables.py
"""

from __future__ import annotations

from detox_exp.kl import KL_ESTIMATORS
from detox_exp.ppo.advantages import ADVANTAGE_ESTIMATORS
from detox_exp.ppo.core import LOSS_AGG_MODES

TABLES = {
    "ppo.advantage_estimator": (ADVANTAGE_ESTIMATORS, {"needs_critic": "value head"}),
    "ppo.loss_agg_mode": (LOSS_AGG_MODES, {}),
    "KL estimators": (
        KL_ESTIMATORS,
        {"reward": "kl_estimator", "log": "kl_log_estimator", "loss": "kl_loss_estimator"},
    ),
}


def tables() -> dict[str, str]:
    """Each registry's markdown table, by its heading."""
    return {title: registry.markdown(columns) for title, (registry, columns) in TABLES.items()}


if __name__ == "__main__":
    for title, table in tables().items():
        print(f"### {title}\n\n{table}\n")
