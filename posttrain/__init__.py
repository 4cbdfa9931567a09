"""posttrain: post-training for language models (SFT, reward models, DPO family, KTO, GRPO family)."""

__version__ = "0.1.0"
