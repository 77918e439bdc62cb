"""Every logged metric name, defined once (trl-style namespaces)."""

# PPO, logged every step (metrics.jsonl lines also carry the global "step")
# mean over samples of the summed per-token KL(policy || reference), by ppo.kl_log_estimator
# (never negative); the adaptive KL controller reads it
KL = "objective/kl"
KL_REWARD = "objective/kl_reward"  # the same, by ppo.kl_estimator (the one in the reward)
KL_COEF = "objective/kl_coef"
ENTROPY = "objective/entropy"  # mean per-token entropy of the policy on its responses
LOSS_POLICY = "ppo/loss/policy"
LOSS_VALUE = "ppo/loss/value"
LOSS_TOTAL = "ppo/loss/total"
LOSS_KL = "ppo/loss/kl"  # the KL term in the loss (ppo.kl_loss_coef > 0), before its weight
APPROX_KL = "ppo/policy/approxkl"
POLICY_KL = "ppo/policy/policykl"
CLIPFRAC = "ppo/policy/clipfrac"
RATIO_MEAN = "ppo/policy/ratio_mean"  # mean importance ratio new / old over response tokens
VALUE_CLIPFRAC = "ppo/val/clipfrac"
VAR_EXPLAINED = "ppo/val/var_explained"
VALUE_MEAN = "ppo/val/mean"
RETURNS_MEAN = "ppo/returns/mean"
GRAD_NORM = "ppo/grad_norm"
EPOCHS_RUN = "ppo/epochs_run"
REWARD_MEAN = "env/reward_mean"  # classifier score (before KL shaping)
REWARD_STD = "env/reward_std"
TOXICITY_MEAN = "env/toxicity_mean"
RESPONSE_LEN_MEAN = "tokens/response_len_mean"
STEP_TIME = "time/step_s"
TIME_GENERATE = "time/generate"
TIME_SCORE = "time/score"
TIME_FORWARD = "time/forward"
TIME_OPTIMIZE = "time/optimize"
SAMPLES_PER_S = "perf/samples_per_s"
MEDIAN_STEP_S = "perf/median_step_s"  # summary: median over the steps after the first
PEAK_RSS_MB = "perf/peak_rss_mb"  # summary: peak resident memory of the process
PEAK_CUDA_MB = "perf/peak_cuda_mb"  # summary, CUDA runs: peak GPU memory held by tensors
GROUP_ZERO_STD = "ppo/group/zero_std_fraction"  # groups whose k scores are all equal
GROUP_REWARD_STD = "ppo/group/reward_std"  # mean over groups of the std of their k scores
SKIPPED_BATCHES = "ppo/skipped_batches"  # batches dropped for NaN / inf (ppo.on_nonfinite=skip)
SAMPLES_TABLE = "samples"

# data
DATA_TRAIN_PROMPTS = "data/train_prompts"
DATA_EVAL_PROMPTS = "data/eval_prompts"

PPO_STEP_METRICS = (  # every step, every advantage estimator
    KL,
    KL_REWARD,
    KL_COEF,
    ENTROPY,
    LOSS_POLICY,
    APPROX_KL,
    CLIPFRAC,
    REWARD_MEAN,
    REWARD_STD,
    TOXICITY_MEAN,
    RESPONSE_LEN_MEAN,
    STEP_TIME,
    SAMPLES_PER_S,
)
CRITIC_STEP_METRICS = (LOSS_VALUE, VAR_EXPLAINED)  # ppo.advantage_estimator=gae only
GROUP_STEP_METRICS = (GROUP_ZERO_STD, GROUP_REWARD_STD)  # ppo.samples_per_prompt > 1

# the frontier stage (detox_exp/frontier): the optimum at the run's beta, on train prompts
FRONTIER_BETA = "frontier/beta"
FRONTIER_TOXICITY_CHANGE = "frontier/toxicity_change"
FRONTIER_KL = "frontier/kl"
FRONTIER_TABLE = "frontier/table"
FRONTIER_PLOT = "frontier/plot"

# the held-out optimum at the run's beta, from the before-evaluation's K >= 2 samples
OPTIMUM_PHASE = "optimum"  # eval/optimum/<metric>
# (before - after) / (before - optimum) of the mean toxicity: the share of the optimum's
# drop the run achieved; and the run's KL to the reference as a multiple of the optimum's
OPTIMUM_DROP_ACHIEVED = "eval/vs_optimum/toxicity_drop_achieved"
OPTIMUM_KL_RATIO = "eval/vs_optimum/kl_ratio"

# the value-guided method (algorithm=guided): its prefix scorer's calibration on held-out
# rollout prompts (cross-entropy per token against the constant predictor; correlation of the
# predicted exp(r / beta) with the realised one), and per step the distillation loss and the
# teacher's KL to the reference (objective/kl is the policy's, on the same prefixes)
SCORER_LOSS_HELDOUT = "guided/scorer/heldout_cross_entropy"
SCORER_LOSS_CONSTANT = "guided/scorer/constant_cross_entropy"
SCORER_VALUE_CORR = "guided/scorer/value_correlation"
SCORER_ROLLOUTS = "guided/scorer/rollouts"
SCORER_ATOMS = "guided/scorer/atoms"
SCORER_REUSED = "guided/scorer/reused_rollouts"  # of them, the frontier stage's draws
LOSS_DISTILL = "guided/loss"
TEACHER_KL = "guided/teacher_kl"
# the reference probability of the tokens the guide scores (algorithm.guide_candidates > 0)
GUIDE_CANDIDATE_MASS = "guided/candidate_mass"
GUIDE_SCALE = "guided/guide_scale"  # the exponent on V (algorithm.guide_scale)
GUIDE_SCALE_KL = "guided/guide_scale/teacher_kl"  # kl_match: the teacher's KL at that scale
GUIDE_SCALE_TARGET = "guided/guide_scale/optimum_kl"  # and the optimum's it matched
# the guided teacher evaluated like a policy (eval/teacher/*), and against the optimum
TEACHER_PHASE = "teacher"
TEACHER_DROP_ACHIEVED = "eval/vs_optimum/teacher_toxicity_drop_achieved"
TEACHER_KL_RATIO = "eval/vs_optimum/teacher_kl_ratio"

# the evaluations: eval/<phase>/<metric> for the phases before, after and optimum, and
# eval/delta/<metric>[_rel|_ci_low|_ci_high] for the change before -> after
EVAL_PHASES = ("before", "after")
DELTA_PHASE = "delta"


def eval_key(phase: str, metric: str) -> str:
    """``eval/<phase>/<metric>``, e.g. ``eval/after/toxicity_mean``."""
    return f"eval/{phase}/{metric}"


# rows of the printed before / after / optimum table
REPORT_METRICS = (
    "toxicity_mean",
    "toxic_fraction",
    "rouge_l",
    "distinct_2",
    "unique_fraction",
    "top_response_fraction",
    "response_len_mean",
    "kl_to_reference",
)
# rows of the model card's table
CARD_METRICS = (
    "toxicity_mean",
    "toxic_fraction",
    "rouge_l",
    "distinct_2",
    "unique_fraction",
    "response_len_mean",
    "kl_to_reference",
)
# metrics whose change gets a paired bootstrap CI (prompts resampled, the same before / after)
PAIRED_METRICS = (
    "toxicity_mean",
    "toxic_fraction",
    "rouge_l",
    "response_len_mean",
    "distinct_1",
    "distinct_2",
    "unique_fraction",
)
SIDE_BY_SIDE_TABLE = "eval/side_by_side"
TOXICITY_HIST = "toxicity_hist"  # eval/<phase>/toxicity_hist
# the columns of a sweep's sweep_summary.md / jsonl
SWEEP_SUMMARY_METRICS = (
    "eval/before/toxicity_mean",
    "eval/after/toxicity_mean",
    "eval/delta/toxicity_mean_rel",
    "eval/before/rouge_l",
    "eval/after/rouge_l",
    "eval/after/distinct_1",
    "objective",
)
# the headline metrics a model artifact carries as metadata (W&B allows 100 metadata keys: a
# run's summary has 150+)
MODEL_METADATA_METRICS = (
    eval_key("before", "toxicity_mean"),
    eval_key("after", "toxicity_mean"),
    eval_key(DELTA_PHASE, "toxicity_mean_rel"),
    eval_key("after", "toxic_fraction"),
    eval_key("after", "rouge_l"),
    eval_key("after", "distinct_2"),
    eval_key("after", "kl_to_reference"),
    OPTIMUM_DROP_ACHIEVED,
    OPTIMUM_KL_RATIO,
    FRONTIER_BETA,
    TEACHER_DROP_ACHIEVED,
    TEACHER_KL_RATIO,
)
