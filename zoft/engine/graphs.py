"""CUDA graphs over the trained block stack, one per input shape.

A ZO step on a small model is launch-bound: opt-125m's step issues ~500 kernels whose GPU time is a
fraction of the CPU time spent launching them (docs/LOG.md). A CUDA graph records the block stack's
kernels once per shape and replays them with one launch. Pack rows are padded to a multiple of 64 on
CUDA (to the full pack length when a batch needs several rows), so a run sees few distinct shapes. A
shape is recorded the second time it is met (a one-off shape runs eagerly), and graphs are kept in an LRU.

What a graph reads lives in static buffers that each replay refills: the hidden states entering the
first graphed block, the attention mask, the position context (rotary cos/sin) and, in LoRA mode, one
flat buffer holding every perturbed adapter of the step (``zo.lora_rows`` builds the banks as views of
one flat tensor, so refilling them is one copy). Frozen and fully trained weights are read in place:
full mode's in-place ±εz perturbations are seen by the replay, as they would be by an eager forward.

Exactness: a replay runs the same kernels on the same inputs as the eager forward it recorded; the
GPU test checks graph and eager outputs agree across steps with different perturbations.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # static copies of the call's tensors, in call order
    out: torch.Tensor


class GraphCache:
    """Record `fn(*tensors)` as a CUDA graph per (shapes, dtypes) of its tensor inputs; replay after."""

    def __init__(self, max_graphs: int = 16):
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.seen: OrderedDict[tuple, None] = OrderedDict()  # shapes met once: recorded on the second meeting
        self.pool = None  # one memory pool shared by every graph: they never run concurrently
        self.captures = 0
        self.replays = 0
        self.eager = 0

    def __call__(self, fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor], extra=None) -> torch.Tensor:
        """extra: anything hashable that the recorded kernels depend on besides the tensors' shapes."""
        key = (extra, tuple((tuple(t.shape), t.dtype, t.stride()) for t in tensors))
        g = self.graphs.get(key)
        if g is None and key not in self.seen:  # a one-off shape is not worth a recording (~3 forwards)
            self.seen[key] = None
            while len(self.seen) > 4 * self.max_graphs:
                self.seen.popitem(last=False)
            self.eager += 1
            return fn(*tensors)
        if g is None:
            g = self._capture(fn, tensors)
            self.graphs[key] = g
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
            for dst, src in zip(g.inputs, tensors, strict=True):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
            g.graph.replay()
            self.replays += 1
        return g.out

    def _capture(self, fn, tensors) -> _Graph:
        static = [t.clone() for t in tensors]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy initialisation (cuBLAS handles, kernel choice) off capture
            fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn(*static)
        graph.replay()  # the capture recorded without running: compute this call's output
        self.captures += 1
        return _Graph(graph, static, out)
