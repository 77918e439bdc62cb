"""What a newcomer reads: ``detox-exp --help`` (what the tool does, examples, the groups and
their real options only) and the one line for an unknown key (the closest known keys, the
same whether Hydra refuses the key or a check refuses it after ``+key=``, and advice that
leads to a run, not to another refusal)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException

from detox_exp.config_keys import config_keys, similar_keys, with_suggestions
from detox_exp.errors import UnknownKeyError, bad_input_message
from tests.helpers.cli import check_one_line_error
from tests.helpers.config import compose_cfg
from tests.helpers.run import CONF_DIR, ROOT, run_cli

PPO_OPTIONS = "default, dr_grpo, grpo, rloo"


def group_lines(help_text: str) -> dict[str, list[str]]:
    """The ``group: a, b`` lines of the help's "Configuration groups" section."""
    section = help_text.split("== Configuration groups ==")[1].split("== Config ==")[0]
    lines = [line for line in section.splitlines() if ": " in line and "(" not in line]
    return {g: o.split(", ") for g, o in (line.split(": ", 1) for line in lines)}


def test_help_says_what_the_tool_does_and_lists_real_options_only(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert text.startswith("detox-exp: RL fine-tuning of seq2seq language models"), text[:300]
    head = text.split("== Configuration groups ==")[0]
    examples = [line.split("#")[0].strip() for line in head.splitlines() if "  detox-exp" in line]
    assert 3 <= len(examples) <= 6, head
    assert "detox-exp experiment=demo" in examples
    assert "detox-exp-compare <sweep dir>" in head
    groups = group_lines(text)
    assert ", ".join(groups["ppo"]) == PPO_OPTIONS
    for group, options in groups.items():  # every option listed is a yaml file one can pick
        assert options == sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")), group
    assert "schema" not in " ".join(" ".join(o) for o in groups.values())


def test_the_ppo_schema_is_no_ppo_option(tmp_path: Path) -> None:
    stored = ConfigStore.instance().list("")
    assert "ppo_schema.yaml" in stored and "ppo" not in stored  # at the root, in no group
    result = run_cli("--cfg", "job", "experiment=demo", "ppo=schema", cwd=tmp_path)
    check_one_line_error(result, "ppo: no option 'schema'", PPO_OPTIONS)


@pytest.mark.parametrize("experiment", ["demo", "flan_t5_dialogsum"])
def test_ppo_default_still_composes_every_setting_of_the_schema(experiment: str, tmp_path) -> None:
    from detox_exp.ppo.settings import schema_node

    for ppo in ("default", "rloo", "grpo", "dr_grpo"):
        ppo_cfg = compose_cfg([f"experiment={experiment}", f"ppo={ppo}"], tmp_path).ppo
        assert set(schema_node()) <= set(ppo_cfg), ppo
        assert {"_target_", "optimizer", "kl_controller"} <= set(ppo_cfg)


# --- did you mean: the suggestions on the real composed config -----------------------------


@pytest.fixture(scope="module")
def demo_keys() -> list[str]:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return config_keys(compose("config", overrides=["experiment=demo"]))


@pytest.mark.parametrize(
    "key, first",
    [
        ("ppo.lerning_rate", "ppo.optimizer.lr"),  # a typo in a trl name (learning_rate)
        ("ppo.learning_rate", "ppo.optimizer.lr"),
        ("learning_rate", "ppo.optimizer.lr"),
        ("reward.training.learning_rate", "reward.training.lr"),  # its own node's lr
        ("ppo.epochs", "ppo.ppo_epochs"),
        ("ppo.num_steps", "ppo.steps"),
        ("ppo.beta", "ppo.kl_controller.kl_coef"),
        ("ppo.kl_coef", "ppo.kl_controller.kl_coef"),
        ("ppo.num_generations", "ppo.samples_per_prompt"),
        ("frontier.beta", "frontier.betas"),  # a synonym only under ppo's node
        ("ppo.temperature", "model.generation.temperature"),  # in another node
        ("model.lora.rr", "model.lora.r"),
        ("modle.lora.r", "model.lora.r"),  # a typo in the node
        ("stages.train", "stages.train_reward"),
        ("ppo.batchsize", "ppo.batch_size"),
    ],
)
def test_similar_keys_on_the_real_config(key: str, first: str, demo_keys: list[str]) -> None:
    found = similar_keys(key, demo_keys)
    assert found[0] == first, found
    assert len(found) <= 3 and all(k in demo_keys for k in found)
    assert not any(k.rpartition(".")[2].startswith("_") for k in found)  # never _target_


def test_no_suggestion_for_a_key_like_none(demo_keys: list[str]) -> None:
    assert similar_keys("ppo.xyzzy", demo_keys) == []
    assert similar_keys("model.generation.num_beams", demo_keys) == []


def composition_error(overrides: list[str]) -> BaseException:
    with (
        pytest.raises(ConfigCompositionException) as info,
        initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)),
    ):
        compose("config", overrides=overrides)
    return info.value


def test_refused_key_names_the_closest_keys_not_plus() -> None:
    argv = ["experiment=demo", "ppo.lerning_rate=1e-4", "--cfg", "job"]
    err = with_suggestions(composition_error(argv[:2]), str(CONF_DIR), argv)
    assert isinstance(err, UnknownKeyError) and err.suggestions == ["ppo.optimizer.lr"]
    line = bad_input_message(err)
    assert line.startswith("ppo.lerning_rate: unknown config key (did you mean ppo.optimizer.lr?)")
    assert "+ppo.lerning_rate" not in line  # the PPO schema would refuse the added key


def test_plus_is_advised_only_where_the_target_takes_the_key(tmp_path: Path) -> None:
    """``model.lora.use_rslora`` is no key of the yaml, but peft.LoraConfig takes it: adding
    it is the fix, and the run's checks accept the added key."""
    from detox_exp.run_config import check_run_config

    argv = ["experiment=demo", "model.lora.use_rslora=true"]
    err = with_suggestions(composition_error(argv), str(CONF_DIR), argv)
    assert isinstance(err, UnknownKeyError) and err.added_for == "peft.LoraConfig"
    assert "add it with +model.lora.use_rslora=" in bad_input_message(err)
    check_run_config(compose_cfg(["experiment=demo", "+model.lora.use_rslora=true"], tmp_path))


@pytest.mark.parametrize(
    "bad, meant",
    [("ppo.lerning_rate", "ppo.optimizer.lr"), ("model.lora.rr", "model.lora.r")],
)
def test_following_the_advice_gives_a_run(bad: str, meant: str, tmp_path: Path) -> None:
    """The added key is refused before any stage with the same suggestions; the key
    suggested passes every check."""
    from detox_exp.run_config import check_run_config

    with pytest.raises(UnknownKeyError) as info:
        check_run_config(compose_cfg(["experiment=demo", f"+{bad}=4"], tmp_path))
    argv = ["experiment=demo", f"+{bad}=4"]
    err = with_suggestions(info.value, str(CONF_DIR), argv)
    assert isinstance(err, UnknownKeyError) and err.suggestions[0] == meant
    assert err.added_for is None
    check_run_config(compose_cfg(["experiment=demo", f"{meant}=4"], tmp_path))


# --- through the real CLI: both paths print the same one line -------------------------------


def test_unknown_key_one_line_both_paths(tmp_path: Path) -> None:
    refused = run_cli("--cfg", "job", "experiment=demo", "ppo.lerning_rate=1e-4", cwd=ROOT)
    line = check_one_line_error(refused, "ppo.lerning_rate", "did you mean ppo.optimizer.lr?")
    assert "+ppo.lerning_rate" not in line
    added = run_cli(
        "experiment=demo",
        "+ppo.lerning_rate=1e-4",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
        cwd=ROOT,
    )
    assert check_one_line_error(added, "ppo.lerning_rate") == line
    assert not (tmp_path / "data").exists()  # refused before any stage
