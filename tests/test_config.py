"""Every config group option and experiment composes, and its components instantiate."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from tests.helpers.config import compose_cfg
from tests.helpers.run import CONF_DIR

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("local",))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


CASES = [
    [f"{group}={option}"]
    for group in GROUPS
    if group not in ("hydra", "paths", "experiment", "debug", "hparams_search")
    for option in options(group)
]
CASES += [[f"experiment={e}"] for e in options("experiment")]
CASES += [[f"experiment={e}", "debug=fast"] for e in options("experiment")]


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: " ".join(o))
def test_composes_and_instantiates(overrides: list[str], tmp_path: Path) -> None:
    needs_path = "dataset=jsonl" in overrides or "experiment=bench" in overrides
    cfg = compose_cfg(
        overrides + ["dataset.path=/tmp/x.jsonl"] if needs_path else overrides, tmp_path
    )
    plain = cfg.copy()
    with open_dict(plain):
        del plain["hydra"]
    OmegaConf.to_container(plain, resolve=True)  # every interpolation resolves
    lora = instantiate(cfg.model.lora, _convert_="all")
    assert lora.r > 0 and lora.target_modules == "auto"  # resolved by models.load_policy
    assert instantiate(cfg.logger, _convert_="all").run_dir == Path(cfg.paths.output_dir)
    data = instantiate(cfg.dataset, _convert_="all")
    assert "{dialogue}" in data.prompt_template
    trainer_factory = instantiate(cfg.ppo, _convert_="all")
    assert callable(trainer_factory)
    assert trainer_factory.keywords["kl_controller"].value > 0
    optimizer = trainer_factory.keywords["optimizer"]
    assert optimizer.keywords["lr"] > 0
    instantiate(cfg.eval, _convert_="all")
    instantiate(cfg.reward.training.data, _convert_="all")
    if cfg.assets is not None:
        assets = instantiate(cfg.assets, _convert_="all")
        assert str(assets.cache_dir).startswith(str(tmp_path))


@pytest.mark.parametrize("overrides", [["dataset=jsonl"], ["experiment=bench"]])
def test_local_dataset_path_is_required(overrides: list[str], tmp_path: Path) -> None:
    # jsonl builds on dialogsum: its hub id must not be left as the path
    assert compose_cfg(overrides, tmp_path).dataset.path is None


def test_real_experiment_uses_real_ids(tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=flan_t5_dialogsum"], tmp_path)
    assert cfg.model.name_or_path == "google/flan-t5-base"
    assert cfg.reward.name_or_path == "facebook/roberta-hate-speech-dynabench-r4-target"
    assert cfg.reward.nontoxic_label == "nothate" and cfg.reward.reward_type == "log_prob"
    assert cfg.dataset.path == "knkarthick/dialogsum"
    assert cfg.dataset.prompt_template.startswith("Summarize the following conversation.\n\n")
    assert cfg.dataset.prompt_template.endswith("\n\nSummary: ")
    assert (cfg.dataset.min_chars, cfg.dataset.max_chars) == (200, 1000)
    lora = cfg.model.lora
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (32, 32, 0.0)
    assert cfg.model.generation.top_k == 0 and cfg.model.generation.top_p == 1.0
    assert cfg.stages.train_reward is False


def test_default_kl_design(tmp_path: Path) -> None:
    """The reward's KL term is k1 (the right gradient); the logged KL never negative."""
    for overrides in ([], ["experiment=flan_t5_dialogsum"], ["experiment=demo"]):
        cfg = compose_cfg(overrides, tmp_path)
        assert cfg.ppo.kl_estimator == "k1"
        assert cfg.ppo.kl_log_estimator in ("k3", "full")
        assert cfg.reward.reward_type == "log_prob"


@pytest.mark.parametrize(
    "experiment, ppo, ent_coef",
    [
        ("demo", None, 0.2),
        ("demo", "rloo", 0.2),
        ("demo", "grpo", 0.0),
        ("demo", "dr_grpo", 0.0),
        ("demo", "default", 0.0),
        ("demo_small", None, 0.2),
        ("demo_small", "grpo", 0.0),
        ("flan_t5_dialogsum", None, 0.0),
    ],
)
def test_an_algorithm_brings_its_own_demo_settings(
    experiment: str, ppo: str | None, ent_coef: float, tmp_path: Path
) -> None:
    """The demo's entropy bonus is tuned for RLOO (it makes GRPO diverge): `ppo=grpo` on the
    demo runs without it (conf/tuned/demo_rloo.yaml), a command-line value still wins."""
    overrides = [f"experiment={experiment}"] + ([f"ppo={ppo}"] if ppo else [])
    assert compose_cfg(overrides, tmp_path).ppo.ent_coef == ent_coef
    assert compose_cfg([*overrides, "ppo.ent_coef=0.05"], tmp_path).ppo.ent_coef == 0.05
