"""detox_exp: RL detoxification of seq2seq language models (PPO / RLOO / GRPO, value-guided
distillation), configured with Hydra. The entrypoint (:mod:`detox_exp.cli`) registers what
the configs compose (:func:`detox_exp.cli.register_config`)."""

__version__ = "0.1.0"
