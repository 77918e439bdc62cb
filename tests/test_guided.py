"""The value-guided method (algorithm=guided): guided decoding, the prefix scorer, the loop it
shares with PPO, and the method end to end (the math: tests/test_guidance.py)."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import pytest
import torch

from detox_exp.generation import decode, pad_queries, response_mask, sample_responses
from detox_exp.guidance import guided_logits
from detox_exp.guided.fit import ReferenceSamples
from detox_exp.guided.scorer import Guide, PrefixScorer, load_guide, save_guide
from detox_exp.guided.trainer import GuidedTrainer
from detox_exp.kl import categorical_kl
from detox_exp.ppo.trainer import PPOTrainer
from detox_exp.training.loop import TrainingLoop
from tests.helpers.decoding import prompt_batch
from tests.helpers.run import ROOT, local_overrides, run_cli
from tests.helpers.trainers import CharSumReward, guided_trainer, random_scorer


def test_the_scorer_scores_a_realised_token_as_it_scores_the_whole_vocabulary() -> None:
    """atom_logits (fitting: the realised token) and all_atom_logits (decoding: every token)
    are two paths to the same numbers; log_values in chunks equals it in one piece."""
    scorer = random_scorer(50, 8, hidden_size=16)
    h = torch.randn(7, 8, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([0, 3, 49, 7, 7, 12, 30])
    whole = scorer.all_atom_logits(h)
    torch.testing.assert_close(scorer.atom_logits(h, tokens), whole[torch.arange(7), :, tokens])
    one = scorer.log_values(h, beta=0.5)
    chunked = scorer.log_values(h, beta=0.5, chunk_elements=50 * 6 * 2)  # two rows a chunk
    # the same sums; a matmul's blocking depends on the rows, so float32 round-off (~1e-7 of
    # values of order 1) is all that may differ
    torch.testing.assert_close(chunked, one, rtol=1e-6, atol=1e-6)
    assert one.shape == (7, 50)


def test_an_untrained_scorer_guides_nothing() -> None:
    """Its initial state is the constant predictor: V(s, a) is the same for every token."""
    scorer = PrefixScorer(torch.randn(20, 4), torch.linspace(-2, 0, 5), torch.rand(5) + 0.1)
    values = scorer.log_values(torch.randn(3, 4), beta=1.0)
    torch.testing.assert_close(values, values[:, :1].expand_as(values))


@pytest.mark.parametrize("k", [1, 3])
def test_guided_sampling_is_the_same_on_the_fast_and_the_plain_decoder(
    tiny_t5: Path, k: int
) -> None:
    """The step decoder's last state equals the model's decoder_hidden_states[-1]: guided
    tokens agree token for token; a guide that is the same for every token changes nothing."""
    model, tokenizer, ids, mask = prompt_batch(tiny_t5)
    d, vocab = model.config.d_model, model.config.vocab_size
    scorer = random_scorer(vocab, d, seed=2)

    guide = Guide(scorer, beta=0.3)

    gen = {"max_new_tokens": 12}
    runs = {}
    for fast in (True, False):
        stream = torch.Generator().manual_seed(5)
        runs[fast] = sample_responses(
            model,
            tokenizer,
            ids,
            mask,
            gen,
            step_decoder=fast,
            samples_per_prompt=k,
            generator=stream,
            guide=guide,
        )[0]
    assert torch.equal(runs[True], runs[False])
    plain = sample_responses(
        model,
        tokenizer,
        ids,
        mask,
        gen,
        samples_per_prompt=k,
        generator=torch.Generator().manual_seed(5),
    )[0]
    flat = sample_responses(
        model,
        tokenizer,
        ids,
        mask,
        gen,
        samples_per_prompt=k,
        generator=torch.Generator().manual_seed(5),
        guide=lambda h, logits: torch.full((h.shape[0], vocab), 0.7),
    )[0]
    assert torch.equal(plain, flat)
    assert not torch.equal(plain, runs[True])  # the guide does move the samples


def test_a_guide_over_every_token_as_candidate_is_the_exact_guide() -> None:
    """candidate_log_values scores the same numbers as log_values when every token is a
    candidate (a [K, d] x [d, C] product per state instead of one [N K, d] x [d, V])."""
    scorer = random_scorer(50, 8, hidden_size=16)
    g = torch.Generator().manual_seed(3)
    h, logits = torch.randn(2, 7, 8, generator=g), torch.randn(2, 7, 50, generator=g) * 3
    exact = Guide(scorer, 0.5)(h, logits)
    torch.testing.assert_close(scorer.candidate_log_values(h, logits, 0.5, 50), exact)
    torch.testing.assert_close(Guide(scorer, 0.5, candidates=80)(h, logits), exact)
    assert exact.shape == (2, 7, 50)


def test_a_candidate_guide_reweights_its_candidates_exactly_and_keeps_the_tail_share(
    tmp_path: Path,
) -> None:
    """With C < V candidates (the reference's most likely tokens), saved and loaded: among
    the candidates the guided distribution is the exact guide's; outside them it is the
    reference's shape; and the candidates keep the reference's total share (the tail's value
    is the candidates' reference-weighted mean), whether the candidates are gathered for all
    states at once or in chunks. A file saved without candidates loads as the exact guide."""
    scorer = random_scorer(50, 8, seed=1)
    g = torch.Generator().manual_seed(4)
    h, logits = torch.randn(5, 8, generator=g), torch.randn(5, 50, generator=g) * 3
    exact = guided_logits(logits, Guide(scorer, 0.5)(h, logits)).softmax(-1)
    save_guide(Guide(scorer, 0.5, candidates=12), tmp_path / "guide.pt")
    guide = load_guide(tmp_path / "guide.pt")
    assert (guide.beta, guide.candidates) == (0.5, 12)
    saved = torch.load(tmp_path / "guide.pt", weights_only=True)
    torch.save({k: v for k, v in saved.items() if k != "candidates"}, tmp_path / "old.pt")
    assert load_guide(tmp_path / "old.pt").candidates == 0  # saved before candidates: exact
    approx = guided_logits(logits, guide(h, logits)).softmax(-1)
    # the candidates' rows gathered for one state at a time: the values of one gather
    one_by_one = guide.scorer.candidate_log_values(h, logits, 0.5, 12, chunk_elements=12 * 8)
    torch.testing.assert_close(one_by_one, guide(h, logits))
    ref = logits.softmax(-1)
    top = ref.topk(12).indices
    inside = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, top, True)
    for p in (approx, exact, ref):
        assert p.shape == (5, 50)

    def within(p: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        q = p * where
        return q / q.sum(-1, keepdim=True)

    torch.testing.assert_close(within(approx, inside), within(exact, inside))
    torch.testing.assert_close(within(approx, ~inside), within(ref, ~inside))
    torch.testing.assert_close((approx * inside).sum(-1), (ref * inside).sum(-1))
    assert not torch.allclose(approx, exact, atol=1e-3)  # C < V: an approximation


def test_guided_logits_are_the_reweighted_reference() -> None:
    ref = torch.tensor([[0.0, 1.0, 2.0]])
    log_v = torch.tensor([[0.0, -1.0, -5.0]])
    p = guided_logits(ref, log_v).softmax(-1)
    want = ref.softmax(-1) * log_v.exp()
    torch.testing.assert_close(p, want / want.sum())


def test_both_methods_share_the_loop_as_one_piece_of_code() -> None:
    """Data order, RNG streams, the guard, the checkpoint state, resume, the step and the
    optimizer step: the same functions for PPO and the guided method."""
    shared = (
        "next_batch",
        "sampling_stream",
        "train",
        "train_step",
        "optimizer_step",
        "state_dict",
        "load_state_dict",
        "resume",
        "_maybe_checkpoint",
        "_stop_requested",
        "_snapshot",
        "_restore",
    )
    for name in shared:
        base = getattr(TrainingLoop, name)
        assert getattr(PPOTrainer, name) is base, name
        assert getattr(GuidedTrainer, name) is base, name
    assert GuidedTrainer.update is not TrainingLoop.update


def record_distill_steps(trainer: GuidedTrainer) -> list[tuple]:
    """A list that gets, at every distillation update of ``trainer``, (query, response, mask,
    teacher logits, student logits, loss, the trainable weights before the update)."""
    calls: list[tuple] = []
    distill_step = trainer._distill_step

    def recording(query, query_mask, response, mask, teacher):
        weights = torch.cat([p.detach().flatten() for p in trainer.policy.trainable_parameters()])
        loss, student = distill_step(query, query_mask, response, mask, teacher)
        calls.append((query, response, mask, teacher, student, loss, weights.clone()))
        return loss, student

    trainer._distill_step = recording
    return calls


def guided_overrides(standins: dict[str, Path], run_dir: Path) -> list[str]:
    return local_overrides(standins, run_dir) + [
        "algorithm=guided",
        "algorithm.steps=6",
        "algorithm.batch_size=8",
        "algorithm.samples_per_prompt=4",
        "algorithm.prefix_scorer.rollout_prompts=16",
        "algorithm.prefix_scorer.rollout_samples=4",
        "checkpoint.every=1",
        "stages.evaluate_before=false",
    ]


def steps_of(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines}


@pytest.mark.slow
@pytest.mark.parametrize("prefixes", ["reference", "teacher"])
def test_guided_resumes_exactly_after_sigkill(standins, tmp_path: Path, prefixes: str) -> None:
    """Steps after a kill -9 and resume=auto equal an uninterrupted run's; the resumed run
    reuses the prefix scorer it fitted (and, distilling on the reference's prefixes, the
    rollouts it kept)."""
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    overrides = [f"algorithm.distill.prefixes={prefixes}"]
    result = run_cli(*guided_overrides(standins, full), *overrides, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    killed = run_cli(
        *guided_overrides(standins, crashed),
        *overrides,
        "+algorithm.debug.kill_after_step=3",
        cwd=ROOT,
    )
    assert killed.returncode == -signal.SIGKILL
    assert sorted(steps_of(crashed)) == [1, 2, 3]
    scorer_file = crashed / "guided" / "prefix_scorer.pt"
    fitted = scorer_file.stat().st_mtime_ns
    resumed = run_cli(*guided_overrides(standins, crashed), *overrides, "resume=auto", cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert scorer_file.stat().st_mtime_ns == fitted
    a, b = steps_of(full), steps_of(crashed)
    assert sorted(b) == list(range(1, 7))
    for step in range(4, 7):
        for key, value in a[step].items():
            if key.startswith(("time/", "perf/")) or value is None:
                continue
            assert b[step][key] == pytest.approx(value, abs=1e-6), (step, key)


@pytest.mark.slow
def test_guided_demo_end_to_end(demo_cache: Path, tmp_path: Path) -> None:
    """experiment=demo_small algorithm=guided: the scorer beats the constant predictor on
    held-out prompts, the teacher is evaluated like a policy and read against the optimum,
    the policy is saved with its card and the scorer, and the teacher samples from it."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "experiment=demo_small",
        "algorithm=guided",
        "debug=fast",
        "logger=none",
        f"paths.cache_dir={demo_cache}",
        f"hydra.run.dir={run_dir}",
        "algorithm.steps=4",
        "algorithm.prefix_scorer.rollout_prompts=64",
        "algorithm.prefix_scorer.rollout_samples=16",
        "algorithm.prefix_scorer.epochs=4",
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (
        summary["guided/scorer/heldout_cross_entropy"]
        < summary["guided/scorer/constant_cross_entropy"]
    )
    assert summary["guided/scorer/value_correlation"] > 0
    for key in ("toxicity_mean", "kl_to_reference", "rouge_l", "distinct_2"):
        assert f"eval/teacher/{key}" in summary
    assert summary["eval/teacher/kl_to_reference"] > 0
    assert "eval/vs_optimum/teacher_toxicity_drop_achieved" in summary
    assert "the teacher against the optimum" in result.stdout
    assert "| metric | before | after | teacher | optimum |" in result.stdout
    policy = run_dir / "policy"
    assert (policy / "prefix_scorer.pt").is_file()
    card = (policy / "merged" / "README.md").read_text()
    assert "# detox_exp value-guided policy" in card and "guided" in card
    from detox_exp.guided.teacher import load_teacher

    teacher = load_teacher(policy)
    prompt = json.loads(
        (run_dir / "eval" / "before" / "generations.jsonl").read_text().splitlines()[0]
    )["prompt"]
    texts = teacher.generate([prompt], samples_per_prompt=2, generation={"max_new_tokens": 16})
    assert len(texts) == 1 and len(texts[0]) == 2


@pytest.mark.parametrize(
    "override, field",
    [
        ("algorithm.distill.direction=sideways", "algorithm.distill.direction"),
        ("algorithm.distill.prefixes=nobody", "algorithm.distill.prefixes"),
        ("+algorithm.stepz=3", "algorithm.stepz"),
        ("algorithm.batch_size=30", "algorithm.batch_size"),
        ("algorithm.prefix_scorer.n_atoms=1", "algorithm.prefix_scorer.n_atoms"),
        ("algorithm.guide_candidates=-1", "algorithm.guide_candidates"),
        ("algorithm.guide_scale=sharp", "algorithm.guide_scale"),
        ("algorithm.lr_decay=cosine", "algorithm.lr_decay"),
        ("algorithm.guide_scale=0", "algorithm.guide_scale"),
        ("stages.frontier=false", "algorithm.guide_scale"),  # kl_match needs its draws
        ("algorithm.mini_batch_size=6", "algorithm.mini_batch_size"),
        (
            "algorithm.mini_batch_size=4 algorithm.distill.prefixes=policy",
            "algorithm.mini_batch_size",
        ),
        (
            "algorithm.distill.prefixes=reference algorithm.prefix_scorer.rollout_samples=2",
            "algorithm.distill.prefixes",
        ),
        ("+algorithm.prefix_scorer.atoms=4", "algorithm.prefix_scorer.atoms"),
        (
            "algorithm.prefix_scorer.heldout_fraction=1.5",
            "algorithm.prefix_scorer.heldout_fraction",
        ),
    ],
)
def test_bad_guided_settings_stop_before_any_stage(
    override: str, field: str, tmp_path: Path
) -> None:
    from detox_exp.errors import bad_input_message
    from detox_exp.run_config import check_run_config
    from tests.helpers.config import compose_cfg

    cfg = compose_cfg(["experiment=demo", "algorithm=guided", *override.split()], tmp_path)
    with pytest.raises(Exception) as err:
        check_run_config(cfg)
    message = bad_input_message(err.value)
    assert message is not None and message.startswith(field), message


def test_every_stage_enters_the_reference_one_way(tiny_t5: Path) -> None:
    """seq2seq.reference: a LoRA model's adapter off (the base model's logits, not the
    adapted ones); a plain model unchanged. ActorCritic, the evaluator, the frontier and the
    guided teacher all enter the reference through it."""
    import inspect

    from detox_exp.evaluation import evaluator
    from detox_exp.frontier import stage
    from detox_exp.guided import teacher
    from detox_exp.seq2seq import reference
    from detox_exp.training import policy
    from tests.helpers.decoding import lora_model

    base, _, ids, mask = prompt_batch(tiny_t5)
    dec = torch.zeros(ids.shape[0], 3, dtype=torch.long)
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        with reference(base):
            assert torch.equal(
                base(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, plain
            )
        lora, *_ = lora_model(tiny_t5)
        adapted = lora(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        with reference(lora):
            ref = lora(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(ref, plain)
    assert not torch.allclose(adapted, plain)
    for module in (evaluator, stage, teacher, policy):
        source = inspect.getsource(module)
        assert "disable_adapter()" not in source.replace("``disable_adapter()``", ""), module


@pytest.mark.slow
def test_on_policy_reverse_distillation_runs(standins, tmp_path: Path) -> None:
    """distill.prefixes=policy direction=reverse (GKD-style): the policy samples, the loss
    is KL(policy || teacher) per token; the run trains and logs it."""
    run_dir = tmp_path / "run"
    result = run_cli(
        *guided_overrides(standins, run_dir),
        "algorithm.steps=2",
        "checkpoint.every=0",
        "algorithm.distill.prefixes=policy",
        "algorithm.distill.direction=reverse",
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = steps_of(run_dir)
    assert sorted(steps) == [1, 2]
    # KL >= 0; in float32, a sum over ~16 tokens of terms p (log p - log q) with |log p| up to
    # ~10 carries round-off of ~16 x 10 x 6e-8 = 1e-5 when the two distributions agree
    assert all(s["guided/loss"] >= -1e-5 and s["objective/kl"] >= -1e-5 for s in steps.values())
    assert steps[2]["objective/kl"] > 0  # the policy moved after its first update


def test_the_frontier_draws_give_the_scorer_the_rows_fresh_rollouts_would(
    tiny_t5: Path, tmp_path: Path
) -> None:
    """The prefix scorer's rows from reused draws (texts and rewards, tokenised again) equal
    those of freshly sampled responses of the same tokens: states, tokens, rewards, in the
    same order; a text longer than max_new_tokens is cut as sampling cuts
    it (no EOS)."""
    reward = CharSumReward()
    trainer = guided_trainer(tiny_t5, tmp_path, reward)
    tok = trainer.tokenizer
    texts = [
        ["the bank", "the bank the bank", "a", ""],
        ["the weather and the bank and the weather", "bank", "weather", "the"],
    ]
    ids = [tok(t)["input_ids"][:8] for row in texts for t in row]  # max_new_tokens = 8
    assert any(tok.eos_token_id not in row for row in ids)  # one is cut
    response, _ = pad_queries(ids, tok.pad_token_id, "cpu")
    sampled = (response, response_mask(response, tok.eos_token_id))
    rewards = reward.score(decode(tok, response)).reward.view(2, 4)

    def sample(indices, generator, k, source, states):  # the sampler, returning those tokens
        query, query_mask = trainer.rollouts.queries(indices)
        states.extend(trainer._reference_pass(query, query_mask, sampled[0], k)[1].unbind(1))
        return query, query_mask, *sampled

    rollouts = dataclasses.replace(trainer.rollouts, sample=sample, draws=(texts, rewards))
    fresh = rollouts.token_rows([0, 1], torch.Generator(), k=4, per_batch=2)
    drawn = rollouts.token_rows([0, 1], torch.Generator(), k=4, per_batch=2, drawn=True)
    assert fresh.keys() == drawn.keys()
    for key in fresh:
        torch.testing.assert_close(drawn[key], fresh[key], rtol=0, atol=0)


def test_the_reference_samples_are_the_scorer_s_rollouts_token_for_token(
    tiny_t5: Path, tmp_path: Path
) -> None:
    """distill.prefixes=reference distils on the scorer's training rollouts, rebuilt from its
    rows: each response and mask is the sampled one, of its prompt; groups are k responses
    of one prompt, a remainder short of k left out."""
    trainer = guided_trainer(tiny_t5, tmp_path, CharSumReward())
    sampled: list[tuple[torch.Tensor, torch.Tensor]] = []

    def sample(indices, generator, k, source, states):
        out = trainer.sample(indices, generator, k, source, states=states)
        sampled.append((out[2], out[3]))
        return out

    rollouts = dataclasses.replace(trainer.rollouts, sample=sample)
    rows = rollouts.token_rows([5, 2, 7], torch.Generator().manual_seed(0), k=4, per_batch=2)
    reference = ReferenceSamples.of(rows)
    assert reference.prompts.tolist() == [5] * 4 + [2] * 4 + [7] * 4
    want = [(row, mask) for response, masks in sampled for row, mask in zip(response, masks)]
    got, got_mask = reference.responses(list(range(12)), trainer.tokenizer.pad_token_id, "cpu")
    assert len(want) == 12 and got_mask.sum() > 12
    for (row, mask), rebuilt, rebuilt_mask in zip(want, got, got_mask, strict=True):
        n = int(mask.sum())
        assert mask[:n].all() and torch.equal(rebuilt_mask.sum(), mask.sum().long())
        assert torch.equal(rebuilt[:n], row[:n])
    assert reference.groups(2) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert reference.groups(3) == [[0, 1, 2], [4, 5, 6], [8, 9, 10]]


def test_a_reference_step_distils_its_groups_rollouts_against_the_teacher(
    tiny_t5: Path, tmp_path: Path
) -> None:
    """With distill.prefixes=reference a step takes batch_size / k groups of the scorer's
    rollouts from the loop's order (which counts groups, not prompts) and distils the
    policy on exactly those responses, of their prompts, against the teacher's logits of a
    reference pass; nothing is sampled."""
    trainer = guided_trainer(
        tiny_t5, tmp_path, CharSumReward(), batch_size=8, distill={"prefixes": "reference"}
    )
    trainer.prepare()
    assert trainer.data_size() == len(trainer.groups) == 15  # 16 prompts, 1 held out; k = 4
    # responses of unequal lengths (the random tiny T5 rarely ends early): cut some short
    full = trainer.reference
    ends = torch.cat([full.lengths.new_zeros(1), full.lengths.cumsum(0)])
    lengths = full.lengths - torch.arange(len(full.lengths)) % 3
    tokens = [full.tokens[ends[r] : ends[r] + n] for r, n in enumerate(lengths.tolist())]
    trainer.reference = ReferenceSamples(full.prompts, lengths, torch.cat(tokens))
    chosen = [3, 7]
    trainer.next_batch = lambda: chosen
    trainer.sample = None  # a step must not sample
    seen = record_distill_steps(trainer)
    with torch.no_grad():  # a policy away from the reference, so that its KL is not 0
        for weight in trainer.policy.trainable_parameters():
            weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(weight.numel()))
    metrics, batch = trainer.update()
    rows = trainer.groups[chosen[0]] + trainer.groups[chosen[1]]
    response, mask = trainer.reference.responses(rows, trainer.tokenizer.pad_token_id, "cpu")
    prompts = [int(trainer.reference.prompts[trainer.groups[g][0]]) for g in chosen]
    query, query_mask = trainer._queries(prompts)
    ((got_query, got_response, got_mask, teacher, student, _, _),) = seen
    assert batch.indices == prompts
    assert torch.equal(got_query, query) and torch.equal(got_response, response)
    assert torch.equal(got_mask, mask.float())
    keep = mask.bool()
    plain = trainer.teacher_logits(query, query_mask, response)[1]  # every position
    assert not keep.all()  # some positions are padding
    torch.testing.assert_close(teacher[keep], plain[keep], rtol=1e-6, atol=1e-6)
    # the logged KLs: exact, summed over each response's tokens, averaged over responses
    log_ref = trainer.teacher_logits(query, query_mask, response)[0].log_softmax(-1)
    for key, logits in (("objective/kl", student), ("guided/teacher_kl", plain)):
        kl = (categorical_kl(logits.log_softmax(-1), log_ref) * got_mask).sum(1).mean()
        assert kl > 1e-3 and metrics[key] == pytest.approx(kl.item(), rel=1e-5), key


def test_a_reference_run_resumed_without_its_rollouts_is_a_clear_error(
    tiny_t5: Path, tmp_path: Path
) -> None:
    """A run whose scorer was fitted without keeping its rollouts (another distill.prefixes),
    resumed with prefixes=reference: a one-line error naming resume, not a crash mid-step."""
    from detox_exp.errors import DataError

    trainer = guided_trainer(tiny_t5, tmp_path, CharSumReward(), distill={"prefixes": "reference"})
    config = trainer.model.config
    save_guide(
        Guide(random_scorer(config.vocab_size, config.d_model, seed=4), 1.0),
        trainer.work_dir / "prefix_scorer.pt",
    )
    trainer.step = 3
    with pytest.raises(DataError, match="resume"):
        trainer.prepare()


def test_the_states_kept_from_sampling_equal_a_reference_pass(
    tiny_t5: Path, tmp_path: Path
) -> None:
    """The scorer's rows of fresh rollouts take the decoder states the sampler computed; they
    equal one reference pass over the finished responses at every response token, up to
    float32 round-off between step and full decoding."""
    trainer = guided_trainer(tiny_t5, tmp_path, CharSumReward())
    steps: list = []
    query, query_mask, response, mask = trainer.sample(
        list(range(3)), torch.Generator().manual_seed(0), trainer.k, "reference", states=steps
    )
    _, passed = trainer._reference_pass(query, query_mask, response, trainer.k)
    keep = mask.bool()
    assert keep.sum() > 12 and len(steps) == response.shape[1]
    torch.testing.assert_close(torch.stack(steps, 1)[keep], passed[keep], rtol=1e-5, atol=1e-5)


def test_the_teacher_logits_kept_from_sampling_equal_a_reference_pass(
    tiny_t5: Path, tmp_path: Path
) -> None:
    """Distillation on the teacher's samples reuses the distributions it sampled from; they
    equal one reference pass over the finished responses with the guide (states and token
    counts of each prefix), up to float32 round-off between step and full decoding."""
    trainer = guided_trainer(tiny_t5, tmp_path, CharSumReward())
    config = trainer.model.config
    trainer.guide = Guide(random_scorer(config.vocab_size, config.d_model, seed=4), 1.0)
    record: list = []
    query, query_mask, response, mask = trainer.sample(
        list(range(3)), torch.Generator().manual_seed(0), trainer.k, "teacher", record
    )
    kept = trainer.teacher_logits(query, query_mask, response, record)
    plain = trainer.teacher_logits(query, query_mask, response)
    keep = mask.bool()
    assert keep.sum() > 12 and response.shape[1] == len(record)
    for got, want in zip(kept, plain):
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(kept[0][keep], kept[1][keep].log_softmax(-1))  # guided


def test_a_step_of_minibatches_updates_once_per_minibatch_on_disjoint_samples(
    tiny_t5: Path, tmp_path: Path
) -> None:
    """batch_size 16 in minibatches of 8 (k = 4): one step samples 4 prompts from the teacher
    at once, then makes two optimizer steps, each on the 8 samples of 2 of them (each
    sample used once), the second after the first has moved the weights; the logged loss is
    the mean of the two."""
    trainer = guided_trainer(tiny_t5, tmp_path, CharSumReward(), batch_size=16, mini_batch_size=8)
    config = trainer.model.config
    trainer.guide = Guide(random_scorer(config.vocab_size, config.d_model, seed=4), 1.0)
    assert trainer.updates_per_step == 2
    calls = record_distill_steps(trainer)
    metrics, batch = trainer.update()
    seen = [(response, weights, loss) for _, response, _, _, _, loss, weights in calls]
    assert len(seen) == 2 and [len(r) for r, _, _ in seen] == [8, 8]
    assert len(batch.texts) == 16
    assert not torch.equal(seen[0][1], seen[1][1])  # the second update saw moved weights
    state = trainer.optimizer.state[trainer.policy.trainable_parameters()[0]]
    assert int(state["step"]) == 2
    assert metrics["guided/loss"] == pytest.approx((seen[0][2] + seen[1][2]) / 2)


def test_a_linear_decay_sets_each_update_s_rate_from_the_step_alone(
    tiny_t5: Path, tmp_path: Path
) -> None:
    """lr_decay=linear over 2 steps of 2 updates: the rates are lr x (1, 3/4, 1/2, 1/4); a
    trainer put at step 1 (as a resumed run is) sets the last two again."""
    rates: list[float] = []

    def run(trainer: GuidedTrainer) -> None:
        config = trainer.model.config
        trainer.guide = Guide(random_scorer(config.vocab_size, config.d_model, seed=4), 1.0)
        step = trainer.optimizer.step

        def recording(*args, **kwargs):
            rates.append(trainer.optimizer.param_groups[0]["lr"])
            return step(*args, **kwargs)

        trainer.optimizer.step = recording
        while trainer.step < trainer.steps:
            trainer.update()
            trainer.step += 1

    settings = {"steps": 2, "batch_size": 16, "mini_batch_size": 8, "lr_decay": "linear"}
    run(guided_trainer(tiny_t5, tmp_path / "a", CharSumReward(), **settings))
    assert rates == pytest.approx([1e-2, 0.75e-2, 0.5e-2, 0.25e-2], rel=1e-12)
    resumed = guided_trainer(tiny_t5, tmp_path / "b", CharSumReward(), **settings)
    resumed.step = 1
    rates.clear()
    run(resumed)
    assert rates == pytest.approx([0.5e-2, 0.25e-2], rel=1e-12)
    fixed = guided_trainer(
        tiny_t5, tmp_path / "c", CharSumReward(), **settings | {"lr_decay": "none"}
    )
    rates.clear()
    run(fixed)
    assert rates == [1e-2] * 4


def test_the_real_experiment_takes_the_guided_method_by_one_override(tmp_path: Path) -> None:
    """experiment=flan_t5_dialogsum algorithm=guided: the method's node checks out against
    its trainer's signature and ranges, with the frontier stage its calibration needs."""
    from detox_exp.guided.settings import check_guide_scale
    from detox_exp.run_config import training_node
    from detox_exp.schema import check_node
    from tests.helpers.config import compose_cfg

    cfg = compose_cfg(["experiment=flan_t5_dialogsum", "algorithm=guided"], tmp_path)
    name, node = training_node(cfg)
    assert name == "guided" and node["guide_scale"] == "kl_match" and cfg.stages.frontier
    assert cfg.ppo.kl_controller._target_.endswith("FrontierKLController")  # beta: measured
    check_node(node, "algorithm")
    check_guide_scale(node["guide_scale"], bool(cfg.stages.frontier))
