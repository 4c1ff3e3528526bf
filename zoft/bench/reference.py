"""The MeZO reference step, as princeton-nlp/MeZO ``large_models/`` writes it, on a transformers model.

Kept apart from zoft's own code: it is what ``zoft bench`` (zoft.bench.harness) measures zoft against,
and tests/test_bench.py pins it to zoft's arithmetic (same z, same L₊ and L₋).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from zoft.errors import ZoftError
from zoft.tasks.encode import Encoded

# ---- the MeZO reference, as princeton-nlp/MeZO large_models/ writes it ------------------------


def mezo_collate(batch: list[Encoded], pad_id: int, device: str) -> dict:
    """DataCollatorWithPaddingAndNesting over train_as_classification features: one sequence per
    (example, candidate), tokenizer.pad with padding_side='left' and pad_to_multiple_of=8."""
    seqs, option_len, labels = [], [], []
    for e in batch:
        for c in e.cand_ids:
            seqs.append(e.prompt_ids + c)
            option_len.append(len(c))
            labels.append(e.answer)
    L = -(-max(map(len, seqs)) // 8) * 8
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :] = torch.tensor(s)
        mask[i, L - len(s) :] = 1
    return {  # tokenizer.pad makes tensors of every feature; the Trainer moves them all to the device
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": torch.tensor(labels, device=device),
        "option_len": torch.tensor(option_len, device=device),
        "num_options": torch.tensor([len(e.cand_ids) for e in batch for _ in e.cand_ids], device=device),
    }


def mezo_loss(model: nn.Module, inputs: dict, pad_id: int) -> torch.Tensor:
    """utils.forward_wrap_with_option_len with num_options: CE over mean option log-likelihoods."""
    input_ids = inputs["input_ids"]
    logits = model(input_ids=input_ids, attention_mask=inputs["attention_mask"]).logits
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = torch.clone(input_ids)[..., 1:].contiguous()
    shift_labels[shift_labels == pad_id] = -100
    for _i, _len in enumerate(inputs["option_len"]):
        shift_labels[_i, :-_len] = -100
    log_probs = F.log_softmax(shift_logits, dim=-1)
    mask = shift_labels != -100
    shift_labels[~mask] = 0
    selected = torch.gather(log_probs, dim=-1, index=shift_labels.unsqueeze(-1)).squeeze(-1)
    selected = (selected * mask).sum(-1) / mask.sum(-1)  # (B·K,)
    num_options = inputs["num_options"]
    if any(x != num_options[0] for x in num_options):
        raise ZoftError("the benchmark's workloads give every example the same number of candidates")
    k = int(num_options[0])
    return F.cross_entropy(selected.view(-1, k), inputs["labels"].view(-1, k)[:, 0])


class MezoLoRALinear(nn.Linear):
    """MeZO's lora.LoRALinear (from loralib): y = x Wᵀ + b + (x Aᵀ Bᵀ)·α/r, A kaiming, B zero.

    It takes over the original weight and bias as MeZO's ``LoRA`` does (``weight.data = original``).
    A and B get the base weight's dtype, as MeZO's float16 path (``.half()``) gives; its bfloat16 path
    leaves them float32 and then fails on mixed dtypes, so that is the one liberty taken here."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Parameter(self.weight.new_zeros((r, self.in_features)))
        self.lora_B = nn.Parameter(self.weight.new_zeros((self.out_features, r)))
        self.weight.requires_grad = False
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, bias=self.bias)
        result += (x @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)) * self.scaling
        return result


def inject_mezo_lora(model: nn.Module, r: int = 8, alpha: float = 16.0) -> None:
    """MeZO's ``LoRA(model, r, alpha)``: q_proj and v_proj of every module whose name ends in "attn"
    (OPT's self_attn; the same names serve the Llama family), then freeze every non-LoRA parameter."""
    found = 0
    for key, module in list(model.named_modules()):
        if key.endswith("attn") and isinstance(getattr(module, "q_proj", None), nn.Linear):
            module.q_proj = MezoLoRALinear(module.q_proj, r, alpha)
            module.v_proj = MezoLoRALinear(module.v_proj, r, alpha)
            found += 1
    if not found:
        raise ZoftError(f"MeZO's LoRA finds no attention module with q_proj/v_proj in {type(model).__name__}")
    for n, p in model.named_parameters():
        if "lora" not in n:
            p.requires_grad = False


def mezo_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """zo_step's named_parameters_to_optim."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def mezo_step(
    model: nn.Module,
    params: list[tuple[str, nn.Parameter]],
    inputs: dict,
    seed: int,
    eps: float,
    lr: float,
    weight_decay: float,
    pad_id: int,
    z_fn: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, float, float]:
    """zo_step then zo_update; returns (loss1, loss2, projected_grad).

    z_fn(name, param) replaces the global-generator draw (tests use it to give both sides the same z)."""

    def draw(name: str, p: torch.Tensor) -> torch.Tensor:
        if z_fn is not None:
            return z_fn(name, p).to(p.dtype)
        return torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)

    def zo_perturb_parameters(scaling_factor: float) -> None:
        torch.manual_seed(seed)
        for name, param in params:
            z = draw(name, param)
            param.data = param.data + scaling_factor * z * eps

    def zo_forward() -> torch.Tensor:
        model.eval()
        with torch.inference_mode():
            return mezo_loss(model, inputs, pad_id).detach()

    zo_perturb_parameters(1)
    loss1 = zo_forward()
    zo_perturb_parameters(-2)
    loss2 = zo_forward()
    projected_grad = ((loss1 - loss2) / (2 * eps)).item()
    zo_perturb_parameters(1)

    torch.manual_seed(seed)  # zo_update
    for name, param in params:
        z = draw(name, param)
        if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
            param.data = param.data - lr * (projected_grad * z + weight_decay * param.data)
        else:
            param.data = param.data - lr * (projected_grad * z)
    return float(loss1), float(loss2), projected_grad
