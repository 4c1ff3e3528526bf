"""OPT (facebook/opt-125m … opt-66b), written compactly, with Hugging Face's parameter names.

Covers both layouts: pre-LayerNorm (every size but 350m) and opt-350m's post-LayerNorm with
``project_in``/``project_out`` between a 512-wide embedding and the 1024-wide trunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoft.models.common import (
    PLAIN,
    Fused,
    NativeModel,
    Rows,
    add_prefix,
    attention,
    extend_cache,
    linear_relu,
    run_linears,
)

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class OPTArgs:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 768
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, cfg: dict) -> OPTArgs:
        args = cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})
        args.remove_final_layer_norm = cfg.get("_remove_final_layer_norm", False)
        args.word_embed_proj_dim = cfg.get("word_embed_proj_dim") or args.hidden_size
        return args

    def __post_init__(self) -> None:
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"OPT activation {self.activation_function!r} is not supported")


PRESETS = {  # config shapes of the published checkpoints, for benchmarks with random weights
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
    "opt-350m": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
        word_embed_proj_dim=512, do_layer_norm_before=False,
    ),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                     word_embed_proj_dim=2048),
    "opt-2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
                     word_embed_proj_dim=2560),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                     word_embed_proj_dim=4096),
    "opt-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480,
                    word_embed_proj_dim=5120),
    "opt-30b": dict(hidden_size=7168, num_hidden_layers=48, num_attention_heads=56, ffn_dim=28672,
                    word_embed_proj_dim=7168),
    "opt-66b": dict(hidden_size=9216, num_hidden_layers=64, num_attention_heads=72, ffn_dim=36864,
                    word_embed_proj_dim=9216),
}


class OPTAttention(nn.Module):
    def __init__(self, a: OPTArgs):
        super().__init__()
        d = a.hidden_size
        self.n_head = a.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=a.enable_bias)
        self.k_proj = nn.Linear(d, d, bias=a.enable_bias)
        self.v_proj = nn.Linear(d, d, bias=a.enable_bias)
        self.out_proj = nn.Linear(d, d, bias=a.enable_bias)
        self.qkv: Fused | None = None  # q/k/v as one GEMM (NativeModel.fuse_frozen)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: dict | None = None,
                rows: Rows = PLAIN) -> torch.Tensor:
        N, L, D = x.shape
        hd = D // self.n_head
        q, k, v = (t.view(N, L, self.n_head, hd).transpose(1, 2)  # (N, H, L, hd)
                   for t in run_linears(self.qkv, [self.q_proj, self.k_proj, self.v_proj], x, rows))
        k, v = extend_cache(cache, k, v)
        k, v, mask = add_prefix(rows.prefix(self), k, v, mask)
        y = attention(q, k, v, mask).transpose(1, 2).reshape(N, L, D)
        return rows.linear(self.out_proj, y)


class OPTDecoderLayer(nn.Module):
    def __init__(self, a: OPTArgs):
        super().__init__()
        d = a.hidden_size
        self.pre_ln = a.do_layer_norm_before
        self.act = ACTIVATIONS[a.activation_function]
        self.self_attn = OPTAttention(a)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=a.layer_norm_elementwise_affine)
        self.fc1 = nn.Linear(d, a.ffn_dim, bias=a.enable_bias)
        self.fc2 = nn.Linear(a.ffn_dim, d, bias=a.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=a.layer_norm_elementwise_affine)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, ctx=None, cache: dict | None = None,
                rows: Rows = PLAIN) -> torch.Tensor:
        ln1, ln2 = self.self_attn_layer_norm, self.final_layer_norm
        if self.pre_ln:
            h = h + self.self_attn(rows.norm(ln1, h), mask, cache, rows)
            return h + rows.linear(self.fc2, self.mlp_in(rows.norm(ln2, h), rows))
        h = rows.norm(ln1, h + self.self_attn(h, mask, cache, rows))
        return rows.norm(ln2, h + rows.linear(self.fc2, self.mlp_in(h, rows)))

    def mlp_in(self, x: torch.Tensor, rows: Rows = PLAIN) -> torch.Tensor:
        """act(fc1(x)); a ReLU runs in the GEMM's epilogue where it can (linear_relu)."""
        return linear_relu(self.fc1, x, rows) if self.act is F.relu else self.act(rows.linear(self.fc1, x))


class OPTDecoder(nn.Module):
    def __init__(self, a: OPTArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(a.max_position_embeddings + 2, a.hidden_size)  # OPT offsets by 2
        if a.word_embed_proj_dim != a.hidden_size:
            self.project_in = nn.Linear(a.word_embed_proj_dim, a.hidden_size, bias=False)
            self.project_out = nn.Linear(a.hidden_size, a.word_embed_proj_dim, bias=False)
        else:
            self.project_in = self.project_out = None
        if a.do_layer_norm_before and not a.remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(a.hidden_size, elementwise_affine=a.layer_norm_elementwise_affine)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(OPTDecoderLayer(a) for _ in range(a.num_hidden_layers))


class _Wrap(nn.Module):  # gives the "model.decoder." prefix of OPTForCausalLM's names
    def __init__(self, a: OPTArgs):
        super().__init__()
        self.decoder = OPTDecoder(a)


class OPT(NativeModel):
    family = "opt"
    lora_targets = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj", "fc1": "fc1", "fc2": "fc2"}
    block_prefix = "model.decoder.layers"
    embed_path = "model.decoder.embed_tokens"

    def __init__(self, args: OPTArgs):
        super().__init__()
        self.args = args
        self.max_positions = args.max_position_embeddings
        self.model = _Wrap(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.word_embed_proj_dim, args.vocab_size, bias=False)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.decoder.layers

    def embed(self, ids: torch.Tensor, pos: torch.Tensor, rows: Rows = PLAIN) -> torch.Tensor:
        dec = self.model.decoder
        h = rows.embedding(dec.embed_tokens, ids)
        if dec.project_in is not None:
            h = rows.linear(dec.project_in, h)
        # OPT's positions are offset by 2; with a prefix, by its P_v too (what transformers computes from the
        # attention mask that peft widens by P_v ones)
        return h + rows.embedding(dec.embed_positions, pos + 2 + self.prefix_len)

    def norm_out(self, h: torch.Tensor, rows: Rows = PLAIN) -> torch.Tensor:
        dec = self.model.decoder
        if dec.final_layer_norm is not None:
            h = rows.norm(dec.final_layer_norm, h)
        if dec.project_out is not None:
            h = rows.linear(dec.project_out, h)
        return h

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.args.tie_word_embeddings:
            return self.model.decoder.embed_tokens.weight
        return self.lm_head.weight
