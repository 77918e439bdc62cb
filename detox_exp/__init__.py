"""detox_exp: PPO detoxification of seq2seq language models, configured with Hydra."""

__version__ = "0.1.0"
