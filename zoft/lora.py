"""LoRA with a bank of per-row perturbations, and PEFT-format save/load.

``LoRALinear`` computes ``y = base(x) + (α/r)·(x Aᵀ) Bᵀ``. During a ZO step the engine stacks the
perturbed copies of the batch along dim 0 (row block p holds perturbation p), and the step's
``zoft.zo.perturbers.LoRARows`` hands each module its ``(A_rows, B_rows)`` of shapes (P, r, in) and
(P, out, r) through ``add_update``'s argument: block p then uses its own (A + c_p·z_A, B + c_p·z_B),
while the frozen base GEMM runs once over all rows and reads its weight once (multi-adapter batching,
as Punica/S-LoRA do). A and B stay float32 whatever the base dtype.

A ``RowBank`` holds every module's rows as views of one flat (P, D) tensor, so a step writes them all
with a few kernels and a CUDA graph refreshes them with one copy.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from zoft.errors import ZoftError


@dataclass
class LoraArgs:
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / r)·B·A."""
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    """Modules to adapt: short names (q, k, v, o, fc1, gate, up, down…) or exact module names."""
    freeze_a: bool = False
    """LoRA-FA: A stays at its initialisation, only B is trained."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ZoftError(f"--lora-r must be a positive integer, got {self.r}")


# The transformers fallback's forward cannot take a rows argument: zoft.engine.hf.HFEngine sets the step's
# LoRARows here for the length of its call, and LoRALinear.forward reads it. Native models pass rows.
FALLBACK_ROWS: ContextVar = ContextVar("zoft_fallback_rows", default=None)


def is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style): a Linear whose weight is stored transposed, (in, out)."""
    return type(m).__name__ == "Conv1D"


def linear_like(m: nn.Module) -> bool:
    """Layers LoRA can wrap: nn.Linear, and transformers' Conv1D."""
    return isinstance(m, nn.Linear) or is_conv1d(m)


def features(m: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear-like layer."""
    if is_conv1d(m):
        return m.weight.shape[0], m.weight.shape[1]
    return m.in_features, m.out_features


class LoRALinear(nn.Module):
    """A frozen linear layer (``nn.Linear``, or GPT-2's transposed ``Conv1D``) plus a trainable float32
    low-rank update; see the module docstring. A and B have PEFT's shapes either way: (r, in), (out, r)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, init_seed: int = 0):
        super().__init__()
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.in_features, self.out_features = features(base)
        self.fan_in_fan_out = is_conv1d(base)  # PEFT's name for a weight stored (in, out)
        dev = base.weight.device
        dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32  # float64 for exact tests
        # PEFT's default initialisation, drawn on the CPU from a private seeded generator: the same A on
        # every device, and a replay rebuilds it from the log's seed
        a = torch.empty(r, self.in_features, dtype=dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=torch.Generator().manual_seed(init_seed))
        self.lora_A = nn.Parameter(a.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dtype))
        self.train_a = True  # False: LoRA-FA, A is held at its initialisation (zoft.zo.lora_trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = FALLBACK_ROWS.get()
        return self.add_update(x, self.base(x), None if rows is None else rows.views.get(self))

    def add_update(self, x: torch.Tensor, y: torch.Tensor, views: tuple | None = None) -> torch.Tensor:
        """y (the base layer's output for x, maybe a slice of a fused GEMM's) plus the low-rank update.
        views: this module's perturbation rows, ((A_rows, B_rows), half split or None); None: θ itself."""
        if views is None:
            d = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        elif views[1] is not None and x.dtype == views[1][0].dtype and not torch.is_grad_enabled():
            return self._rows_half(x, y, views[1])  # no float32 copy of x
        else:
            A, B = views[0]  # (P, r, in), (P, out, r)
            P = A.shape[0]
            xr = x.to(A.dtype).reshape(P, -1, x.shape[-1])  # (P, tokens per row block, in)
            d = torch.bmm(torch.bmm(xr, A.transpose(1, 2)), B.transpose(1, 2)).view(*y.shape)
        return y + (self.scaling * d).to(y.dtype)

    def _rows_half(self, x: torch.Tensor, y: torch.Tensor, rows_half: tuple) -> torch.Tensor:
        """The per-row update on a half-precision base, on CUDA, without casting x to float32.

        rows_half holds (α/r)·A split as hi + lo half parts (~16 bits of A's mantissa, against float32's
        24; x itself is already half) and B in half. x·Aᵀ runs as two half GEMMs with float32
        accumulation and output; the up-projection is one half GEMM that accumulates into y in place
        (cuBLAS beta = 1). Its rounding (t and B to half) is relative to the update, which is already
        below y's own rounding wherever the update is small against y. On an H100 this replaced a float32
        GEMM with 8 output columns (~50 µs a call on OPT-1.3B shapes) and three passes over float32
        copies of x and of the update (docs/LOG.md)."""
        a_hi, a_lo, b = rows_half
        xr = x.reshape(a_hi.shape[0], -1, x.shape[-1])
        t = torch.bmm(xr, a_hi.transpose(1, 2), out_dtype=torch.float32)
        t += torch.bmm(xr, a_lo.transpose(1, 2), out_dtype=torch.float32)
        y.view(xr.shape[0], -1, y.shape[-1]).baddbmm_(t.to(y.dtype), b.transpose(1, 2))
        return y

    def merged_weight(self) -> torch.Tensor:
        delta = self.scaling * (self.lora_B @ self.lora_A)  # (out, in)
        w = self.base.weight.to(self.lora_A.dtype) + (delta.T if self.fan_in_fan_out else delta)
        return w.to(self.base.weight.dtype)


def bank_views(modules, bank: torch.Tensor) -> dict:
    """Each LoRALinear's (rows, half split) as slices of a flat (P, D) bank laid out in `lora_trainable`
    order. On CUDA with a half-precision base, the bank is also converted once for
    LoRALinear._rows_half: α/r times A as half hi + lo parts, and B in half (a few kernels in all)."""
    modules = list(modules)
    plan = _half_plan(modules, bank.device, bank.dtype)
    split = None
    if plan is not None:
        split = tuple(torch.empty(bank.shape, dtype=plan[1], device=bank.device) for _ in range(3))
        _fill_split(bank, plan, split, torch.empty_like(bank))
    return dict(zip(modules, _views(modules, bank, split), strict=True))


def _half_plan(modules, device: torch.device, dtype: torch.dtype) -> tuple[float, torch.dtype] | None:
    """(α/r, half dtype) when the half rows path applies: CUDA, float32 bank, one half base dtype and scaling."""
    half = {m.base.weight.dtype for m in modules}
    scaling = {m.scaling for m in modules}
    if (torch.device(device).type == "cuda" and dtype == torch.float32 and len(half) == 1 and half <= {torch.float16, torch.bfloat16}
            and len(scaling) == 1 and _bmm_out_dtype()):
        return scaling.pop(), half.pop()
    return None


def _fill_split(bank: torch.Tensor, plan: tuple[float, torch.dtype], split: tuple, scratch: torch.Tensor) -> None:
    """Write the half split of `bank` into `split` (hi, lo, B): (α/r)·bank as hi + lo half parts (the A
    slices' values; α/r carried by A) and the bank itself in half (the B slices')."""
    hi, lo, b = split
    torch.mul(bank, plan[0], out=scratch)
    hi.copy_(scratch)
    torch.sub(scratch, hi.float(), out=scratch)
    lo.copy_(scratch)
    b.copy_(bank)


def _views(modules, bank: torch.Tensor, split) -> list[tuple]:
    """Each module's (rows, rows_half) as views of the bank (and of its half split)."""
    P, off, out = bank.shape[0], 0, []
    for m in modules:
        a, b = m.lora_A.numel(), m.lora_B.numel()
        rows = (bank[:, off : off + a].view(P, *m.lora_A.shape), bank[:, off + a : off + a + b].view(P, *m.lora_B.shape))
        rows_half = None if split is None else (
            split[0][:, off : off + a].view(P, *m.lora_A.shape), split[1][:, off : off + a].view(P, *m.lora_A.shape),
            split[2][:, off + a : off + a + b].view(P, *m.lora_B.shape))
        out.append((rows, rows_half))
        off += a + b
    return out


class RowBank:
    """A persistent (P, D) bank of per-row LoRA factors, its half split, and every module's views of them,
    made once per row count P (zoft.zo.perturbers.LoRAPerturber keeps one per P). A step writes θ ± εz into
    `bank` in place and calls refresh(): a few kernels and no views, where bank_views makes ~10 view ops
    per module (milliseconds of host time a step with 48-60 modules, more than an OPT-125m step's GPU time)."""

    def __init__(self, modules: list[LoRALinear], P: int, D: int, dtype: torch.dtype, device: torch.device, plan):
        self.modules = modules
        self.bank = torch.empty(P, D, dtype=dtype, device=device)
        self.plan = plan  # _half_plan's answer when the bank was made
        self.split = None
        if self.plan is not None:
            self.scratch = torch.empty_like(self.bank)
            self.split = tuple(torch.empty(P, D, dtype=self.plan[1], device=device) for _ in range(3))
        self.views = _views(modules, self.bank, self.split)

        self.by_module = dict(zip(modules, self.views, strict=True))

    def matches(self, modules: list[LoRALinear], D: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Still right for these modules and bank shape (the half plan may change, e.g. a new dtype)."""
        return (self.plan == _half_plan(modules, device, dtype) and self.bank.shape[1] == D
                and self.bank.dtype == dtype and self.bank.device == torch.device(device)
                and len(self.modules) == len(modules) and all(a is b for a, b in zip(self.modules, modules)))

    def refresh(self) -> dict:
        """Recompute the half split from `bank` (as bank_views computes it); every module's views."""
        if self.split is not None:
            _fill_split(self.bank, self.plan, self.split, self.scratch)
        return self.by_module


def flatten_lora_(loras: dict[str, LoRALinear]) -> torch.Tensor:
    """Lay every module's A and B out as consecutive slices of one flat tensor (`lora_trainable` order),
    so θ, its snapshot and the update are one tensor each (zoft.zo.Trainable.flat_buffer)."""
    tensors = [t for m in loras.values() for t in (m.lora_A, m.lora_B)]
    store = torch.cat([t.data.reshape(-1) for t in tensors])
    off = 0
    for t in tensors:
        t.data = store[off : off + t.numel()].view(t.shape)
        off += t.numel()
    mask = z_mask(loras, store.device)
    for m in loras.values():
        m.store, m.z_mask = store, mask
    return store


def z_mask(loras: dict[str, LoRALinear], device: torch.device) -> torch.Tensor | None:
    """Over the flat (A, B, A, B, …) vector: 1 where ZO perturbs and updates, 0 on frozen A factors
    (LoRA-FA); None when every factor trains."""
    if all(m.train_a for m in loras.values()):
        return None
    parts = [torch.full((t.numel(),), float(train), dtype=torch.float32)
             for m in loras.values() for t, train in ((m.lora_A, m.train_a), (m.lora_B, True))]
    return torch.cat(parts).to(device)


_BMM_OUT_DTYPE: list[bool] = []


def _bmm_out_dtype() -> bool:
    """Whether torch.bmm takes out_dtype (half inputs, float32 output) on CUDA: torch >= 2.8."""
    if not _BMM_OUT_DTYPE:
        try:
            x = torch.ones(1, 1, 1, dtype=torch.bfloat16, device="cuda")
            _BMM_OUT_DTYPE.append(torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32)
        except (TypeError, RuntimeError):
            _BMM_OUT_DTYPE.append(False)
    return _BMM_OUT_DTYPE[0]


def resolve_targets(model: nn.Module, targets: list[str], short: dict[str, str]) -> list[str]:
    """Map short names (q, v…) to module names (q_proj…), checking each exists as a linear layer (nn.Linear,
    or GPT-2's Conv1D); several short names may map to one module (GPT-2's fused c_attn)."""
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if linear_like(m)}
    names = []
    for t in targets:
        name = short.get(t, t)
        if name not in linear:
            raise ZoftError(
                f"LoRA target {t!r} matches no linear module of this model; "
                f"choose from {sorted(short) or ''} or module names {sorted(linear)}"
            )
        if name not in names:
            names.append(name)
    return names


def inject_lora(
    model: nn.Module,
    block_prefix: str,
    target_names: list[str],
    layers: list[int] | None,
    args: LoraArgs,
    seed: int = 0,
) -> dict[str, LoRALinear]:
    """Replace each targeted nn.Linear inside the chosen blocks by a LoRALinear; returns them by path."""
    pat = re.compile(rf"^{re.escape(block_prefix)}\.(\d+)\.(.+\.)?({'|'.join(map(re.escape, target_names))})$")
    found: dict[str, LoRALinear] = {}
    for name, module in list(model.named_modules()):
        m = pat.match(name)
        if not m or not linear_like(module):
            continue
        if layers is not None and int(m.group(1)) not in layers:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        lora = LoRALinear(module, args.r, args.alpha, init_seed=(seed * 1_000_003 + len(found)) % 2**62)
        lora.train_a = not args.freeze_a
        setattr(parent, name.rsplit(".", 1)[1], lora)
        found[name] = lora
    if not found:
        raise ZoftError(f"no LoRA module was created: targets {target_names} in layers {layers} matched nothing")
    return found


def _peft_key(path: str, which: str) -> str:
    return f"base_model.model.{path}.{which}.weight"


def save_peft(
    loras: dict[str, LoRALinear], out_dir: str, base_model: str, target_names: list[str], args: LoraArgs
) -> None:
    """Write adapter_config.json + adapter_model.safetensors that ``peft.PeftModel.from_pretrained`` loads."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for path, m in loras.items():
        tensors[_peft_key(path, "lora_A")] = m.lora_A.detach().float().cpu().contiguous()
        tensors[_peft_key(path, "lora_B")] = m.lora_B.detach().float().cpu().contiguous()
    layers = sorted({int(re.search(r"\.(\d+)\.", p).group(1)) for p in loras})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": args.r,
        "lora_alpha": args.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(set(target_names)),
        "layers_to_transform": layers,
        "bias": "none",
        "fan_in_fan_out": any(m.fan_in_fan_out for m in loras.values()),
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    _atomic_write(os.path.join(out_dir, "adapter_config.json"), json.dumps(config, indent=2).encode())
    tmp = os.path.join(out_dir, ".adapter_model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "adapter_model.safetensors"))


def load_peft_weights(loras: dict[str, LoRALinear], adapter_dir: str) -> None:
    """Load a PEFT adapter (ours or peft's) into already-injected LoRALinear modules."""
    from zoft.files import load_tensors

    f = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.exists(f):
        raise ZoftError(f"{adapter_dir} holds no adapter_model.safetensors; pass a folder saved by zoft or peft")
    sd = load_tensors(f, "the adapter is damaged")
    sd = {k.replace(".default.weight", ".weight"): v for k, v in sd.items()}
    for path, m in loras.items():
        for which in ("lora_A", "lora_B"):
            key = _peft_key(path, which)
            if key not in sd:
                raise ZoftError(f"adapter {f} has no tensor {key}; was it trained on another model or targets?")
            t = getattr(m, which)
            if sd[key].shape != t.shape:
                raise ZoftError(f"adapter tensor {key} has shape {tuple(sd[key].shape)}, model wants {tuple(t.shape)}")
            with torch.no_grad():
                t.copy_(sd[key])


def read_adapter_config(adapter_dir: str) -> dict:
    f = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.exists(f):
        raise ZoftError(f"{adapter_dir} holds no adapter_config.json; pass a folder saved by zoft or peft")
    from zoft.files import read_json

    return read_json(f, "adapter config", "the adapter is damaged")


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRALinear back into a plain nn.Linear holding W + (α/r)·B·A."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.base.weight.copy_(m.merged_weight())
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], m.base)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
