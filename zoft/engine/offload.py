"""Layer streaming: models larger than the GPU, trained with forward passes only (as ZO2 does).

The frozen weights of every block live in (pinned) CPU memory. When the engine runs block i, its
weights are copied to the GPU on a side stream (block i+1's copy is already under way while block i
computes), every perturbation row goes through the block, and the GPU copies are dropped. So each
block crosses the bus once per engine call, whatever the number of rows. LoRA factors are moved to the
GPU once and stay there. Blocks trained in full mode are streamed like the frozen ones: a streamed
block is perturbed (as rows, θ unchanged), used, and after the step its trained tensors cross to the
device again, are updated there with the z the forward used, and are written back (`write_through`).

The vocabulary tables stay in CPU memory too (at 135M parameters the token embedding is a fifth of
the model): the lookup runs on the CPU and only the batch's rows cross the bus; the LM head sends
only the vocabulary rows the loss reads (one per target when candidates are single tokens), else
the whole head in chunks of `HEAD_CHUNK` rows (`head_logits`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_CHUNK = 8192  # vocabulary rows of a host-resident LM head sent to the device at a time


class HostEmbedding(nn.Module):
    """An embedding table kept in CPU memory: looked up there, the rows sent to `device`. Holds the
    same Parameter (a tied LM head still reads it, and state_dict names do not change)."""

    def __init__(self, weight: nn.Parameter, device: torch.device):
        super().__init__()
        self.weight = weight
        self.device = device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.cpu(), self.weight).to(self.device, non_blocking=True)


def offload_to_host(model: nn.Module, device: torch.device | str) -> None:
    """--offload cpu for a native model built on the CPU: the blocks and the vocabulary tables stay in
    (pinned) CPU memory, everything else moves to `device`. The blocks' streamer is made later, by
    `stream_blocks`, once the trained parameters are attached and on the device."""
    device = torch.device(device)
    parent_name, _, attr = model.embed_path.rpartition(".")
    parent = model.get_submodule(parent_name)
    emb = getattr(parent, attr)
    keep = [model.blocks, emb] + ([model.lm_head] if hasattr(model, "lm_head") else [])
    _to_device_except(model, keep, device)
    if device.type == "cuda":
        for m in keep[1:]:
            m.weight.data = m.weight.data.pin_memory()
    setattr(parent, attr, HostEmbedding(emb.weight, device))
    model.offload_device = device


def stream_blocks(model: nn.Module, device: torch.device | str) -> LayerStreamer:
    """The streamer for a model prepared by offload_to_host (model.streamer; made once). Call it after
    attaching the trained parameters and moving them to the device: every block parameter still on the
    CPU is streamed as frozen, and a streamed parameter's GPU copy is always made from its host copy."""
    if model.streamer is None:
        model.streamer = LayerStreamer(model.blocks, torch.device(device))
    return model.streamer


def _to_device_except(module: nn.Module, keep: list[nn.Module], device: torch.device) -> None:
    if any(module is k for k in keep):
        return
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for b in module.buffers(recurse=False):
        b.data = b.data.to(device)
    for child in module.children():
        _to_device_except(child, keep, device)


def head_rows(w: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """w[idx] on `device`, gathered where w lives (only those rows cross the bus)."""
    return w[idx.to(w.device)].to(device, non_blocking=True)


def head_logits(h: torch.Tensor, w: torch.Tensor, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """F.linear(h, w) for a head w in CPU memory: its rows sent to h's device `chunk` at a time, so the
    device holds one chunk of the head (and the logits), never all of it."""
    out = torch.empty(*h.shape[:-1], w.shape[0], dtype=h.dtype, device=h.device)
    for lo in range(0, w.shape[0], chunk):
        out[..., lo : lo + chunk] = F.linear(h, w[lo : lo + chunk].to(h.device, non_blocking=True))
    return out


class LayerStreamer:
    def __init__(self, blocks: nn.ModuleList, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.host: list[list[tuple[nn.Parameter, torch.Tensor]]] = []  # per block: (param, its CPU copy)
        self.pending: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.bytes_per_pass = 0
        for block in blocks:
            items = []
            for p in block.parameters():
                if p.device.type != "cpu":
                    continue  # trained or otherwise resident: stays where it is
                host = p.data.pin_memory() if self.cuda else p.data
                p.data = host
                items.append((p, host))
                self.bytes_per_pass += host.numel() * host.element_size()
            self.host.append(items)

    def prefetch(self, i: int) -> None:
        if i >= len(self.host) or i in self.pending:
            return
        self.pending[i] = self._copy_in([h for _, h in self.host[i]])  # on CPU, clones exercise the swap

    def enter(self, i: int) -> None:
        self.prefetch(i)
        dev, ev = self.pending.pop(i)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        for (p, _), d in zip(self.host[i], dev, strict=True):
            if self.cuda:
                d.record_stream(torch.cuda.current_stream(self.device))
            p.data = d

    def write_through(self, params: list[torch.Tensor], update) -> None:
        """update(indices, tensors) changes `tensors` (params[i] for i in indices) in place. Full mode's trained
        blocks live here: each block's trained tensors are copied to the device (the next block's copy under
        way on the side stream meanwhile), updated there (the z the forward used is generated on the device)
        and copied back to their host copies; parameters not streamed are updated where they are. Returns
        once every host copy is written (the next forward, a checkpoint or a replay reads them)."""
        block = {id(p): b for b, items in enumerate(self.host) for p, _ in items}
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(block.get(id(p), -1), []).append(i)
        if -1 in groups:
            rest = groups.pop(-1)
            update(rest, [params[i].data for i in rest])
        order = sorted(groups)
        for b in order:
            self.pending.pop(b, None)  # a copy made before the update would be stale
        fetch = lambda b: self._copy_in([params[i].data for i in groups[b]])  # noqa: E731
        nxt = fetch(order[0]) if order else None
        for k, b in enumerate(order):
            dev, ev = nxt
            nxt = fetch(order[k + 1]) if k + 1 < len(order) else None
            if ev is not None:
                cur = torch.cuda.current_stream(self.device)
                cur.wait_event(ev)
                for d in dev:
                    d.record_stream(cur)
            update(groups[b], dev)
            for i, d in zip(groups[b], dev, strict=True):
                params[i].data.copy_(d, non_blocking=self.cuda)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def _copy_in(self, hosts: list[torch.Tensor]) -> tuple[list[torch.Tensor], object]:
        """Device copies of host tensors: on the side stream with its event (CUDA), else clones (the CPU path
        runs the same steps)."""
        if not self.cuda:
            return [h.clone() for h in hosts], None
        with torch.cuda.stream(self.stream):
            dev = [h.to(self.device, non_blocking=True) for h in hosts]
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return dev, ev

    def exit(self, i: int) -> None:
        for p, h in self.host[i]:
            p.data = h  # the GPU copy is freed once the kernels that read it are done
