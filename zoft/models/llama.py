"""The Llama family (Llama 1-3, SmolLM/SmolLM2, TinyLlama, Qwen2, Mistral), written compactly.

One file covers them because they differ only in a few config switches: grouped-query attention,
q/k/v biases (Qwen2), tied embeddings (SmolLM2, small Qwen2), RoPE base and scaling (Llama 3).
Parameter names are Hugging Face's, so checkpoints load by identity plus shape checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
    run_linears,
)

MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass
class LlamaArgs:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "linear"|"llama3", ...}
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"RoPE scaling {kind!r} is not implemented natively")
        if self.hidden_act != "silu":
            raise ValueError(f"activation {self.hidden_act!r} is not implemented natively")

    @classmethod
    def from_hf(cls, cfg: dict) -> LlamaArgs:
        mt = cfg.get("model_type", "llama")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})  # transformers 5 | 4
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        bias = cfg.get("attention_bias", False)
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", mt == "mistral") else None
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or 0,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rope_theta=theta,
            rope_scaling=rope if rope.get("rope_type", "default") != "default" else {},
            qkv_bias=True if mt == "qwen2" else bias,
            o_bias=bias if mt != "qwen2" else False,
            mlp_bias=cfg.get("mlp_bias", False),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            sliding_window=window,
            hidden_act=cfg.get("hidden_act", "silu"),
        )


PRESETS = {  # config shapes of published checkpoints, for benchmarks with random weights
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5),
}


def rope_inv_freq(a: LlamaArgs) -> torch.Tensor:
    inv = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float64) / a.head_dim))
    s = a.rope_scaling or {}
    if s.get("rope_type") == "linear":
        inv = inv / s["factor"]
    elif s.get("rope_type") == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.n_head, self.n_kv, self.hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, self.n_head * self.hd, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, self.n_kv * self.hd, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, self.n_kv * self.hd, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, a.hidden_size, bias=a.o_bias)
        self.qkv: Fused | None = None  # q/k/v as one GEMM (NativeModel.fuse_frozen)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: tuple, cache: dict | None = None,
                rows: Rows = PLAIN) -> torch.Tensor:
        N, L, _ = x.shape
        q, k, v = run_linears(self.qkv, [self.q_proj, self.k_proj, self.v_proj], x, rows)
        q = q.view(N, L, self.n_head, self.hd).transpose(1, 2)  # (N, H, L, hd)
        k = k.view(N, L, self.n_kv, self.hd).transpose(1, 2)  # (N, Hkv, L, hd)
        v = v.view(N, L, self.n_kv, self.hd).transpose(1, 2)
        cos, sin = rope  # (N|1, 1, L, hd), repeated over perturbation rows below if needed
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # a block trained in another dtype than the embeddings'
        if cos.shape[0] != N:
            cos, sin = cos.repeat(N // cos.shape[0], 1, 1, 1), sin.repeat(N // sin.shape[0], 1, 1, 1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = extend_cache(cache, k, v)
        k, v, mask = add_prefix(rows.prefix(self), k, v, mask)  # prefix keys carry no rotation (as in peft)
        y = attention(q, k, v, mask).transpose(1, 2).reshape(N, L, -1)
        return rows.linear(self.o_proj, y)


class LlamaMLP(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)
        self.gate_up: Fused | None = None  # gate/up as one GEMM (NativeModel.fuse_frozen)

    def forward(self, x: torch.Tensor, rows: Rows = PLAIN) -> torch.Tensor:
        gate, up = run_linears(self.gate_up, [self.gate_proj, self.up_proj], x, rows)
        return rows.linear(self.down_proj, F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.self_attn = LlamaAttention(a)
        self.mlp = LlamaMLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, rope: tuple, cache: dict | None = None,
                rows: Rows = PLAIN) -> torch.Tensor:
        h = h + self.self_attn(rows.norm(self.input_layernorm, h), mask, rope, cache, rows)
        return h + self.mlp(rows.norm(self.post_attention_layernorm, h), rows)


class _Inner(nn.Module):  # "model." prefix of LlamaForCausalLM's names
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(a) for _ in range(a.num_hidden_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class Llama(NativeModel):
    family = "llama"
    lora_targets = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                    "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    block_prefix = "model.layers"
    embed_path = "model.embed_tokens"

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.max_positions = args.sliding_window or args.max_position_embeddings
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # rotary frequencies per device
        self.model = _Inner(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, ids: torch.Tensor, pos: torch.Tensor, rows: Rows = PLAIN) -> torch.Tensor:
        return rows.embedding(self.model.embed_tokens, ids)

    def position_context(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._inv_freq.get(pos.device)  # kept per device (not a buffer: no meta-device state)
        if inv_freq is None:
            inv_freq = self._inv_freq[pos.device] = rope_inv_freq(self.args).to(pos.device)
        # with a prefix the tokens sit after its P_v virtual ones, as transformers places them after a cache
        freqs = (pos + self.prefix_len).float()[..., None] * inv_freq  # (N, L, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (N, 1, L, hd)
        dtype = self.model.embed_tokens.weight.dtype
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def norm_out(self, h: torch.Tensor, rows: Rows = PLAIN) -> torch.Tensor:
        return rows.norm(self.model.norm, h)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight
