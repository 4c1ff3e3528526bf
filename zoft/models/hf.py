"""The fallback for causal LMs with no native implementation: transformers' AutoModelForCausalLM.

zoft.engine.hf.HFEngine runs it. It keeps the training features that don't need a native model (LoRA rows batched in one forward,
frozen weights read once, seeded z, every estimator and optimizer) but not the engine's packing,
prompt sharing or logit selection: each (example, candidate) is its own right-padded sequence and the
model computes full logits. `zoft` prints which path it took.
"""

from __future__ import annotations

import torch
from torch import nn

from zoft.errors import ZoftError

LORA_TARGETS = {  # short name -> module name, by model_type, where it isn't q_proj/v_proj
    "gpt_neox": {"q": "query_key_value", "v": "query_key_value", "qkv": "query_key_value"},
    "bloom": {"q": "query_key_value", "v": "query_key_value", "qkv": "query_key_value"},
    "falcon": {"q": "query_key_value", "v": "query_key_value", "qkv": "query_key_value"},
    # GPT-2's q/k/v are one Conv1D, c_attn: peft's default LoRA target for it too
    "gpt2": {"q": "c_attn", "v": "c_attn", "qkv": "c_attn"},
}
DEFAULT_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def load_hf(folder: str, dtype: torch.dtype, device: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as e:
        raise ZoftError(f"transformers could not load {folder} as a causal LM: {e}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def block_prefix(model: nn.Module) -> str:
    """Name of the ModuleList holding the transformer blocks (the longest one)."""
    best = max(
        ((n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)),
        key=lambda nm: len(nm[1]),
        default=None,
    )
    if best is None:
        raise ZoftError(f"could not find the transformer blocks of {type(model).__name__}")
    return best[0]
