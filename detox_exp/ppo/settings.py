"""The PPO trainer's settings (``ppo.*``): one typed schema that owns the defaults and the
checks. ``conf/ppo/*.yaml`` sets them, :class:`~detox_exp.ppo.trainer.PPOTrainer` takes them
as keyword arguments, and the pipeline checks a config node against this schema before any
stage runs (:func:`detox_exp.ppo.checks.check_ppo_config`).

Batch sizes count SAMPLES: a rollout of ``batch_size`` samples holds
``batch_size / samples_per_prompt`` prompts, each sampled ``samples_per_prompt`` times.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from detox_exp.ppo.checks import check_lr, check_settings
from detox_exp.schema import check_fields


@dataclass
class PPOSettings:
    """Every ``ppo.*`` setting but the optimizer and the KL controller (built objects)."""

    steps: int = 100  # PPO steps (one rollout batch + its optimisation each)
    batch_size: int = 32  # samples per rollout (global, over all processes)
    mini_batch_size: int = 8  # samples per optimiser step (divides batch_size)
    gradient_accumulation_steps: int = 1  # micro-batches per mini-batch
    ppo_epochs: int = 4  # passes over the rollout batch
    samples_per_prompt: int = 1  # k: samples per prompt (a group); batch sizes are multiples
    advantage_estimator: str = "gae"  # gae (value head) | rloo | grpo | dr_grpo (no critic)
    loss_agg_mode: str = "token-mean"  # how token losses become one number (verl's names)
    gamma: float = 1.0  # discount (gae)
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float = 0.2  # value clip (gae)
    vf_coef: float = 0.1  # value loss weight (gae)
    ent_coef: float = 0.0  # entropy bonus weight
    max_grad_norm: float | None = 1.0  # null: no clipping
    target_approx_kl: float | None = None  # stop the epochs early past this approx-KL
    whiten_advantages: bool = True  # whiten advantages over the batch
    group_eps: float = 1e-6  # grpo: advantage = (s - mean) / (std + group_eps)
    kl_estimator: str = "k1"  # per-token KL in the REWARD (detached); k1: exact gradient
    kl_log_estimator: str = "k3"  # logged objective/kl, read by the controller (>= 0)
    kl_loss_coef: float = 0.0  # weight of a KL term in the LOSS (gradient flowing), 0: off
    kl_loss_estimator: str = "k3"  # k3: follows grad KL(ref || pi); k2: grad KL(pi || ref)
    score: dict[str, Any] | None = field(default_factory=dict)  # scale, normalize, clip
    separate_value_model: bool = False  # values from a second copy of the network (gae)
    forward_batch_size: int | None = None  # samples per no-grad rollout pass; null: all
    debug_param_digest: bool = False  # write a hash of the weights per process and step
    on_nonfinite: str = "error"  # NaN / inf: error (stop) | skip (drop the batch)
    max_consecutive_skips: int = 3  # skip: stop after this many dropped batches in a row
    debug_nan_at_step: int | None = None  # fault injection: NaN scores at this step
    debug_nan_grad_at_step: int | None = None  # fault injection: a NaN gradient mid-batch
    debug_kill_after_step: int | None = None  # fault injection: SIGKILL after this step
    sample_table_every: int = 10  # W&B table of sample responses every N steps (0: never)
    num_table_samples: int = 4
    save_dir: str | None = "policy"  # where the trained policy is saved (null: not saved)
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (the top-level precision sets it)

    def __post_init__(self) -> None:
        self.score = dict(self.score or {})
        check_settings(self)

    @property
    def uses_critic(self) -> bool:
        """Whether there is a value head (only GAE needs one)."""
        return self.advantage_estimator == "gae"

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> PPOSettings:
        """Settings from keyword arguments; an unknown key is a one-line config error."""
        check_fields(cls, values, "ppo", "unknown PPO setting", "see conf/ppo/default.yaml")
        return cls(**values)


def check_ppo_config(ppo: Mapping[str, Any]) -> PPOSettings:
    """Check a ``ppo`` config node against the schema (the schema's defaults fill in what it
    leaves out), including ``ppo.optimizer.lr``; returns the settings."""
    built = {"_target_", "_partial_", "optimizer", "kl_controller"}
    settings = PPOSettings.from_mapping({k: ppo[k] for k in ppo if k not in built})
    lr = (ppo.get("optimizer") or {}).get("lr")
    if lr is not None:
        check_lr(lr)
    return settings


# Registered so that Hydra users can compose against the schema (``ppo/schema``).
ConfigStore.instance().store(group="ppo", name="schema", node=PPOSettings)
