"""Property tests of the PPO trainer on a tiny random-init T5 (LoRA on q, v)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from detox_exp import metric_names as M
from detox_exp.generation import decoder_inputs, pad_queries
from detox_exp.models import load_policy, load_tokenizer
from detox_exp.reward.scorer import Scores
from tests.helpers.trainers import ContainsReward, make_trainer


def test_step0_kl_is_zero_and_first_ratio_is_one(tiny_t5: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_t5, tmp_path, ContainsReward("the"))
    roll = trainer.rollout(trainer.next_batch())
    # fresh adapter (LoRA B = 0): policy and reference are the same function, exactly
    assert torch.equal(roll.logprobs, roll.ref_logprobs)
    assert torch.count_nonzero(roll.kl) == 0
    idx = torch.arange(4)
    _, stats = trainer._loss(roll, idx)
    assert stats[M.RATIO_MEAN] == pytest.approx(1.0, abs=1e-6)
    assert stats[M.CLIPFRAC] == 0.0


def test_logprobs_do_not_depend_on_batch_neighbours(tiny_t5: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_t5, tmp_path, ContainsReward("the"))
    tok = trainer.tokenizer
    prompts = ["short prompt", "a much longer prompt " * 8, "medium length prompt here"]
    responses = [[5, 6, 7, 1, 0, 0], [8, 1, 0, 0, 0, 0], [9, 10, 11, 12, 13, 1]]
    query, qmask = pad_queries(tok(prompts)["input_ids"], tok.pad_token_id, torch.device("cpu"))
    response = torch.tensor(responses)
    mask = (torch.cumsum((response == 1).long(), 1) - (response == 1).long() == 0).float()
    batched = trainer._forward(query, qmask, response)
    for row in range(3):
        width = int(mask[row].sum())
        qw = int(qmask[row].sum())
        alone = trainer._forward(
            query[row : row + 1, :qw],
            qmask[row : row + 1, :qw],
            response[row : row + 1, :width],
        )
        torch.testing.assert_close(
            alone["logprobs"][0], batched["logprobs"][row, :width], rtol=0, atol=1e-5
        )
        torch.testing.assert_close(
            alone["values"][0], batched["values"][row, :width], rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("estimator", ["k3", "full"])
def test_logged_kl_is_the_unclamped_estimate_and_not_negative(
    tiny_t5: Path, tmp_path: Path, estimator: str
) -> None:
    """The logged per-token KL (``kl_log_estimator``) equals the estimate computed here
    without any clamp, from the rollout's log-probs (k3) or the full distributions (full),
    and that unclamped estimate is >= 0 on real rollouts of a policy that moved."""
    trainer = make_trainer(tiny_t5, tmp_path, ContainsReward("the"), kl_log_estimator=estimator)
    for step in range(3):
        roll = trainer.rollout(trainer.next_batch())
        if estimator == "k3":
            log_r = (roll.ref_logprobs - roll.logprobs).double()
            unclamped = torch.exp(log_r) - 1 - log_r
        else:
            out = trainer._forward(roll.query, roll.query_mask, roll.response, keep_logits=True)
            logp = torch.log_softmax(out["logits"].double(), -1)
            logq = torch.log_softmax(out["ref_logits"].double(), -1)
            unclamped = (logp.exp() * (logp - logq)).sum(-1)
        unclamped = unclamped * roll.mask
        torch.testing.assert_close(roll.kl.double(), unclamped, rtol=1e-5, atol=1e-7)
        assert (unclamped >= -1e-7).all()
        if step > 0:
            assert unclamped.sum() > 0  # the policy moved: a real, positive KL
        trainer.optimize(roll)


class RecordingScorer:
    """Passes texts on to ``inner`` and keeps what it was given."""

    def __init__(self, inner) -> None:
        self.inner, self.received = inner, []

    def score(self, texts: list[str]) -> Scores:
        self.received.append(list(texts))
        return self.inner.score(texts)


def test_the_scorer_receives_the_responses_only(tiny_t5: Path, tmp_path: Path) -> None:
    """In PPO and in evaluation the reward model gets the decoded sampled tokens, without
    the prompt."""
    from detox_exp.evaluation.evaluator import Evaluator
    from detox_exp.generation import decode

    scorer = RecordingScorer(ContainsReward("the"))
    trainer = make_trainer(tiny_t5, tmp_path, scorer)
    indices = trainer.next_batch()
    roll = trainer.rollout(indices)
    (texts,) = scorer.received
    assert texts == decode(trainer.tokenizer, roll.response)
    for j, text in enumerate(texts):
        assert trainer.prompts[indices[j]]["prompt"] not in text

    prompts = trainer.prompts.select(range(4))
    data = prompts.add_column("id", [str(i) for i in range(4)])
    data = data.add_column("reference", ["a summary"] * 4)
    scorer.received.clear()
    Evaluator(num_prompts=4, batch_size=2, device="cpu").evaluate(
        trainer.policy.model,
        trainer.tokenizer,
        scorer,
        data,
        "before",
        tmp_path,
        trainer.generation,
    )
    (texts,) = scorer.received
    rows = [
        json.loads(x) for x in (tmp_path / "eval/before/generations.jsonl").read_text().splitlines()
    ]
    assert texts == [row["response"] for row in rows] and len(texts) == 4
    for text, prompt in zip(texts, prompts["prompt"], strict=True):
        assert prompt not in text


def test_evaluation_samples_from_its_own_seeded_stream(tiny_t5: Path, tmp_path: Path) -> None:
    """The evaluator draws from a generator seeded with eval.seed, the one RNG policy of every
    sampler: the same responses whatever torch's global stream holds, which it leaves alone,
    and the responses sample_responses gives with that seeded generator."""
    from detox_exp.evaluation.evaluator import Evaluator
    from detox_exp.generation import decode, sample_responses

    trainer = make_trainer(tiny_t5, tmp_path, ContainsReward("the"))
    data = trainer.prompts.select(range(4))
    data = data.add_column("id", [str(i) for i in range(4)]).add_column("reference", ["a"] * 4)
    evaluator = Evaluator(num_prompts=4, batch_size=4, device="cpu", seed=7)
    model, tok, gen = trainer.policy.model, trainer.tokenizer, trainer.generation

    def responses(global_seed: int) -> list[str]:
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        out = tmp_path / str(global_seed)
        evaluator.evaluate(model, tok, ContainsReward("the"), data, "before", out, gen)
        assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
        lines = (out / "eval/before/generations.jsonl").read_text().splitlines()
        return [json.loads(x)["response"] for x in lines]

    first = responses(0)
    assert responses(1) == first
    ids, mask = pad_queries(data["input_ids"], tok.pad_token_id, "cpu")
    stream = torch.Generator().manual_seed(7)
    model.eval()
    with torch.no_grad():
        direct = decode(tok, sample_responses(model, tok, ids, mask, gen, generator=stream)[0])
    assert direct == first


def test_decoder_inputs_start_with_start_token() -> None:
    response = torch.tensor([[5, 6, 1, 0]])
    assert decoder_inputs(response, 0).tolist() == [[0, 5, 6, 1]]


@pytest.mark.slow
def test_toy_task_is_learned(tiny_t5: Path, tmp_path: Path) -> None:
    """Reward 1 when the response contains a chosen token: learned within 50 steps (the last
    10 steps average >= 0.7 by step 50; the loop stops once they do).

    LoRA goes on every linear layer here: with q, v only, a random-init 32-wide T5 can barely
    move its output distribution, and whether it learns at all varies with the seed (5 of 8
    seeds under one build, 2 of 8 under another); with all layers it learns for each seed tried.
    """
    scorer = ContainsReward("")
    trainer = make_trainer(
        tiny_t5,
        tmp_path,
        scorer,
        lora_modules=("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
        steps=50,
        ppo_epochs=4,
        optimizer=partial(torch.optim.AdamW, lr=1e-2),
    )
    # target: a token the initial policy emits in a minority of its responses
    with torch.no_grad():
        roll = trainer.rollout(list(range(40)) * 2)
    counts = torch.zeros(len(trainer.tokenizer))
    for row, mask in zip(roll.response, roll.mask, strict=True):
        counts[row[mask.bool()].unique()] += 1
    rates = {}
    for token_id in counts.nonzero().flatten().tolist():
        target = trainer.tokenizer.decode([token_id])
        if len(target.strip()) >= 3:
            rates[target] = sum(target in text for text in roll.texts) / len(roll.texts)
    scorer.target = min(rates, key=lambda t: abs(rates[t] - 0.15))
    assert 0.0 < rates[scorer.target] < 0.4
    rewards: list[float] = []  # step by step, until the last 10 steps average 0.7
    while len(rewards) < 50 and (len(rewards) < 10 or sum(rewards[-10:]) / 10 < 0.7):
        rewards.append(round(trainer.train_step()[M.REWARD_MEAN], 2))
    assert sum(rewards[:5]) / 5 <= 0.25, rewards
    assert sum(rewards[-10:]) / 10 >= 0.7, rewards


def test_trains_only_lora_and_value_head(tiny_t5: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_t5, tmp_path, ContainsReward("the"))
    names = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("value_head") for n in names)
    base_before = {
        n: p.clone()
        for n, p in trainer.policy.named_parameters()
        if "lora_" not in n and not n.startswith("value_head")
    }
    trainer.train_step()
    for name, param in trainer.policy.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), name


def test_full_finetune_uses_frozen_reference(tiny_t5: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_t5))
    model = load_policy(str(tiny_t5), full_finetune=True)
    trainer = make_trainer(
        tiny_t5,
        tmp_path,
        ContainsReward("the"),
        model=model,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
    )
    assert trainer.policy.ref_model is not None
    assert not any(p.requires_grad for p in trainer.policy.ref_model.parameters())
    trainer.train_step()
    roll = trainer.rollout(trainer.next_batch())
    assert not torch.equal(roll.logprobs, roll.ref_logprobs)  # policy moved, ref did not
    assert tokenizer.pad_token_id == 0


def test_separate_value_model(tiny_t5: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_t5, tmp_path, ContainsReward("the"), separate_value_model=True)
    assert trainer.policy.value_model is not None
    metrics = trainer.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
