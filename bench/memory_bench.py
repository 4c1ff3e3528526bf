"""Peak memory of a MeZO step vs a backprop+AdamW step vs inference, same model, batch and lengths.

Random weights of the real shapes (memory does not depend on their values). Modes: LoRA (r=8, q/v, all
blocks) and full parameters. On CUDA the allocator's peak is measured; on CPU the numbers are not
meaningful and the script says so.

    python bench/memory_bench.py --preset smollm2-135m --device cuda --dtype float32
    python bench/memory_bench.py --preset smollm2-135m --device cuda --layers top8  # as zoft train --layers top8
    python bench/memory_bench.py --preset tiny --device cpu                         # smoke test
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from zoft.config import parse_layers
from zoft.engine.native import NativeEngine
from zoft.lora import LoraArgs, inject_lora
from zoft.models.llama import PRESETS, Llama, LlamaArgs
from zoft.tasks.encode import Encoded
from zoft.train.losses import row_losses
from zoft.zo.trainable import direction_seeds, full_trainable, inplace_step, lora_trainable, rows_step
from zoft.zo.update import sgd_update_

PRESETS = PRESETS | {"tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)}


def batch(n, vocab, seed=0, lo=10, hi=60):
    r = random.Random(seed)
    return [Encoded([1] + [r.randrange(3, vocab) for _ in range(r.randint(lo, hi))],
                    [[r.randrange(3, vocab)], [r.randrange(3, vocab)]], r.randrange(2), "mc") for _ in range(n)]


def build(preset, dtype, device, mode, layers=""):
    torch.manual_seed(0)
    with torch.device("meta"):
        m = Llama(LlamaArgs(**PRESETS[preset]))
    m = m.to(dtype).to_empty(device=device)
    for p in m.parameters():
        p.data.normal_(0, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
        p.requires_grad_(False)
    if mode == "lora":
        loras = inject_lora(m, m.block_prefix, ["q_proj", "v_proj"], parse_layers(layers, len(m.blocks)), LoraArgs())
        return m, loras, lora_trainable(loras)
    m.float()
    return m, None, full_trainable(m, None)


def first_block(model, layers: str) -> int:
    chosen = parse_layers(layers, len(model.blocks))
    return 0 if chosen is None else min(chosen)


def mezo_step(eng, b, loras, tr, seeds) -> None:
    """One MeZO step: LoRA as ±ε rows of one forward, full parameters in place."""
    if loras is not None:
        _, _, g = rows_step(lambda r: row_losses(eng.scores(b, r, True), b, "candidate"), loras, seeds, 1e-2)
    else:
        _, _, g = inplace_step(lambda: row_losses(eng.scores(b, 1, True), b, "candidate")[0], tr, seeds, 1e-3)
    sgd_update_(tr, seeds, g, 1e-6, 0.0)


def peak(device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return round(torch.cuda.max_memory_allocated() / 2**20, 1), round(base / 2**20, 1)
    fn()
    return None, None


def measure_mode(mode, a, dev, lo, hi) -> dict:
    """Peaks of inference, a MeZO step and a backprop+AdamW step for one mode (a fresh model each)."""
    model, loras, tr = build(a.preset, getattr(torch, a.dtype), dev, mode, a.layers if mode == "lora" else "")
    k = first_block(model, a.layers if mode == "lora" else "")  # frozen blocks below it: no grad, run once
    eng = NativeEngine(model, first_trained=k)
    eng_bp = NativeEngine(model, first_trained=k, varlen=False)  # the attention path `zoft train --optimizer adamw` uses
    exs = batch(a.batch_size, model.args.vocab_size, lo=lo, hi=hi)
    b, b_bp = eng.batch(exs), eng_bp.batch(exs)
    seeds = direction_seeds(0, 0, 1)

    def infer():
        with torch.no_grad():
            row_losses(eng.scores(b, 1, True), b, "candidate")

    opt_holder = {}

    def backprop():
        for t in tr.tensors:
            t.requires_grad_(True)
        opt = opt_holder.setdefault("o", torch.optim.AdamW(tr.tensors, lr=1e-6))
        loss = row_losses(eng_bp.scores(b_bp, 1, True, grad=True), b_bp, "candidate")[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for t in tr.tensors:
            t.requires_grad_(False)

    backprop()  # AdamW's state exists from the first step on: measure a steady-state step
    res = {"mode": mode}
    for name, fn in (("inference", infer), ("mezo", lambda: mezo_step(eng, b, loras, tr, seeds)), ("backprop_adamw", backprop)):
        res[name + "_peak_mb"], res[name + "_resident_mb"] = peak(dev, fn)
    if mode == "lora" and dev.type == "cuda":
        del model, loras, tr, eng, eng_bp, opt_holder
        res["mezo_offload_peak_mb"], res["mezo_offload_resident_mb"] = offloaded_lora_peak(a, dev, lo, hi)
    return res


def offloaded_lora_peak(a, dev, lo, hi):
    """A MeZO-LoRA step with the blocks' frozen weights streamed from CPU memory and the vocabulary
    tables kept there (zoft --offload cpu): on the GPU, the LoRA factors, the final norm, the batch's
    activations, the head rows the loss reads and one or two blocks at a time."""
    from zoft.engine.offload import offload_to_host, stream_blocks

    model, loras, tr = build(a.preset, getattr(torch, a.dtype), torch.device("cpu"), "lora", a.layers)
    for m in loras.values():  # trained: on the device before the streamer takes the rest of the blocks
        m.lora_A.data, m.lora_B.data = m.lora_A.data.to(dev), m.lora_B.data.to(dev)
    offload_to_host(model, dev)
    streamer = stream_blocks(model, dev)
    eng = NativeEngine(model, first_trained=first_block(model, a.layers), streamer=streamer)
    b = eng.batch(batch(a.batch_size, model.args.vocab_size, lo=lo, hi=hi))
    seeds = direction_seeds(0, 0, 1)

    mezo_step(eng, b, loras, tr, seeds)
    return peak(dev, lambda: mezo_step(eng, b, loras, tr, seeds))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompt", default="10-60", help="prompt length range, e.g. 10-60 (sst2) or 350-450 (multirc)")
    ap.add_argument("--layers", default="", help="LoRA mode: adapt only these blocks, e.g. top8 (zoft train's "
                    "--layers); both MeZO and backprop then run the blocks below once, without grad")
    a = ap.parse_args()
    dev = torch.device(a.device)
    lo, hi = map(int, a.prompt.split("-"))
    rows = [measure_mode(mode, a, dev, lo, hi) for mode in ("lora", "full")]
    print("| mode | inference peak MB | MeZO step peak MB | backprop+AdamW peak MB (resident before: weights+Adam state) | backprop / MeZO |")
    for r in rows:
        ratio = (r["backprop_adamw_peak_mb"] / r["mezo_peak_mb"]) if r["mezo_peak_mb"] else None
        print(f"| {r['mode']} | {r['inference_peak_mb']} | {r['mezo_peak_mb']} | "
              f"{r['backprop_adamw_peak_mb']} ({r['backprop_adamw_resident_mb']}) | {'n/a' if ratio is None else f'{ratio:.2f}'} |")
        if r.get("mezo_offload_peak_mb"):
            print(f"| {r['mode']}, blocks streamed (--offload cpu) | | {r['mezo_offload_peak_mb']} | | "
                  f"{r['backprop_adamw_peak_mb'] / r['mezo_offload_peak_mb']:.2f} |")
    print(json.dumps({"preset": a.preset, "device": str(dev), "dtype": a.dtype, "batch_size": a.batch_size,
                      "prompt": a.prompt, "layers": a.layers, "rows": rows}))


if __name__ == "__main__":
    main()
