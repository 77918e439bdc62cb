"""What a run saves is what it trained: the bf16 merge, non-finite gradients (skip restores
the pre-batch state), gradient accumulation."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForSeq2SeqLM

from detox_exp import metric_names as M
from detox_exp.errors import TrainingError
from detox_exp.generation import pad_queries, sample_responses
from detox_exp.models import load_policy
from detox_exp.reward.scorer import Scores
from detox_exp.training.policy import ActorCritic
from detox_exp.training.saving import merged_model
from tests.helpers.trainers import (
    CharSumReward,
    ContainsReward,
    assert_grads_close,
    make_trainer,
    one_step_on_unequal_lengths,
    record_step_grads,
)


def lora_updates(policy: ActorCritic) -> dict[str, torch.Tensor]:
    """Each LoRA-wrapped matrix's update B @ A * scaling, by the base weight's name."""
    updates = {}
    for name, module in policy.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            key = name.split("base_model.model.", 1)[-1] + ".weight"
            updates[key] = (b.float() @ a.float() * module.scaling["default"]).detach()
    return updates


def test_bf16_merge_keeps_the_lora_update(tiny_t5: Path, tmp_path: Path) -> None:
    """PPO in bf16 with bf16 base weights, then the merge: the merged weights' change from
    the fp32 checkpoint is the adapter's update (to 1%), and the merged logits are the
    trained policy's (fp32 compute) up to bf16 round-off of the base weights."""
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    model = load_policy(str(tiny_t5), lora=lora, seed=0, torch_dtype=torch.bfloat16)
    trainer = make_trainer(
        tiny_t5,
        tmp_path,
        ContainsReward("the"),
        model=model,
        precision="bf16",
        steps=3,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
    )
    trainer.train()
    merged = merged_model(trainer.policy, {"name_or_path": str(tiny_t5)})
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    assert merged.dtype == base.dtype == torch.float32  # the checkpoint's dtype
    merged_w, base_w = merged.state_dict(), base.state_dict()
    updates = lora_updates(trainer.policy)
    assert len(updates) == 12  # q, v: 2 encoder self-, 2 decoder self- and 2 cross-attentions
    naive = copy.deepcopy(trainer.policy.model).merge_and_unload().state_dict()
    naive_errors = []
    for name, update in updates.items():
        change = merged_w[name] - base_w[name]
        assert change.abs().max() > 0, name  # every LoRA matrix moved
        rel = (change - update).norm() / update.norm()
        assert rel < 0.01, (name, rel.item())
        naive_errors.append((naive[name].float() - base_w[name] - update).norm() / update.norm())
    # the merge into the bf16 weights in memory would not pass this test
    assert min(naive_errors) > 0.01, naive_errors

    ids = torch.tensor([[5, 9, 23, 40, 7, 1]])
    dec = torch.tensor([[0, 11, 12, 13]])
    fp32_policy = copy.deepcopy(trainer.policy.model).float()
    with torch.no_grad():
        want = fp32_policy(input_ids=ids, decoder_input_ids=dec).logits
        got = merged(input_ids=ids, decoder_input_ids=dec).logits
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2**-7 * scale, ((got - want).abs().max(), scale)


def _step_state(trainer) -> tuple[list[torch.Tensor], dict]:
    params = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    return params, copy.deepcopy(trainer.optimizer.state_dict())


def _assert_same_state(a, b) -> None:
    for x, y in zip(a[0], b[0], strict=True):
        assert torch.equal(x, y)
    for key, state in a[1]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[1]["state"][key][name]))


def test_nan_gradient_mid_batch_is_undone_with_skip(tiny_t5: Path, tmp_path: Path) -> None:
    """A NaN gradient in the second minibatch of step 2: the batch is dropped and the
    weights and the optimizer state are those after step 1, although one minibatch update
    of step 2 had already been applied; training goes on afterwards."""
    trainer = make_trainer(
        tiny_t5,
        tmp_path,
        ContainsReward("the"),
        on_nonfinite="skip",
        debug={"nan_grad_at_step": 2},
        steps=3,
    )
    trainer.train_step()
    after_one = _step_state(trainer)
    metrics = trainer.train_step()
    assert metrics[M.SKIPPED_BATCHES] == 1 and M.REWARD_MEAN not in metrics
    _assert_same_state(after_one, _step_state(trainer))
    assert all(torch.isfinite(p).all() for p in trainer.policy.trainable_parameters())
    trainer.train_step()  # and the next batch trains
    assert not torch.equal(after_one[0][0], trainer.policy.trainable_parameters()[0])


def test_nan_gradient_stops_the_run_with_error(tiny_t5: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_t5, tmp_path, ContainsReward("the"), debug={"nan_grad_at_step": 1})
    before = _step_state(trainer)
    with pytest.raises(TrainingError, match="gradients contain NaN or inf"):
        trainer.train_step()
    # the first minibatch's update was applied; the NaN one never reached optimizer.step
    assert all(torch.isfinite(p).all() for p in trainer.policy.trainable_parameters())
    assert not torch.equal(before[0][0], trainer.policy.trainable_parameters()[0])


class NaNReward:
    def score(self, texts: list[str]) -> Scores:
        nan = torch.full((len(texts),), float("nan"))
        return Scores(reward=nan, toxicity=torch.zeros(len(texts)))


def test_consecutive_skips_stop_the_run(tiny_t5: Path, tmp_path: Path) -> None:
    trainer = make_trainer(
        tiny_t5, tmp_path, NaNReward(), on_nonfinite="skip", max_consecutive_skips=2, steps=5
    )
    with pytest.raises(TrainingError, match="2 batches in a row"):
        trainer.train()
    assert trainer.step == 1 and trainer.guard.skipped == 2


@pytest.mark.parametrize("estimator", ["gae", "rloo"])
def test_accumulation_of_two_is_one_step(tiny_t5: Path, tmp_path: Path, estimator: str) -> None:
    """One optimizer step on a minibatch with unequal response lengths, in one pass or in
    two micro-batches: one Adam step on the same gradient (value head included for gae),
    to fp32 round-off (GRAD_TOL)."""
    k = 1 if estimator == "gae" else 2
    runs = []
    for accum in (1, 2):
        trainer = make_trainer(
            tiny_t5,
            tmp_path,
            CharSumReward(),
            advantage_estimator=estimator,
            samples_per_prompt=k,
            batch_size=8,
            mini_batch_size=8,
            gradient_accumulation_steps=accum,
            ppo_epochs=1,
            optimizer=partial(torch.optim.Adam, lr=1e-3),
        )
        grads = record_step_grads(trainer.optimizer)
        one_step_on_unequal_lengths(trainer, [8, 3, 5, 1, 7, 2, 6, 4])
        runs.append(grads)
        stepped = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
        assert len(grads[0]) == len(stepped)
        assert any("lora_" not in n for n in stepped) == (estimator == "gae")  # value head
    assert len(runs[0]) == len(runs[1]) == 1
    assert_grads_close(runs[1][0], runs[0][0])


def test_processes_sample_independent_streams(tiny_t5: Path, tmp_path: Path) -> None:
    """The same prompts sampled with rank 0's and rank 1's stream differ; the same rank and
    step give the same samples again (what a resumed run relies on)."""
    trainer = make_trainer(tiny_t5, tmp_path, ContainsReward("the"))
    ids = [trainer.prompts[i]["input_ids"] for i in range(8)]
    query, mask = pad_queries(ids, trainer.tokenizer.pad_token_id, trainer.device)
    responses = []
    for rank in (0, 1, 0):
        trainer.dist.rank = rank  # what torchrun's RANK sets
        torch.manual_seed(123)  # the global stream is the same every time: not used
        args = (trainer.policy.model, trainer.tokenizer, query, mask, trainer.generation)
        responses.append(sample_responses(*args, generator=trainer.sampling_stream())[0])
    assert torch.equal(responses[0], responses[2])
    assert not torch.equal(responses[0], responses[1])
