"""A ZO step's peak memory stays within a small bound of one forward pass's (CUDA allocator; GPU only)."""

import pytest
import torch

from zoft.engine.native import NativeEngine
from zoft.lora import LoraArgs, inject_lora
from zoft.models.llama import Llama, LlamaArgs
from zoft.tasks.encode import Encoded
from zoft.train.losses import row_losses
from zoft.zo.noise import CHUNK
from zoft.zo.perturbers import InPlacePerturber, LoRAPerturber, estimate
from zoft.zo.trainable import direction_seeds, full_trainable, lora_trainable
from zoft.zo.update import sgd_update_


def model_on_cuda(mode):
    with torch.device("meta"):
        m = Llama(LlamaArgs(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                            num_attention_heads=8, num_key_value_heads=4))
    m = m.to_empty(device="cuda")
    for p in m.parameters():
        p.data.normal_(0, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
        p.requires_grad_(False)
    if mode == "lora":
        loras = inject_lora(m, m.block_prefix, ["q_proj", "v_proj"], None, LoraArgs())
        return m, loras, lora_trainable(loras)
    return m, None, full_trainable(m, None)


def peak_above_resident(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_step_peak_memory_close_to_one_forward(mode):
    m, loras, tr = model_on_cuda(mode)
    g = torch.Generator().manual_seed(0)
    exs = [Encoded(torch.randint(3, 8000, (n,), generator=g).tolist(), [[5], [6]], 0, "mc") for n in range(40, 200, 10)]
    eng = NativeEngine(m)
    b = eng.batch(exs)
    seeds = direction_seeds(0, 0, 1)
    forward = peak_above_resident(lambda: row_losses(eng.scores(b, 1, True), b, "candidate"))

    def step():
        if loras is not None:
            pert = LoRAPerturber(loras, tr)
            _, _, gr = estimate(lambda r: row_losses(eng.scores(b, r, True), b, "candidate"), pert, seeds, 1e-2)
        else:
            pert = InPlacePerturber(tr)
            _, _, gr = estimate(lambda r: row_losses(eng.scores(b, r, True), b, "candidate"), pert, seeds, 1e-3)
        sgd_update_(tr, seeds, gr, 1e-4, 0.0)

    zo = peak_above_resident(step)
    param_mb = tr.numel() * 4 / 2**20
    if mode == "lora":  # two rows in one batch: about twice a forward's activations, plus the tiny adapters
        assert zo <= 2.2 * forward + 8, (zo, forward)
    else:  # in place: one forward's activations plus a z chunk, never a parameter-sized temporary
        bound = forward + 2 * CHUNK * 4 / 2**20 + 8
        assert bound < param_mb  # tight enough that a parameter-sized temporary would break it
        assert zo <= bound, (zo, forward, param_mb)
