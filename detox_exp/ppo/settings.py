"""The PPO trainer's settings (``ppo.*``): the one place that owns their defaults and their
documentation. ``conf/ppo/default.yaml`` composes this schema (the ConfigStore node
``ppo_schema``) and adds only the built objects (optimizer, KL controller) and
interpolations; the other ``conf/ppo/*.yaml`` override values. ``detox-exp --cfg job`` shows
every key. The checks live in :mod:`detox_exp.ppo.checks`. Importing ``detox_exp`` registers
the schema (``detox_exp/__init__.py``), so this module stays light (no torch).

Batch sizes count SAMPLES: a rollout of ``batch_size`` samples holds
``batch_size / samples_per_prompt`` prompts, each sampled ``samples_per_prompt`` times.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from detox_exp.training.faults import LoopDebug


@dataclass
class ScoreSettings:
    """``ppo.score``: how the reward model's scores become the sequence reward."""

    scale: float = 1.0  # multiply the scores
    normalize: bool = False  # running mean / std normalisation of the scores
    clip: float | None = None  # clip the scores to [-clip, clip] (null: off)


@dataclass
class PPOSettings:
    """Every ``ppo.*`` setting but the optimizer and the KL controller (built objects)."""

    steps: int = 100  # PPO steps (one rollout batch + its optimisation each)
    batch_size: int = 32  # SAMPLES per rollout (global, over all processes)
    mini_batch_size: int = 8  # samples per optimiser step (divides batch_size)
    gradient_accumulation_steps: int = 1  # micro-batches per mini-batch (divides it)
    ppo_epochs: int = 4  # passes over the rollout batch
    # k samples of each prompt (a group). The encoder runs once per prompt and its output is
    # shared by the k decoders in every pass; batch sizes must be multiples of k.
    samples_per_prompt: int = 1
    # A registered advantage estimator (detox_exp/ppo/advantages.py, docs/design.md): gae (PPO with
    # a value head) or critic-free from the group's k sequence rewards (rloo, grpo, dr_grpo:
    # no value head, no value loss; they need samples_per_prompt >= 2).
    advantage_estimator: str = "gae"
    # How token losses become the minibatch's loss, a registered mode with verl's names:
    # token-mean (every token the same weight), seq-mean-token-mean (GRPO),
    # seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO: sum / (sequences x
    # max_new_tokens)). A sum over the whole minibatch divided by its global count, across
    # micro-batches and processes.
    loss_agg_mode: str = "token-mean"
    gamma: float = 1.0  # discount (gae)
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float = 0.2  # value clip (gae)
    vf_coef: float = 0.1  # value loss weight (gae)
    ent_coef: float = 0.0  # entropy bonus weight
    max_grad_norm: float | None = 1.0  # null: no clipping
    target_approx_kl: float | None = None  # stop the epochs early past this approx-KL
    whiten_advantages: bool = True  # whiten advantages over the batch
    group_eps: float = 1e-6  # grpo: (score - group mean) / (group std + group_eps)
    # The KL(policy || reference) penalty, chosen by its GRADIENT (detox_exp/kl.py,
    # docs/kl.md). kl_estimator: the per-token KL in the REWARD (detached, -kl_coef * KL_t).
    # k1 (log p - log q): its expected policy gradient is exactly kl_coef * grad KL(pi || ref),
    # so PPO maximises E[score] - kl_coef * KL; per token it can be negative, that is fine.
    # k3 / k2 nearly cancel near the reference (the policy drifts); full has no gradient for
    # the sampled token. Kept for ablations only.
    kl_estimator: str = "k1"
    # What objective/kl logs and the adaptive controller reads: k3 (unbiased, never negative
    # per token) or full (exact over the vocabulary, needs the logits).
    kl_log_estimator: str = "k3"
    # A KL term in the LOSS with its gradient flowing (GRPO-style): kl_loss_coef x the
    # loss_agg_mode aggregate of kl_loss_estimator per token. k3: expected gradient
    # grad KL(ref || pi) (covers the reference); k2: grad KL(pi || ref) (the divergence of k1
    # in the reward); full: the exact next-token KL(pi || ref) at every visited position.
    # 0 turns it off; it adds to the reward's penalty (ppo.kl_controller.kl_coef=0 to use the
    # loss term alone).
    kl_loss_coef: float = 0.0
    kl_loss_estimator: str = "k3"
    score: ScoreSettings = field(default_factory=ScoreSettings)
    # Value head on the decoder's last hidden state; true: a second copy of the base network
    # (with its own LoRA) computes values instead of sharing the policy's trunk (gae).
    separate_value_model: bool = False
    # Samples per no-grad forward pass (old log-probs, values, reference); null: the whole
    # batch at once (fastest); lower it if the rollout's logits do not fit in memory.
    forward_batch_size: int | None = None
    # NaN / inf in scores, rewards, advantages, the loss or the gradient (checked before every
    # optimizer step): error (stop with exit 3, naming the last good checkpoint) or skip (drop
    # the whole batch: weights, optimizer state and score statistics go back to where they
    # were before it; counted in ppo/skipped_batches). With skip, the run stops after
    # max_consecutive_skips dropped batches in a row. (precision=fp16's loss scaler skips
    # inf / NaN gradient steps itself and lowers its scale: that is not counted here.)
    on_nonfinite: str = "error"
    max_consecutive_skips: int = 3
    sample_table_every: int = 10  # W&B table of sample responses every N steps (0: never)
    num_table_samples: int = 4
    save_dir: str | None = "policy"  # where the trained policy is saved (null: not saved)
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (the top-level precision sets it)
    debug: LoopDebug = field(default_factory=LoopDebug)  # test-only fault injection

    @property
    def uses_critic(self) -> bool:
        """Whether the advantage estimator needs a value head (its registry entry says)."""
        from detox_exp.ppo.advantages import ADVANTAGE_ESTIMATORS  # torch: not at import

        return ADVANTAGE_ESTIMATORS[self.advantage_estimator].needs_critic


NESTED = {"score": ScoreSettings, "debug": LoopDebug}


def schema_node() -> dict:
    """The ``ppo_schema`` config node: every setting at its default. Registered as plain
    (untyped) values, so that a wrong type reaches :mod:`detox_exp.ppo.checks` and becomes
    a one-line error naming the key, rather than an OmegaConf validation trace."""
    return dataclasses.asdict(PPOSettings())


# At the root of the config tree, not in the ``ppo`` group: a group's configs are options
# that ``ppo=...`` selects and ``--help`` lists; this node is only a part of ppo/default.yaml.
SCHEMA_NODE = "ppo_schema"
ConfigStore.instance().store(name=SCHEMA_NODE, node=schema_node())
