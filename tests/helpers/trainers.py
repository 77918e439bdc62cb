"""A PPO trainer on the tiny T5 for property tests, a toy reward, and the gradients an
optimizer steps on (what two computation orders of one update must agree on)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig

from detox_exp.guided.scorer import PrefixScorer
from detox_exp.guided.trainer import GuidedTrainer
from detox_exp.kl_control import FixedKLController
from detox_exp.models import load_policy, load_tokenizer
from detox_exp.ppo.trainer import PPOTrainer
from detox_exp.reward.scorer import Scores
from detox_exp.tracking import Tracker


class ContainsReward:
    """Toy reward: 1 when the response contains ``target``, else 0 (toxicity = 1 - reward)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def score(self, texts: list[str]) -> Scores:
        reward = torch.tensor([float(self.target in t) for t in texts])
        return Scores(reward=reward, toxicity=1.0 - reward)


class CharSumReward:
    """Toy reward that varies between almost any two responses: the sum of the text's
    character codes mod 7, over 7 (so group baselines leave non-zero advantages)."""

    def score(self, texts: list[str]) -> Scores:
        reward = torch.tensor([sum(map(ord, t)) % 7 / 7 for t in texts])
        return Scores(reward=reward, toxicity=1.0 - reward)


def common_settings(
    tiny_t5: Path, tmp_path: Path, scorer, lora_modules: tuple = ("q", "v")
) -> dict:
    """What every method's trainer is built with here: 40 prompts, LoRA r=8, 8 new tokens
    sampled at temperature 1, AdamW lr 1e-2, fixed KL coefficient 0.05, batch 16, 3 steps."""
    tokenizer = load_tokenizer(str(tiny_t5))
    prompts = [f"Summarize: dialogue number {i} about the weather and the bank." for i in range(40)]
    ids = tokenizer(prompts)["input_ids"]
    data = Dataset.from_dict({"prompt": prompts, "input_ids": ids})
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=list(lora_modules),
        task_type="SEQ_2_SEQ_LM",
    )
    model = load_policy(str(tiny_t5), lora=lora, seed=0)
    return dict(
        model=model,
        tokenizer=tokenizer,
        scorer=scorer,
        prompts=data,
        tracker=Tracker(tmp_path),
        generation={
            "max_new_tokens": 8,
            "min_new_tokens": 0,
            "do_sample": True,
            "top_k": 0,
            "top_p": 1.0,
        },
        optimizer=partial(torch.optim.AdamW, lr=1e-2),
        kl_controller=FixedKLController(0.05),
        steps=3,
        batch_size=16,
        sample_table_every=0,
        device="cpu",
    )


def make_trainer(
    tiny_t5: Path, tmp_path: Path, scorer, lora_modules: tuple = ("q", "v"), **overrides
) -> PPOTrainer:
    """A PPO trainer (:func:`common_settings`, minibatches of 4, 2 epochs); ``overrides``
    replace any constructor argument."""
    kwargs = common_settings(tiny_t5, tmp_path, scorer, lora_modules)
    kwargs |= {"mini_batch_size": 4, "ppo_epochs": 2} | overrides
    torch.manual_seed(0)
    return PPOTrainer(**kwargs)


def guided_trainer(tiny_t5: Path, tmp_path: Path, scorer, **overrides) -> GuidedTrainer:
    """A value-guided trainer (:func:`common_settings`, 4 samples per prompt, a scorer
    fitted on 16 prompts x 4 rollouts, distilling on the teacher's samples: a test may set
    ``trainer.guide`` and step without fitting); ``overrides`` replace any constructor
    argument."""
    kwargs = common_settings(tiny_t5, tmp_path, scorer)
    kwargs |= {
        "samples_per_prompt": 4,
        "work_dir": str(tmp_path / "guided"),
        "prefix_scorer": {"rollout_prompts": 16, "rollout_samples": 4, "epochs": 1},
        "distill": {"prefixes": "teacher"},
    } | overrides
    torch.manual_seed(0)
    return GuidedTrainer(**kwargs)


def group_trainer(tiny_t5: Path, tmp_path: Path, scorer, estimator: str = "rloo", **overrides):
    """A critic-free trainer with groups of 4 samples per prompt (see make_trainer)."""
    settings = {"samples_per_prompt": 4, "whiten_advantages": False} | overrides
    return make_trainer(tiny_t5, tmp_path, scorer, advantage_estimator=estimator, **settings)


def one_step_on_unequal_lengths(trainer, lengths: list[int]):
    """A rollout whose responses are cut to ``lengths`` (the random tiny T5 rarely ends
    early), one ``optimize`` on it: (the trainable weights after it, its stats)."""
    torch.manual_seed(5)
    roll = trainer.rollout(trainer.next_batch())
    for row, keep in enumerate(lengths):
        roll.mask[row, keep:] = 0
    roll.advantages = roll.advantages * roll.mask
    stats = trainer.optimize(roll)
    return [p.detach().clone() for p in trainer.policy.trainable_parameters()], stats


def record_step_grads(optimizer: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """A list that gets, at every ``optimizer.step()``, the gradient of each parameter the
    optimizer holds (zeros where it has none), read just before the step: after clipping
    and accumulation, the exact input of the update rule."""
    steps: list[list[torch.Tensor]] = []

    def hook(opt: torch.optim.Optimizer, args, kwargs) -> None:
        steps.append(
            [
                torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for group in opt.param_groups
                for p in group["params"]
            ]
        )

    optimizer.register_step_pre_hook(hook)
    return steps


# Two computation orders of the same fp32 gradient (fused vs plain kernels, one pass vs
# micro-batches, a reused vs a fresh forward) agree to round-off, not bit for bit. A
# gradient element is a sum of ~n products (n = the rows x tokens of a minibatch times the
# inner width of the backward matmuls: here ~16 x 8 x 64 ~ 1e4). Reordering that sum moves
# it by ~sqrt(n) * 2^-24 ~ 6e-6 of the magnitude of its terms, which are of the order of the
# tensor's largest entries, not by the element itself: an element that cancels to near
# zero keeps an absolute error of the tensor's scale. So the tolerance is relative to each
# tensor's largest magnitude (GRAD_TOL of it, ~15x the estimate), plus GRAD_TOL relative.
# Comparing weights after an Adam step instead is not a round-off test: Adam's first step is
# ~lr * g / |g|, so round-off in a near-zero element moves its weight by up to lr.
GRAD_TOL = 1e-4


def assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Each pair of gradient tensors agrees to GRAD_TOL of the larger's magnitude, and
    ``want`` is not all zeros (equal zeros would test nothing)."""
    assert len(got) == len(want)
    assert any(g.abs().sum() > 0 for g in want), "all gradients are zero: nothing compared"
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        scale = max(a.abs().max().item(), b.abs().max().item())
        torch.testing.assert_close(
            a, b, rtol=GRAD_TOL, atol=GRAD_TOL * scale, msg=lambda m, i=i: f"tensor {i}: {m}"
        )


def random_scorer(vocab: int, d: int, seed: int = 0, hidden_size: int = 0) -> PrefixScorer:
    """A prefix scorer over ``vocab`` tokens of width ``d`` with random weights (6 atoms)."""
    g = torch.Generator().manual_seed(seed)
    scorer = PrefixScorer(
        torch.randn(vocab, d, generator=g), torch.linspace(-3, 0, 6), torch.ones(6) / 6, hidden_size
    )
    with torch.no_grad():
        for p in scorer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return scorer.eval()
