"""k samples per prompt with the encoder run once per prompt: equal to the per-sample path
(log-probs, LoRA gradients, sampled tokens), whole groups everywhere, group advantages."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from detox_exp import metric_names as M
from detox_exp.fast import SWITCHES
from detox_exp.generation import decoder_inputs, pad_queries, sample_responses
from detox_exp.kl_control import FixedKLController
from detox_exp.models import load_tokenizer
from detox_exp.ppo import core
from detox_exp.reward.scorer import Scores
from detox_exp.seq2seq import base_model, cross_attention_projections
from detox_exp.training.policy import ActorCritic
from tests.helpers.run import trained_lora
from tests.helpers.trainers import (
    CharSumReward,
    ContainsReward,
    assert_grads_close,
    group_trainer,
    make_trainer,
    one_step_on_unequal_lengths,
    record_step_grads,
)

K = 3


class ConstantReward:
    """Every response scores the same: every group's k scores are equal."""

    def score(self, texts: list[str]) -> Scores:
        return Scores(reward=torch.full((len(texts),), 0.5), toxicity=torch.zeros(len(texts)))


def _batch(tiny_t5: Path):
    from transformers import AutoModelForSeq2SeqLM

    tokenizer = load_tokenizer(str(tiny_t5))
    model = trained_lora(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5))  # LoRA in both stacks
    prompts = ["short prompt", "a much longer prompt about the bank " * 4, "medium prompt here"]
    query, qmask = pad_queries(tokenizer(prompts)["input_ids"], tokenizer.pad_token_id, "cpu")
    torch.manual_seed(1)
    response = torch.randint(3, 300, (len(prompts) * K, 7))
    response[:, -1] = tokenizer.eos_token_id
    return model, tokenizer, query, qmask, response


def test_shared_encoder_equals_per_sample_path(tiny_t5: Path) -> None:
    model, _, query, qmask, response = _batch(tiny_t5)
    policy = ActorCritic(model).double().eval()
    dec = decoder_inputs(response, policy.config.decoder_start_token_id)
    lora = [p for n, p in policy.named_parameters() if "lora_" in n]
    assert any("encoder" in n for n, _ in policy.named_parameters() if "lora_" in n)

    def run(shared: bool):
        policy.zero_grad()
        if shared:
            out = policy(query, qmask, dec, samples_per_prompt=K)
            ref = policy.reference_logits(query, qmask, dec, samples_per_prompt=K)
        else:  # the plain path: every sample with its own copy of the prompt
            q, m = query.repeat_interleave(K, 0), qmask.repeat_interleave(K, 0)
            out, ref = policy(q, m, dec), policy.reference_logits(q, m, dec)
        logprobs = core.logprobs_from_logits(out.logits, response)
        (logprobs.sum() + out.values.sum()).backward()
        return logprobs.detach(), out.values.detach(), ref, [p.grad.clone() for p in lora]

    shared, plain = run(True), run(False)
    for a, b in zip(shared[:3], plain[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for a, b in zip(shared[3], plain[3]):  # the encoder's LoRA gets the k samples' sum
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in shared[3])


def test_cross_attention_projects_once_per_prompt(tiny_t5: Path) -> None:
    """Every teacher-forced pass projects the cross-attention keys / values of P prompts, not
    of P * k samples (the equality with the per-sample path is the test above)."""
    model, _, query, qmask, response = _batch(tiny_t5)
    policy = ActorCritic(model).eval()
    projections = cross_attention_projections(policy.model)
    assert len(projections) == 2 * policy.config.num_decoder_layers
    assert sum(hasattr(p, "lora_A") for p in projections) == policy.config.num_decoder_layers
    rows: list[int] = []
    # what each projection itself computes (prepend: before the expansion back to P * k rows)
    handles = [
        p.register_forward_hook(lambda m, a, out: rows.append(out.shape[0]), prepend=True)
        for p in projections
    ]
    dec = decoder_inputs(response, policy.config.decoder_start_token_id)
    try:
        out = policy(query, qmask, dec, samples_per_prompt=K)
        policy.reference_logits(query, qmask, dec, samples_per_prompt=K)
    finally:
        for handle in handles:
            handle.remove()
    assert rows == [len(query)] * (2 * len(projections)), rows
    assert out.logits.shape[0] == len(query) * K
    assert not projections[0]._forward_pre_hooks and not projections[0]._forward_hooks


@pytest.mark.parametrize("step_decoder", [True, False])
def test_group_sampling_equals_expanded_prompts(tiny_t5: Path, step_decoder: bool) -> None:
    model, tokenizer, query, qmask, _ = _batch(tiny_t5)
    gen = {"max_new_tokens": 10, "do_sample": True, "top_k": 0, "top_p": 1.0}
    torch.manual_seed(3)
    grouped = sample_responses(
        model, tokenizer, query, qmask, gen, step_decoder=step_decoder, samples_per_prompt=K
    )
    torch.manual_seed(3)
    plain = sample_responses(
        model,
        tokenizer,
        query.repeat_interleave(K, 0),
        qmask.repeat_interleave(K, 0),
        gen,
        step_decoder=step_decoder,
    )
    assert torch.equal(grouped[0], plain[0]) and torch.equal(grouped[1], plain[1])
    assert len({tuple(r.tolist()) for r in grouped[0][:K]}) > 1  # k different samples


def test_encoder_runs_once_per_prompt(tiny_t5: Path, tmp_path: Path) -> None:
    trainer = group_trainer(
        tiny_t5,
        tmp_path,
        ContainsReward("the"),
        batch_size=16,
        mini_batch_size=8,
        ppo_epochs=2,
    )
    rows: list[int] = []
    encoder = base_model(trainer.policy.model).get_encoder()
    handle = encoder.register_forward_hook(
        lambda m, args, kw, out: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        trainer.train_step()
    finally:
        handle.remove()
    prompts = 16 // 4
    # rollout: policy encoder (shared by generation and the old log-probs) + reference encoder;
    # then one encoder pass per prompt per epoch (2 minibatches of 2 prompts each)
    assert sum(rows) == prompts * (2 + 2) and max(rows) <= prompts, rows
    assert trainer.policy.value_head is None  # critic-free: no value head at all


def test_identical_scores_give_exactly_zero_advantages(tiny_t5: Path, tmp_path: Path) -> None:
    trainer = group_trainer(
        tiny_t5,
        tmp_path,
        ConstantReward(),
        "grpo",
    )
    # a fresh adapter (B = 0): policy = reference, so the k1 penalty is exactly 0 too
    roll = trainer.rollout(trainer.next_batch())
    assert torch.count_nonzero(roll.advantages) == 0
    assert roll.query.shape[0] == 16 // 4 and roll.response.shape[0] == 16
    metrics = trainer.train_step()
    assert metrics[M.GROUP_ZERO_STD] == 1.0 and metrics[M.GROUP_REWARD_STD] == 0.0
    assert M.LOSS_VALUE not in metrics and M.VAR_EXPLAINED not in metrics


def test_minibatches_hold_whole_groups(tiny_t5: Path, tmp_path: Path) -> None:
    trainer = group_trainer(
        tiny_t5,
        tmp_path,
        ContainsReward("the"),
        mini_batch_size=8,
        gradient_accumulation_steps=2,
    )
    roll = trainer.rollout(trainer.next_batch())
    seen = []
    original = roll.minibatch

    def spy(groups: torch.Tensor):
        seen.append(groups.tolist())
        mb = original(groups)
        # every group's k rows, in order, next to its one prompt row
        assert mb.response.shape[0] == 4 * mb.query.shape[0]
        torch.testing.assert_close(
            mb.response, roll.response[roll.rows(groups)][:, : mb.response.shape[1]]
        )
        return mb

    roll.minibatch = spy
    trainer.optimize(roll)
    assert all(len(g) == 1 for g in seen)  # micro-batches of 4 samples = 1 group
    assert sorted(g for groups in seen[:4] for g in groups) == [0, 1, 2, 3]  # one epoch


def test_experience_rows_of_groups() -> None:
    from tests.helpers.experience import experience_of

    exp = experience_of(query_lengths=[40, 10, 1, 1], response_lengths=[30, 3, 17, 1])
    exp.samples_per_prompt = 2  # two prompts, two samples each
    exp.query, exp.query_mask = exp.query[:2], exp.query_mask[:2]
    assert exp.rows(torch.tensor([1, 0])).tolist() == [2, 3, 0, 1]
    mb = exp.minibatch(torch.tensor([1]))
    assert mb.query.shape == (1, SWITCHES.width_multiple) and mb.response.shape == (
        2,
        2 * SWITCHES.width_multiple,
    )
    assert torch.equal(mb.logprobs, exp.logprobs[[2, 3]])


def test_ppo_steps_with_zero_score_do_not_grow_the_kl(tiny_t5: Path, tmp_path: Path) -> None:
    """Reward 0: only the KL penalty acts, so the exact KL to the reference must fall. With
    k3 in the reward (the estimator that is right for the value, wrong for the gradient) the
    same run ends further from the reference."""
    from detox_exp.evaluation.evaluator import sequence_kl

    def run(estimator: str, kl_estimator: str) -> tuple[float, float]:
        extra = {} if estimator == "gae" else {"samples_per_prompt": 4, "whiten_advantages": False}
        trainer = make_trainer(
            tiny_t5,
            tmp_path,
            ConstantReward(),
            advantage_estimator=estimator,
            kl_estimator=kl_estimator,
            kl_controller=FixedKLController(1.0),
            optimizer=partial(torch.optim.AdamW, lr=1e-3),
            steps=8,
            **extra,
        )
        with torch.no_grad():  # start away from the reference: random LoRA B matrices
            for name, param in trainer.policy.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.1)

        def exact_kl() -> float:  # exact per-token KL summed over sampled responses
            torch.manual_seed(0)
            ids = [trainer.prompts[i]["input_ids"] for i in range(40)]
            query, qmask = pad_queries(ids, 0, torch.device("cpu"))
            model, tok = trainer.policy.model, trainer.tokenizer
            response, mask = sample_responses(
                model, tok, query, qmask, trainer.generation, samples_per_prompt=4
            )
            query, qmask = query.repeat_interleave(4, 0), qmask.repeat_interleave(4, 0)
            with torch.no_grad():
                return float(sequence_kl(model, query, qmask, response, mask).mean())

        before = exact_kl()
        trainer.train()
        return before, exact_kl()

    results = {}
    for estimator in ("gae", "rloo"):
        before, after = results[estimator] = run(estimator, "k1")
        assert before > 0.5 and after < 0.85 * before, (estimator, before, after)
    before_k3, after_k3 = run("gae", "k3")
    assert before_k3 == results["gae"][0]  # the same start
    assert after_k3 > results["gae"][1], (after_k3, results["gae"])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_gradient_accumulation_gives_the_same_update(
    tiny_t5: Path, tmp_path: Path, mode: str
) -> None:
    """One minibatch of 4 groups in one pass or in micro-batches of 1 group: the same loss
    (a sum divided by the whole minibatch's count), so one optimizer step on the same
    gradient (to fp32 round-off, see GRAD_TOL)."""
    runs = []
    for accum in (1, 4):
        trainer = group_trainer(
            tiny_t5,
            tmp_path,
            CharSumReward(),
            mini_batch_size=16,
            gradient_accumulation_steps=accum,
            ppo_epochs=1,
            loss_agg_mode=mode,
            max_grad_norm=None,
            optimizer=partial(torch.optim.SGD, lr=1.0),
        )
        grads = record_step_grads(trainer.optimizer)
        _, stats = one_step_on_unequal_lengths(trainer, [8, 3, 5, 1] * 4)
        runs.append((grads, stats))
    (grads_one, stats_one), (grads_parts, stats_parts) = runs
    assert len(grads_one) == len(grads_parts) == 1  # one step, however many micro-batches
    assert_grads_close(grads_parts[0], grads_one[0])
    assert stats_one[M.LOSS_POLICY] == pytest.approx(stats_parts[M.LOSS_POLICY], abs=1e-6)


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_one_update_per_batch_reuses_the_rollout_pass(
    tiny_t5: Path, tmp_path: Path, estimator: str
) -> None:
    """With one epoch of one minibatch the rollout's policy pass (with grad) serves the
    update: one policy forward fewer per step, and the same update as a fresh forward."""
    from detox_exp.fast import configure

    k = 1 if estimator == "gae" else 4
    settings = {"batch_size": 16, "mini_batch_size": 16, "ppo_epochs": 1}
    if k > 1:
        settings |= {"samples_per_prompt": k, "whiten_advantages": False}

    def step(reuse: bool):
        configure(reuse_rollout_forward=reuse)
        try:
            trainer = make_trainer(
                tiny_t5, tmp_path, CharSumReward(), advantage_estimator=estimator, **settings
            )
            calls: list[bool] = []
            handle = trainer.policy.register_forward_hook(
                lambda m, a, out: calls.append(out.logits.requires_grad)
            )
            grads = record_step_grads(trainer.optimizer)
            assert trainer.reuses_rollout_forward() == reuse
            metrics = trainer.train_step()
            handle.remove()
        finally:
            configure(reuse_rollout_forward=True)
        return calls, metrics, grads

    reused, plain = step(True), step(False)
    assert reused[0] == [True] and plain[0] == [False, True]  # policy passes: grad or not
    assert reused[1][M.RATIO_MEAN] == 1.0 and reused[1][M.APPROX_KL] == 0.0
    torch.testing.assert_close(reused[1][M.LOSS_POLICY], plain[1][M.LOSS_POLICY])
    # the same update: one optimizer step each, on the same gradient (the weights after an
    # AdamW step are no round-off test, see GRAD_TOL)
    assert len(reused[2]) == len(plain[2]) == 1
    assert_grads_close(reused[2][0], plain[2][0])
