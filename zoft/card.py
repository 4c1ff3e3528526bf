"""A short model card (README.md) beside the adapter: base model, task, method, metrics, and the command
that re-runs the training. The Hub shows it; `AutoPeftModelForCausalLM` ignores it."""

from __future__ import annotations

import os

from zoft.config import TrainConfig
from zoft.version import __version__


def write_model_card(adapter_dir: str, cfg: TrainConfig, base: str, task: str, result: dict) -> None:
    zc = cfg.zo
    method = ("MeZO (zeroth-order SGD, two-sided SPSA)" if zc.optimizer == "zo-sgd" else "backprop + AdamW (baseline)")
    lora = f"LoRA r={zc.lora_r}, alpha={zc.lora_alpha:g} on {', '.join(zc.lora_targets)}" + (
        f", blocks {zc.layers}" if zc.layers else "") + (", A frozen (LoRA-FA)" if zc.lora_freeze_a else "")
    kind = "LoRA"
    if zc.mode == "prefix":
        kind, lora = "Prefix-tuning", f"prefix tuning, {zc.prefix_tokens} virtual tokens per layer (PREFIX_TUNING)"
    names = ("accuracy",) if result.get("metric", "accuracy") == "accuracy" else ("f1", "exact_match")
    metrics = {f"{when}_{m}": result.get(f"{when}_{m}") for m in names for when in ("zero_shot", "best_dev", "final")}
    metrics["metric"] = result.get("metric")
    rows = "\n".join(f"| {k} | {v if not isinstance(v, float) else f'{v:.4f}'} |" for k, v in metrics.items()
                     if v is not None)
    text = f"""---
base_model: {base}
library_name: peft
tags: [zoft, mezo, {kind.lower()}, zeroth-order]
---

# {kind} adapter for {os.path.basename(base.rstrip('/')) or base}, trained with zoft {__version__}

- **Base model:** `{base}`
- **Task:** `{task}` ({cfg.task.n_train} training examples asked, seed {cfg.run.seed})
- **Method:** {method}, {cfg.run.steps} steps, lr {zc.lr_value:g}, eps {zc.eps_value:g}, batch {zc.batch_size}, {zc.directions} direction(s)
- **Adapter:** {lora}

| metric | value |
|---|---|
{rows}

```python
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained("{os.path.abspath(adapter_dir)}")
```

Re-run: `zoft train --config {os.path.abspath(os.path.join(adapter_dir, os.pardir, 'zoft_config.json'))} --output-dir NEW_DIR`
"""
    with open(os.path.join(adapter_dir, "README.md"), "w") as f:
        f.write(text)
