"""`zoft bench`: zoft's ZO step against the MeZO reference step and a plain forward, on the same batches.

Three things are timed, each the median over --steps after --warmup, with torch.cuda.synchronize()
around every timed region:

1. **MeZO reference step** — princeton-nlp/MeZO ``large_models/trainer.py`` (``zo_step`` + ``zo_update``),
   re-implemented as written on the ``transformers`` model: ``torch.manual_seed(seed)`` on the global
   generator, then for each trainable parameter ``z = torch.normal(0, 1, size)`` and
   ``p.data = p.data + scaling·z·ε`` (scaling +1, forward, −2, forward, +1), then the update pass that
   reseeds and regenerates z. Its batch is MeZO's ``train_as_classification`` batch: one sequence per
   (example, candidate), left-padded to the longest (a multiple of 8), full-vocabulary logits at every
   position, loss = cross-entropy over the candidates' mean token log-likelihoods
   (``utils.forward_wrap_with_option_len``). LoRA mode injects MeZO's own ``LoRALinear`` into q_proj and
   v_proj and perturbs its A/B in place the same way.
2. **plain forward** — one ``model(input_ids, attention_mask)`` over that padded batch, no grad, no LoRA:
   what inference on MeZO's layout costs. The two steps are also given in units of it.
3. **zoft step** — ``zoft.train.step_losses`` + ``zoft.zo.sgd_update_`` through a native session: packed
   rows, each prompt encoded once for its candidates, ±ε LoRA rows in one forward, logits only where the
   loss reads them. Building zoft's batch (packing, masks, the copy to the device) is inside the timed
   step; the reference's collation is not (MeZO's DataLoader does it), so the comparison leans to MeZO.
   LoRA steps are timed twice: synchronously (median of per-step times, each step waits for its own
   losses) and pipelined as ``zoft train`` runs them (the update queued with g on the device, step i's
   losses read once step i+1 is queued; the --steps timed batches in a cycle of at least 50 steps,
   after every timed batch has met its CUDA graph twice; window time / steps). The
   pipelined figure is ``zoft_step_ms``, what a training run sees per step; the reference cannot
   pipeline (MeZO reads g with ``.item()`` before its update), so its per-step time is its throughput.

Both sides hold the same random weights: a preset's config (zoft.models.opt/llama PRESETS) is
initialised once with ``from_config`` on the device and saved to a temporary folder that zoft then loads.
Peak memory is ``torch.cuda.max_memory_allocated`` over each measurement, weights included, with each
side alone on the device; on CPU it is not measured (null). Inputs are synthetic token ids drawn with a
fixed seed at realistic lengths (WORKLOADS); the numbers do not depend on what the tokens say.
"""

from __future__ import annotations

import gc
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from zoft.bench.reference import inject_mezo_lora, mezo_collate, mezo_params, mezo_step
from zoft.config import ModelConfig, ZOConfig
from zoft.errors import ZoftError
from zoft.loading import DTYPES, resolve
from zoft.models import llama, opt
from zoft.session import attach, load_session, make_engine, pick_device, resolve_alias
from zoft.tasks.encode import Encoded
from zoft.train.pipeline import HostCopy, snapshot
from zoft.train.step import step_losses
from zoft.zo.trainable import direction_seeds
from zoft.zo.update import sgd_update_

# ---- workloads: synthetic batches at the lengths of the real tasks ------------------------------


@dataclass
class Workload:
    """Token lengths of one task under MeZO's templates."""

    prompt_len: tuple[int, int, int]  # (low, high, mode) of a triangular distribution, template included
    cand_len: tuple[int, int]  # each candidate's length, uniform in [low, high]
    n_cands: int
    fixed_cands: bool  # the same candidate tokens for every example (SST-2's " terrible"/" great")


WORKLOADS = {
    "sst2": Workload(prompt_len=(10, 60, 20), cand_len=(1, 1), n_cands=2, fixed_cands=True),  # mean 30
    "multirc": Workload(prompt_len=(350, 450, 400), cand_len=(1, 3), n_cands=2, fixed_cands=False),
}
LOW_ID = 10  # synthetic ids stay above the special tokens (pad, bos, eos, unk)


def make_batch(w: Workload, n: int, vocab_size: int, bos_id: int | None, seed: int) -> list[Encoded]:
    """n examples: [bos] + random ids ending in a fixed two-token template (" It was"), candidates after."""
    rng = random.Random(seed)
    fixed = random.Random(0)  # template and fixed candidates: the same in every batch
    hi = vocab_size - 1
    template = [fixed.randint(LOW_ID, hi) for _ in range(2)]
    fixed_cands = [[fixed.randint(LOW_ID, hi)] for _ in range(w.n_cands)]
    out = []
    for _ in range(n):
        length = round(rng.triangular(*w.prompt_len))
        head = [bos_id] if bos_id is not None else []
        body = [rng.randint(LOW_ID, hi) for _ in range(max(1, length - len(head) - len(template)))]
        if w.fixed_cands:
            cands = [list(c) for c in fixed_cands]
        else:
            cands = [[rng.randint(LOW_ID, hi) for _ in range(rng.randint(*w.cand_len))] for _ in range(w.n_cands)]
        out.append(Encoded(head + body + template, cands, rng.randrange(w.n_cands), "mc"))
    return out


def token_counts(batch: list[Encoded], pad_multiple: int = 8) -> dict:
    """Useful tokens vs. what MeZO's padded layout computes. Useful: each prompt once, and each candidate's
    tokens but its last (no score reads the last token's hidden state; zoft.engine.make_segment)."""
    seqs = [len(e.prompt_ids) + len(c) for e in batch for c in e.cand_ids]
    padded = -(-max(seqs) // pad_multiple) * pad_multiple
    useful = sum(len(e.prompt_ids) + sum(len(c) - 1 for c in e.cand_ids) for e in batch)
    return {"useful": useful, "reference": len(seqs) * padded}


# ---- models: a preset's config with random weights, shared by both sides -----------------------


def preset_config(name: str):
    """A transformers config with the shapes of a published checkpoint (zoft.models.*.PRESETS)."""
    import transformers

    if name in opt.PRESETS:
        shape = dict(opt.PRESETS[name])
        shape.setdefault("word_embed_proj_dim", shape["hidden_size"])
        return transformers.OPTConfig(vocab_size=50272, max_position_embeddings=2048, pad_token_id=1,
                                      bos_token_id=2, eos_token_id=2, dropout=0.0, **shape)
    if name in llama.PRESETS:
        return transformers.LlamaConfig(bos_token_id=1, eos_token_id=2, **llama.PRESETS[name])
    raise ZoftError(f"--model {name!r} is neither a preset ({', '.join(presets())}) nor a model folder")


def presets() -> list[str]:
    return sorted(opt.PRESETS) + sorted(llama.PRESETS)


def write_stub_tokenizer(folder: str) -> None:
    """load_session wants a tokenizer; the benchmark feeds token ids, so a three-word one does."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "</s>": 2}, unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    fast.save_pretrained(folder)


def load_reference(spec: str, dtype: torch.dtype, device: str, tmp: str) -> tuple[nn.Module, str]:
    """(transformers model on `device`, folder holding the same weights for zoft)."""
    from transformers import AutoModelForCausalLM

    if spec in opt.PRESETS or spec in llama.PRESETS:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(preset_config(spec), dtype=dtype)
        model.save_pretrained(tmp)
        write_stub_tokenizer(tmp)
        return model.eval(), tmp
    folder = resolve(resolve_alias(spec))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    return model.eval(), folder


# ---- timing ---------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    fn: Callable[[int], object], warmup: int, steps: int, device: str, label: str
) -> tuple[list[float], float | None]:
    """fn(i) for i in range(warmup + steps); (per-step milliseconds of the last `steps`, peak MiB or None)."""
    cuda = device.startswith("cuda")
    for i in range(warmup):
        fn(i)
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup, warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        fn(i)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        log(f"  {label} {i - warmup + 1}/{steps}: {times[-1]:.1f} ms")
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return times, peak


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


@dataclass
class Phase:
    """One side's measurements."""

    times: list[float]
    peak: float | None
    extra: dict


def reference_phase(ref: nn.Module, inputs: list[dict], zc: ZOConfig, seed: int, warmup: int, steps: int,
                    device: str) -> tuple[Phase, Phase]:
    """The plain forward, then MeZO's step (LoRA injected after the forward is timed)."""
    cfg = ref.config
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0  # MeZO: Llama pads with 0

    def forward(i: int) -> None:
        with torch.inference_mode():
            ref(input_ids=inputs[i]["input_ids"], attention_mask=inputs[i]["attention_mask"])

    log("plain transformers forward")
    fwd = Phase(*measure(forward, warmup, steps, device, "forward"), {})

    if zc.mode == "lora":
        inject_mezo_lora(ref, zc.lora_r, zc.lora_alpha)
    else:
        for p in ref.parameters():
            p.requires_grad_(True)
    params = mezo_params(ref)
    rng = random.Random(seed)  # MeZO: np.random.randint(1000000000) per step
    step_seeds = [rng.randrange(1_000_000_000) for _ in inputs]

    def step(i: int) -> None:
        mezo_step(ref, params, inputs[i], step_seeds[i], zc.eps_value, zc.lr_value, zc.weight_decay, pad_id)

    log("MeZO reference step")
    times, peak = measure(step, warmup, steps, device, "reference")
    return fwd, Phase(times, peak, {"reference_trainable": sum(p.numel() for _, p in params)})


def zoft_phase(folder: str, dtype: str, batches: list[list[Encoded]], zc: ZOConfig, seed: int, warmup: int,
               steps: int, device: str, random_weights: bool = False, offload: str = "none") -> Phase:
    """zoft's step through a native session loaded from `folder` (random_weights: built on the device
    from the folder's config alone)."""
    log("zoft step")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    s = load_session(ModelConfig(model=folder, device=device, dtype=dtype, offload=offload), random_weights=random_weights)
    attach(s, zc)
    engine = make_engine(s)

    ahead: dict = {}
    lazy = s.loras is not None  # zoft train pipelines LoRA steps (zoft.train.loop): g stays on the device

    def step(i: int, read_now: bool = True, nxt_i: int | None = None):
        """One step as zoft train runs it: batch i+1 (or nxt_i) is packed while step i's forward runs; LoRA
        steps queue their update with g on the device and start copying the losses to the host. read_now:
        wait for them (a synchronous step); otherwise return them to read after the next step is queued."""
        dirs = direction_seeds(seed, i, zc.directions)
        nxt_i = i + 1 if nxt_i is None else nxt_i
        nxt = batches[nxt_i] if nxt_i < len(batches) else None
        lp, lm, grads = step_losses(engine, s, batches[i], "candidate", dirs, zc.eps_value,
                                    packed=ahead.pop("packed", None), next_batch=nxt, ahead=ahead, lazy=lazy)
        if not lazy:
            sgd_update_(s.trainable, dirs, grads, zc.lr_value, zc.weight_decay)
            return None
        snapshot(s)  # the guard's copy, as in the train loop
        sgd_update_(s.trainable, dirs, grads, zc.lr_value, zc.weight_decay)
        pending = HostCopy(torch.cat([lp, lm, grads]))
        return pending.read() if read_now else pending

    if engine.graphs is not None:  # meet every timed batch's shape twice first, so its CUDA graph is recorded
        for i in list(range(warmup, warmup + steps)) * 2:  # (as in a long run, where shapes repeat)
            step(i)
        ahead.clear()
    times, peak = measure(step, warmup, steps, device, "zoft")
    piped = pipelined_ms(step, ahead, engine, warmup, steps, device) if lazy else None
    build_ms = []
    for b in batches[warmup:]:
        t0 = time.perf_counter()
        packed = engine.batch(b)
        _sync(device)
        build_ms.append((time.perf_counter() - t0) * 1e3)
    base = next(p for n, p in s.model.named_parameters() if "lora" not in n)
    trained = s.trainable.tensors[0]
    return Phase(times, peak, {
        "zoft_full_step": s.full_step if zc.mode == "full" else None,
        "zoft_trained_dtype": str(trained.dtype).removeprefix("torch."),
        "zoft_weights_gb": round(sum(p.numel() * p.element_size() for p in s.model.parameters()) / 1e9, 3),
        "zoft_step_pipelined_ms": None if piped is None else round(piped, 3),
        "zoft_batch_build_ms": round(statistics.median(build_ms), 3),
        "zoft_trainable": s.trainable.numel(),
        "zoft_path": s.path,
        "zoft_fused_groups": engine.fused,
        "zoft_weights_dtype": str(base.dtype).removeprefix("torch."),
        "zoft_tokens": packed.packs.ids.numel(),  # of the last batch
        "zoft_offload": offload,
        "zoft_streamed_gib_per_pass": None if engine.streamer is None else round(engine.streamer.bytes_per_pass / 2**30, 2),
        "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),  # Linux: KiB
        **engine.stats.summary(),
    })


def pipelined_ms(step, ahead: dict, engine, warmup: int, steps: int, device: str) -> float:
    """The train loop's pipeline: step i's losses are read after step i+1 is queued. The timed batches run
    in a cycle of at least 50 steps, so filling and draining the pipeline (one step's latency) is a small
    part of the window, as in a training run; ms a step."""
    order = list(range(warmup, warmup + steps)) * -(-50 // steps)
    recorded = engine.graphs.captures if engine.graphs is not None else 0  # every timed shape's, recorded before
    ahead.clear()
    _sync(device)
    t0, pending = time.perf_counter(), None
    for k, i in enumerate(order):
        nxt = step(i, read_now=False, nxt_i=order[(k + 1) % len(order)])
        if pending is not None:
            pending.read()
        pending = nxt
    pending.read()
    _sync(device)
    piped = (time.perf_counter() - t0) * 1e3 / len(order)
    if engine.graphs is not None and engine.graphs.captures != recorded:
        log(f"  note: {engine.graphs.captures - recorded} graph recordings fell in the timed window")
    log(f"  zoft pipelined: {piped:.2f} ms a step over {len(order)} steps")
    return piped


def run_bench(
    model: str,
    workload: str = "sst2",
    mode: str = "lora",
    dtype: str = "float32",
    device: str = "cpu",
    steps: int = 10,
    warmup: int = 3,
    batch_size: int = 16,
    seed: int = 0,
    reference: bool = True,
    full_step: str = "auto",
    master_dtype: str = "auto",
    offload: str = "none",
    layers: str = "",
) -> dict:
    """Measure the three steps (module docstring) and return the result dict that `report` prints.
    reference=False: zoft's step alone, on random weights built on the device from the preset's config."""
    if workload not in WORKLOADS:
        raise ZoftError(f"--workload must be one of {sorted(WORKLOADS)}, got {workload!r}")
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ZoftError("--steps and --batch-size must be at least 1, --warmup at least 0")
    if not reference and model not in presets():
        raise ZoftError(f"--reference none builds random weights from a preset ({', '.join(presets())})")
    device = pick_device(device)
    zc = ZOConfig(mode=mode, batch_size=batch_size, full_step=full_step, master_dtype=master_dtype, layers=layers)

    with tempfile.TemporaryDirectory(prefix="zoft-bench-") as tmp:
        log(f"zoft bench: {model} ({dtype}, {device}): building the transformers model" if reference
            else f"zoft bench: {model} ({dtype}, {device}): zoft alone, random weights")
        if reference:
            ref, folder = load_reference(model, DTYPES[dtype], device, tmp)
            cfg = ref.config
        else:
            cfg, folder = preset_config(model), tmp
            cfg.save_pretrained(tmp)
            write_stub_tokenizer(tmp)
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        batches = [make_batch(WORKLOADS[workload], batch_size, cfg.vocab_size, cfg.bos_token_id, seed * 100003 + i)
                   for i in range(warmup + steps)]
        fwd = refp = None
        if reference:
            inputs = [mezo_collate(b, pad_id, device) for b in batches]
            fwd, refp = reference_phase(ref, inputs, zc, seed, warmup, steps, device)
            del ref, inputs  # each side alone on the device
            _free(device)
        zo = zoft_phase(folder, dtype, batches, zc, seed, warmup, steps, device, not reference, offload)
        _free(device)

    return summarize(model, workload, mode, dtype, device, steps, warmup, batch_size, batches, fwd, refp, zo)


def summarize(model: str, workload: str, mode: str, dtype: str, device: str, steps: int, warmup: int,
              batch_size: int, batches: list, fwd: Phase | None, refp: Phase | None, zo: Phase) -> dict:
    """The result dict `report` prints: the medians, their ratios, the token counts, the versions."""
    counts = token_counts(batches[-1])
    sync_ms = statistics.median(zo.times)
    ref_ms, fwd_ms = (statistics.median(p.times) if p else None for p in (refp, fwd))
    piped = zo.extra.pop("zoft_step_pipelined_ms")
    zoft_ms = piped if piped is not None else sync_ms  # what a training run sees per step
    mb = lambda x: None if x is None else round(x, 1)
    ratio = lambda a, b: None if a is None or b is None else round(a / b, 3)
    return {
        "model": model,
        "workload": workload,
        "mode": mode,
        "dtype": dtype,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "reference_step_ms": None if ref_ms is None else round(ref_ms, 3),
        "forward_ms": None if fwd_ms is None else round(fwd_ms, 3),
        "zoft_step_ms": round(zoft_ms, 3),
        "zoft_step_sync_ms": round(sync_ms, 3),
        "zoft_pipelined": piped is not None,
        "reference_peak_mb": mb(refp.peak) if refp else None,
        "forward_peak_mb": mb(fwd.peak) if fwd else None,
        "zoft_peak_mb": mb(zo.peak),
        "speedup_vs_reference": ratio(ref_ms, zoft_ms),
        "speedup_vs_reference_sync": ratio(ref_ms, sync_ms),
        "zoft_step_over_forward": ratio(zoft_ms, fwd_ms),
        "reference_step_over_forward": ratio(ref_ms, fwd_ms),
        "zoft_peak_over_forward_peak": ratio(zo.peak, fwd.peak if fwd else None),
        "useful_tokens": counts["useful"],
        "reference_tokens": counts["reference"],
        "reference_tokens_over_useful": round(counts["reference"] / counts["useful"], 3),
        **(refp.extra if refp else {}),
        **zo.extra,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }


def report(r: dict) -> None:
    """The table, then one JSON line (the last line of stdout) for scripts."""
    num = lambda k, f="10.1f": f"{r[k]:{f}}" if r.get(k) is not None else f"{'-':>10}"
    over = lambda ms: f"{ms / r['forward_ms']:11.2f}" if r["forward_ms"] else f"{'-':>11}"
    print(f"zoft bench: {r['model']} {r['workload']} {r['mode']} {r['dtype']} on {r['device_name']}, "
          f"batch {r['batch_size']}, median of {r['steps']} after {r['warmup']} warm-up")
    print(f"{'':24}{'ms':>10}{'× forward':>11}{'peak MiB':>10}")
    if r["reference_step_ms"] is not None:
        print(f"{'MeZO reference step':24}{num('reference_step_ms')}{over(r['reference_step_ms'])}"
              f"{num('reference_peak_mb', '10.0f')}")
        print(f"{'transformers forward':24}{num('forward_ms')}{over(r['forward_ms'])}{num('forward_peak_mb', '10.0f')}")
    if r["zoft_pipelined"]:
        print(f"{'zoft step, synchronous':24}{num('zoft_step_sync_ms')}{over(r['zoft_step_sync_ms'])}"
              f"{num('zoft_peak_mb', '10.0f')}")
        print(f"{'zoft step, pipelined':24}{num('zoft_step_ms')}{over(r['zoft_step_ms'])}{'':>10}")
    else:
        print(f"{'zoft step':24}{num('zoft_step_ms')}{over(r['zoft_step_ms'])}{num('zoft_peak_mb', '10.0f')}")
    if r["speedup_vs_reference"] is not None:
        print(f"zoft is {r['speedup_vs_reference']:.2f}× the reference's speed; ", end="")
    print(f"tokens per pass: useful {r['useful_tokens']}, reference {r['reference_tokens']}, zoft {r['zoft_tokens']}; "
          f"work saved vs naive two-pass: {r['work_saved']:.1%}")
    print(json.dumps(r), flush=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
