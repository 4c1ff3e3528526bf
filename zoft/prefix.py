"""Prefix tuning (MeZO's third mode, `--mode prefix`): P_v trained key and value vectors in front of every
layer's attention, stored in peft's PREFIX_TUNING layout.

θ is one tensor of peft's ``prompt_embeddings`` shape (P_v, 2·layers·kv_heads·head_dim). Viewed as
(P_v, 2·layers, kv_heads, head_dim), index 2l holds layer l's keys and 2l+1 its values, as
``PeftModel.get_prompt`` splits them; grouped-query models (Llama with fewer KV heads) store kv_heads
heads, as peft does. Each token of a row attends to its layer's prefix before its own causal context;
the prefix keys carry no rotary embedding, and the real tokens' positions start at P_v (what
transformers does with a P_v-long ``past_key_values`` and an attention mask widened by P_v ones: RoPE
positions count from the cache length, OPT's learned positions from the mask's cumulative sum).

A native attention module holds its layer's ``PrefixSlot`` as ``zoft_prefix``; it reads θ through the
step's ``Rows`` (``rows.prefix(module)``), so a ZO step's rows bring their own perturbed prefixes
(``zoft.zo.perturbers.PrefixRows``). The transformers fallback gets them as a ``DynamicCache``
(``zoft.engine.hf``).

Initialisation follows MeZO's ``init_by_real_act``: the keys and values that P_v random vocabulary
tokens produce at positions 0..P_v-1, i.e. the KV cache of a real (random) prompt, so training starts
from a model that behaves as if that prompt had been read. The tokens are drawn from the run seed, so
a replay rebuilds the same start.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from zoft.errors import ZoftError

PEFT_TYPE = "PREFIX_TUNING"


@dataclass(frozen=True)
class PrefixShape:
    tokens: int  # P_v, peft's num_virtual_tokens
    layers: int
    kv_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:  # peft's token_dim: one layer's keys (or values) for one virtual token
        return self.kv_heads * self.head_dim

    @property
    def numel(self) -> int:
        return self.tokens * 2 * self.layers * self.token_dim


def prefix_shape(cfg: dict, tokens: int) -> PrefixShape:
    """The prefix's shape for a model's Hugging Face config, by peft's rules (_prepare_prompt_learning_config):
    KV heads where the config names them, head_dim where it names one, else hidden / heads."""
    try:
        heads = cfg.get("num_attention_heads") or cfg["n_head"]
        layers = cfg.get("num_hidden_layers") or cfg["n_layer"]
        hidden = cfg.get("hidden_size") or cfg["n_embd"]
    except KeyError as e:
        raise ZoftError(f"--mode prefix: the model's config.json has no {e} (layers, heads, width); prefix tuning "
                        "needs a decoder with multi-head attention") from None
    kv = cfg.get("num_key_value_heads") or heads
    return PrefixShape(tokens, layers, kv, cfg.get("head_dim") or hidden // heads)


class PrefixSlot:
    """Layer `layer`'s view of a prefix: what a native attention module holds as ``zoft_prefix``."""

    def __init__(self, prefix: Prefix, layer: int):
        self.prefix, self.layer = prefix, layer

    def kv(self, bank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (R, kv_heads, P_v, head_dim): R = 1 for θ, or the rows of a (R, D) bank."""
        sh = self.prefix.shape
        src = self.prefix.theta[None] if bank is None else bank
        x = src.view(src.shape[0], sh.tokens, 2 * sh.layers, sh.kv_heads, sh.head_dim)
        return x[:, :, 2 * self.layer].transpose(1, 2), x[:, :, 2 * self.layer + 1].transpose(1, 2)


class Prefix:
    """θ (peft's prompt_embeddings, a view of one flat store) and a slot per layer."""

    def __init__(self, shape: PrefixShape, device, dtype: torch.dtype):
        self.shape = shape
        self.store = torch.zeros(shape.numel, device=device, dtype=dtype)
        # a Parameter over the store: the adamw baseline sets requires_grad and the slots' views carry the graph
        self.theta = nn.Parameter(self.store.view(shape.tokens, -1), requires_grad=False)
        self.slots = [PrefixSlot(self, layer) for layer in range(shape.layers)]

    @torch.no_grad()
    def fill(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """θ from each layer's (keys, values), each (kv_heads, P_v, head_dim)."""
        sh = self.shape
        if len(kv) != sh.layers:
            raise ZoftError(f"--mode prefix: the model gave keys and values for {len(kv)} layers, its config says "
                            f"{sh.layers}")
        x = self.theta.view(sh.tokens, 2 * sh.layers, sh.kv_heads, sh.head_dim)
        for layer, (k, v) in enumerate(kv):
            x[:, 2 * layer] = k.transpose(0, 1)
            x[:, 2 * layer + 1] = v.transpose(0, 1)


def random_tokens(vocab: int, n: int, seed: int) -> torch.Tensor:
    """MeZO's init_by_real_act draws the prefix's tokens uniformly from the vocabulary; here from a private
    generator seeded by the run seed (a replay draws the same)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + 7919) % 2**62)
    return torch.randint(0, vocab, (n,), generator=gen)


@torch.no_grad()
def native_kv(model: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's cached (keys, values) for the tokens `ids` at positions 0..n-1, (kv_heads, n, head_dim)
    each: the keys after RoPE, as a KV cache holds them. Call it before the prefix is attached."""
    dev = model.lm_head_weight.device
    ids = ids.to(dev)[None]
    pos = torch.arange(ids.shape[1], device=dev)[None]
    caches = [{} for _ in model.blocks]
    h, ctx = model.embed(ids, pos), model.position_context(pos)
    for layer, cache in zip(model.blocks, caches, strict=True):
        h = layer(h, None, ctx, cache)
    return [(c["k"][0], c["v"][0]) for c in caches]


@torch.no_grad()
def hf_kv(model: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same from a transformers model's own KV cache."""
    dev = next(model.parameters()).device
    out = model(input_ids=ids.to(dev)[None], use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers >= 5.2x renamed it
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def attach_native(model: nn.Module, prefix: Prefix) -> None:
    """Give every block's attention its slot, and shift the real tokens' positions by P_v (module docstring)."""
    for block, slot in zip(model.blocks, prefix.slots, strict=True):
        block.self_attn.zoft_prefix = slot
    model.prefix_len = prefix.shape.tokens


def peft_config(shape: PrefixShape, base_model: str) -> dict:
    """adapter_config.json as peft writes it for PrefixTuningConfig (inference mode, no projection)."""
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": shape.tokens,
        "token_dim": shape.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": shape.kv_heads,
        "num_layers": shape.layers,
        "encoder_hidden_size": shape.token_dim,
        "prefix_projection": False,
        "modules_to_save": None,
    }


def save_prefix(prefix: Prefix, out_dir: str, base_model: str) -> None:
    """adapter_config.json + adapter_model.safetensors (prompt_embeddings) that PeftModel.from_pretrained loads."""
    from safetensors.torch import save_file

    from zoft.lora import _atomic_write

    os.makedirs(out_dir, exist_ok=True)
    config = json.dumps(peft_config(prefix.shape, base_model), indent=2).encode()
    _atomic_write(os.path.join(out_dir, "adapter_config.json"), config)
    tmp = os.path.join(out_dir, ".adapter_model.safetensors.tmp")
    save_file({"prompt_embeddings": prefix.theta.detach().float().cpu().contiguous()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "adapter_model.safetensors"))


def check_adapter_config(ac: dict, shape: PrefixShape | None, where: str) -> int:
    """A prefix adapter's config against the model's prefix shape (None: only its own fields); its P_v."""
    try:
        if ac.get("prefix_projection"):
            raise ZoftError(f"{where}: a prefix trained with prefix_projection (an MLP over the prefix) cannot be "
                            "loaded as a plain prefix; save it from peft after merging the projection")
        tokens = int(ac["num_virtual_tokens"])
        found = PrefixShape(tokens, int(ac["num_layers"]), int(ac["num_attention_heads"]),
                            int(ac["token_dim"]) // int(ac["num_attention_heads"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ZoftError(f"{where} lacks or mistypes {e}; pass a prefix-tuning adapter saved by zoft or peft") from None
    if shape is not None and found != shape:
        raise ZoftError(f"{where} holds a prefix for {found.layers} layers × {found.kv_heads} KV heads × "
                        f"{found.head_dim} dims, this model needs {shape.layers} × {shape.kv_heads} × "
                        f"{shape.head_dim}; was it trained on another model?")
    return tokens


def load_prefix(prefix: Prefix, adapter_dir: str) -> None:
    """Load a PREFIX_TUNING adapter (ours or peft's) into θ."""
    from zoft.files import load_tensors, read_json

    cfg_file = os.path.join(adapter_dir, "adapter_config.json")
    if os.path.isfile(cfg_file):
        check_adapter_config(read_json(cfg_file, "adapter config", "the adapter is damaged"), prefix.shape, cfg_file)
    f = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.exists(f):
        raise ZoftError(f"{adapter_dir} holds no adapter_model.safetensors; pass a folder saved by zoft or peft")
    sd = load_tensors(f, "the adapter is damaged")
    t = sd.get("prompt_embeddings")
    if t is None:
        raise ZoftError(f"adapter {f} has no tensor prompt_embeddings; is it a prefix-tuning adapter?")
    if t.shape != prefix.theta.shape:
        raise ZoftError(f"adapter tensor prompt_embeddings has shape {tuple(t.shape)}, the model wants "
                        f"{tuple(prefix.theta.shape)}")
    with torch.no_grad():
        prefix.theta.copy_(t)
