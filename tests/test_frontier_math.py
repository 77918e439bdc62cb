"""The frontier's math (detox_exp/frontier_math.py) against values computed by hand and the
exact optimum of a small categorical reference."""

from __future__ import annotations

import numpy as np
import pytest

from detox_exp import frontier_math

# a reference over 4 responses with known probabilities and toxicities
PROBS = np.array([0.4, 0.3, 0.2, 0.1])
TOX = np.array([0.02, 0.1, 0.5, 0.9])
REWARDS = {"log_prob": np.log1p(-TOX), "logit": np.log1p(-TOX) - np.log(TOX)}


def exact_optimum(rewards: np.ndarray, beta: float) -> tuple[float, float]:
    """(mean toxicity, KL(pi* || ref)) of pi* = ref * exp(r / beta) / Z, exactly."""
    unnorm = PROBS * np.exp(rewards / beta)
    pi = unnorm / unnorm.sum()
    return float(pi @ TOX), float(pi @ np.log(pi / PROBS))


def test_weights_by_hand() -> None:
    w = frontier_math.optimum_weights(np.array([[0.0, np.log(3.0)]]), beta=1.0)
    np.testing.assert_allclose(w, [[0.25, 0.75]])
    # KL = sum w log(K w) = 0.25 log 0.5 + 0.75 log 1.5
    np.testing.assert_allclose(
        frontier_math.optimum_kl(w), [0.25 * np.log(0.5) + 0.75 * np.log(1.5)]
    )
    np.testing.assert_allclose(frontier_math.optimum_kl(np.full((1, 5), 0.2)), [0.0], atol=1e-15)
    np.testing.assert_allclose(frontier_math.optimum_kl(np.array([[1.0, 0.0, 0.0]])), [np.log(3)])
    # huge rewards / tiny beta: no overflow, the best draw takes all the weight
    np.testing.assert_allclose(
        frontier_math.optimum_weights(np.array([[500.0, 400.0]]), 0.01), [[1.0, 0.0]]
    )


@pytest.mark.parametrize("reward_type", ["log_prob", "logit"])
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_estimates_match_the_exact_optimum(reward_type: str, beta: float) -> None:
    """K draws per prompt from the categorical reference, many prompts: the self-normalised
    estimates of the optimum's toxicity and KL equal the exact values within sampling error
    (plus the O(1/K) bias of self-normalisation, small at K = 64)."""
    rng = np.random.default_rng(0)
    prompts, k = 400, 64
    idx = rng.choice(4, size=(prompts, k), p=PROBS)
    rewards, tox = REWARDS[reward_type][idx], TOX[idx]
    w = frontier_math.optimum_weights(rewards, beta)
    want_tox, want_kl = exact_optimum(REWARDS[reward_type], beta)
    per_prompt_tox = (w * tox).sum(1)
    se = per_prompt_tox.std() / np.sqrt(prompts)
    assert frontier_math.tilted_mean(tox, w) == pytest.approx(
        want_tox, abs=4 * se + 0.01 * want_tox
    )
    kl = frontier_math.optimum_kl(w)
    assert kl.mean() == pytest.approx(want_kl, abs=4 * kl.std() / np.sqrt(prompts) + 0.02)
    drop = frontier_math.toxicity_drop(rewards, tox, beta)
    assert drop == pytest.approx(1 - want_tox / float(PROBS @ TOX), abs=0.03)


def test_beta_for_drop_is_monotone_and_reaches_the_target() -> None:
    rng = np.random.default_rng(1)
    idx = rng.choice(4, size=(200, 32), p=PROBS)
    rewards, tox = REWARDS["log_prob"][idx], TOX[idx]
    betas = []
    for target in (0.2, 0.4, 0.6, 0.8):
        beta = frontier_math.beta_for_drop(rewards, tox, target, 0.01, 100.0)
        assert beta is not None
        assert frontier_math.toxicity_drop(rewards, tox, beta) >= target  # reached
        assert frontier_math.toxicity_drop(rewards, tox, beta * 1.01) < target  # the largest such
        betas.append(beta)
    assert betas == sorted(betas, reverse=True)  # a larger cut needs a smaller beta
    drops = [frontier_math.toxicity_drop(rewards, tox, b) for b in np.geomspace(0.01, 100, 30)]
    assert all(a >= b - 1e-12 for a, b in zip(drops, drops[1:]))  # monotone in beta
    assert frontier_math.beta_for_drop(rewards, tox, 0.999, 0.01, 100.0) is None  # out of reach
    assert (
        frontier_math.beta_for_drop(rewards, tox, 1e-6, 0.01, 100.0) == 100.0
    )  # reached at the top


def test_resampling_follows_the_weights() -> None:
    w = np.array([[0.7, 0.0, 0.3], [0.0, 1.0, 0.0]])
    u = np.random.default_rng(2).random((2, 20000))
    picked = frontier_math.resample(w, u)
    np.testing.assert_allclose(np.bincount(picked[0], minlength=3) / 20000, w[0], atol=0.01)
    assert (picked[1] == 1).all()


def test_corpus_metrics_are_scaled_onto_the_reference() -> None:
    """Uniform weights (beta -> infinity) give back the reference's corpus metrics exactly;
    weights on each prompt's one generic draw collapse the corpus to that text."""
    texts = [
        ["the generic answer"] + [f"prompt {p} answer {i}" for i in range(3)] for p in range(6)
    ]
    rewards = np.zeros((6, 4))
    tox = np.full((6, 4), 0.1)
    u = frontier_math.resampling_uniforms(3, 8, 6)
    ref = frontier_math.ReferenceCorpus.of(texts, u)
    flat = frontier_math.optimum_metrics(1.0, rewards, tox, texts, {}, ref, 0.5, u)
    for name in frontier_math.CORPUS_METRICS:
        assert flat[name] == pytest.approx(ref.full[name])
    assert flat["kl_to_reference"] == pytest.approx(0.0, abs=1e-12)
    peaked = rewards.copy()
    peaked[:, 0] = 50.0
    sharp = frontier_math.optimum_metrics(1.0, peaked, tox, texts, {}, ref, 0.5, u)
    assert sharp["unique_fraction"] < 0.5 * ref.full["unique_fraction"]
    assert sharp["kl_to_reference"] == pytest.approx(np.log(4), rel=1e-6)


def test_an_optimum_on_half_the_draws_repeats_no_response() -> None:
    """The optimum as the reference conditioned on half its draws (every response distinct)
    writes distinct responses as the reference does: one pick per prompt per resampling,
    not K (K picks from the K/2 kept draws would repeat them: unique fraction ~0.6)."""
    p, k = 64, 8
    texts = [[f"prompt {j} answer {i}" for i in range(k)] for j in range(p)]
    rewards = np.where(np.arange(k) % 2 == 0, 0.0, -60.0)[None].repeat(p, 0)
    u = frontier_math.resampling_uniforms(0, 16, p)
    ref = frontier_math.ReferenceCorpus.of(texts, u)
    best = frontier_math.optimum_metrics(1.0, rewards, np.zeros((p, k)), texts, {}, ref, 0.5, u)
    assert best["unique_fraction"] == pytest.approx(1.0)
    assert best["distinct_2"] == pytest.approx(ref.full["distinct_2"], rel=0.05)
    assert best["kl_to_reference"] == pytest.approx(np.log(2), rel=1e-6)


def _draws(rng: np.random.Generator, prompts: int = 100, k: int = 16):
    from detox_exp.frontier.result import ReferenceDraws

    idx = rng.choice(4, size=(prompts, k), p=PROBS)
    texts = [[f"response {i} of prompt {p}" for i in row] for p, row in enumerate(idx)]
    return ReferenceDraws(REWARDS["log_prob"][idx], TOX[idx], np.full(idx.shape, 0.3), texts)


def test_beta_is_chosen_or_refused() -> None:
    """The run's beta: from a target with the frontier controller; a configured beta whose
    optimum cuts less than min_drop, or a target out of reach, is one ConfigError."""
    from detox_exp.errors import ConfigError
    from detox_exp.frontier.result import read_frontier
    from detox_exp.frontier.stage import choose_beta

    result = read_frontier(_draws(np.random.default_rng(4)), [0.01, 0.1, 1, 10], 0.5, 0, 2)
    assert [r["beta"] for r in result.rows] == [0.01, 0.1, 1, 10]
    target = {"_target_": "detox_exp.kl_control.FrontierKLController", "target_drop": 0.5}
    beta = choose_beta(result, target, min_drop=0.1)
    assert 0.01 < beta < 10 and result.drop(beta) == pytest.approx(0.5, abs=1e-6)
    assert result.at(beta)["toxicity_change"] == pytest.approx(-0.5, abs=1e-6)
    fixed = {"_target_": "detox_exp.kl_control.FixedKLController", "kl_coef": 0.1}
    assert choose_beta(result, fixed, min_drop=0.1) == 0.1
    with pytest.raises(ConfigError, match="frontier.min_drop") as err:
        choose_beta(result, fixed | {"kl_coef": 1000.0}, min_drop=0.1)
    assert "kl_coef=" in str(err.value) and "KL" in str(err.value)
    assert choose_beta(result, fixed | {"kl_coef": 1000.0}, min_drop=0) == 1000.0  # off
    with pytest.raises(ConfigError, match="target_drop.*the best is"):
        choose_beta(result, target | {"target_drop": 0.999}, min_drop=0.1)


def test_bad_frontier_settings_are_config_errors() -> None:
    from detox_exp.errors import ConfigError
    from detox_exp.frontier.stage import Frontier
    from detox_exp.kl_control import FrontierKLController

    for kwargs, field in (
        ({"samples_per_prompt": 1}, "frontier.samples_per_prompt"),
        ({"betas": []}, "frontier.betas"),
        ({"betas": [0.1, -1]}, "frontier.betas"),
        ({"min_drop": 1.0}, "frontier.min_drop"),
        ({"num_prompts": 0}, "frontier.num_prompts"),
    ):
        with pytest.raises(ConfigError, match=field):
            Frontier(**kwargs)
    with pytest.raises(ConfigError, match="ppo.kl_controller.target_drop"):
        FrontierKLController(target_drop=1.5)
    assert FrontierKLController(0.5, kl_coef=2.5).value == 2.5


def test_frontier_controller_needs_the_frontier_stage(tmp_path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from detox_exp.errors import ConfigError
    from detox_exp.run_config import check_run_config
    from tests.helpers.run import CONF_DIR

    overrides = ["experiment=demo", "ppo/kl_controller=frontier"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        on = compose("config", overrides=overrides, return_hydra_config=True)
        off = compose("config", overrides=[*overrides, "stages.frontier=false"])
    HydraConfig.instance().set_config(on)
    for cfg in (on, off):
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
    check_run_config(on)
    with pytest.raises(ConfigError, match="stages.frontier=true"):
        check_run_config(off)


@pytest.mark.parametrize("option", ["fixed", "adaptive", "frontier"])
def test_the_frontier_controller_is_recognised_by_its_class(option: str) -> None:
    """Each shipped ppo/kl_controller option: the frontier's (and only it) takes its beta from
    the frontier stage, by what it builds (a subclass counts), not by its keys."""
    from omegaconf import OmegaConf

    from detox_exp.kl_control import FrontierKLController, configured_beta
    from tests.helpers.run import CONF_DIR

    node = OmegaConf.to_container(
        OmegaConf.load(CONF_DIR / "ppo" / "kl_controller" / f"{option}.yaml")
    )
    assert FrontierKLController.configured_by(node) == (option == "frontier")
    assert (configured_beta(node) is None) == (option == "frontier")


def test_the_default_beta_grid_is_written_once() -> None:
    """conf/frontier/default.yaml's betas are the stage's default grid."""
    from omegaconf import OmegaConf

    from detox_exp.frontier.stage import BETAS
    from tests.helpers.run import CONF_DIR

    node = OmegaConf.load(CONF_DIR / "frontier" / "default.yaml")
    assert tuple(node.betas) == BETAS
