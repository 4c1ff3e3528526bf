"""Tiny random checkpoints in Hugging Face format, built by the tests (no downloads)."""

from __future__ import annotations

import os

import torch
import transformers

from tests.helpers_tok import gpt2_tokenizer

VOCAB = 50272  # OPT's padded GPT-2 vocabulary; the GPT-2 BPE tokenizer fits inside it

CONFIGS = {
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=64,
        max_position_embeddings=256, word_embed_proj_dim=32, dropout=0.0,
    ),
    "opt350": lambda: transformers.OPTConfig(  # post-LN with project_in/out, like opt-350m
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=64,
        max_position_embeddings=256, word_embed_proj_dim=16, do_layer_norm_before=False, dropout=0.0,
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=50256,
        eos_token_id=50256, rope_theta=100000.0,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "neox": lambda: transformers.GPTNeoXConfig(  # a family with no native implementation: the HF fallback
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256,
    ),
}


def make_tiny(kind: str, root: str, seed: int = 0) -> str:
    """Save a random tiny model of `kind` with a GPT-2 BPE tokenizer under root/kind; return the folder."""
    out = os.path.join(root, kind)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    torch.manual_seed(seed)
    cfg = CONFIGS[kind]()
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random biases and norm weights too, so a wrong map can't hide behind zeros/ones
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    gpt2_tokenizer().save_pretrained(out)
    return out
