"""The transformers fallback's engine: the NativeEngine interface over AutoModelForCausalLM (no packing,
no prompt sharing, full logits; each (example, candidate) its own right-padded sequence).

Prefix tuning (zoft.prefix) enters as peft feeds it: a ``DynamicCache`` holding each row block's prefix
keys and values as ``past_key_values`` and the attention mask widened by P_v ones; transformers then
places the tokens after the prefix itself."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from zoft.engine.native import Scores, Stats, score_table
from zoft.engine.packing import Batch, build_batch
from zoft.lora import FALLBACK_ROWS
from zoft.models.common import Rows, expand_rows
from zoft.models.hf import block_prefix
from zoft.tasks.encode import Encoded


class HFEngine:
    """Same interface as NativeEngine, over a transformers model (no packing, full logits)."""

    def __init__(self, model: nn.Module, prefix=None):
        self.model = model
        self.prefix = prefix  # zoft.prefix.Prefix in prefix mode
        # the forward's name for a KV cache: `cache` in recent transformers, `past_key_values` before
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.first_trained = 0
        self.cache = None
        self.stats = Stats()
        self.n_layers = len(model.get_submodule(block_prefix(model)))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def batch(self, encoded: list[Encoded], gold_only: bool = False) -> Batch:
        return build_batch(encoded, self.device, pack_tokens=0, share_prompt=False, gold_only=gold_only,
                           one_per_row=True)

    def scores(self, b: Batch, rows: Rows | int = 1, logits_only: bool = False, grad: bool = False,
               graph: bool = False) -> Scores:
        """grad=True keeps the autograd graph (the first-order baseline); ZO never needs it. `graph` is
        accepted for the engines' common interface: the fallback never records CUDA graphs. The
        transformers forward takes no rows argument: LoRA rows reach LoRALinear through FALLBACK_ROWS
        for the length of this call (zoft.lora); full-parameter rows are refused at attach."""
        rows = Rows(rows) if isinstance(rows, int) else rows
        token = FALLBACK_ROWS.set(rows if hasattr(rows, "views") else None)
        try:
            with torch.set_grad_enabled(grad):
                return self._scores(b, rows, logits_only)
        finally:
            FALLBACK_ROWS.reset(token)

    def _scores(self, b: Batch, rows_: Rows, logits_only: bool) -> Scores:
        p, rows = b.packs, rows_.P
        ids, att = p.ids.repeat(rows, 1), p.valid.long().repeat(rows, 1)
        extra = {}
        if self.prefix is not None:  # row block r's prefix for its N rows, in front of every layer's keys
            from transformers import DynamicCache

            n, dtype = ids.shape[0], next(self.model.parameters()).dtype
            kv = [rows_.prefix_kv(slot) for slot in self.prefix.slots]
            extra[self.cache_arg] = DynamicCache([tuple(expand_rows(t, n).to(dtype) for t in pair) for pair in kv])
            att = torch.cat([att.new_ones(n, self.prefix.shape.tokens), att], dim=1)
        logits = self.model(input_ids=ids, attention_mask=att, **extra).logits.float()  # (P*N, L, V)
        N, L = p.ids.shape
        self.stats.computed += rows * N * L * self.n_layers
        self.stats.naive += rows * b.naive_tokens * self.n_layers
        lp = logits.view(rows, N * L, -1)[:, b.src].log_softmax(-1)
        token_lp = lp.gather(-1, b.tgt.expand(rows, -1)[..., None])[..., 0]
        return score_table(b, token_lp, False)

