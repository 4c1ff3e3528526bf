"""Layer streaming: models larger than the GPU, trained with forward passes only (as ZO2 does).

The frozen weights of every block live in (pinned) CPU memory. When the engine runs block i, its
weights are copied to the GPU on a side stream (block i+1's copy is already under way while block i
computes), every perturbation row goes through the block, and the GPU copies are dropped. So each
block crosses the bus once per engine call, whatever the number of rows. Trained parameters (LoRA
factors, or the blocks trained in full mode) are moved to the GPU once and stay there.
"""

from __future__ import annotations

import torch
from torch import nn


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
        if not self.cuda:
            self.pending[i] = ([h.clone() for _, h in self.host[i]], None)  # exercises the swap on CPU
            return
        with torch.cuda.stream(self.stream):
            dev = [h.to(self.device, non_blocking=True) for _, h in self.host[i]]
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.pending[i] = (dev, ev)

    def enter(self, i: int) -> None:
        self.prefetch(i)
        dev, ev = self.pending.pop(i)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        for (p, _), d in zip(self.host[i], dev, strict=True):
            if self.cuda:
                d.record_stream(torch.cuda.current_stream(self.device))
            p.data = d

    def exit(self, i: int) -> None:
        for p, h in self.host[i]:
            p.data = h  # the GPU copy is freed once the kernels that read it are done
