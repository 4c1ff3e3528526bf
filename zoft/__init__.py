"""zoft: zeroth-order (MeZO) fine-tuning of causal language models with an inference-engine forward."""

__version__ = "0.1.0"
