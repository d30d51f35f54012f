"""Activation offloading: tensors saved for the backward pass wait in pinned CPU memory instead of on the GPU.

With activation checkpointing on every layer, what the backward pass keeps is one (tokens x hidden) input per
decoder layer (torch's non-reentrant checkpoint saves them through `save_for_backward`, so saved-tensor hooks
see them): 3.1 GiB at micro-batch 4 x 2048 on NeMo-12B, the largest item above the weights
(MOE_TRAINING_GUIDE.md section 8). `torch.autograd.graph.save_on_cpu` moves them too, but also copies every saved
parameter and mask each step and blocks the GPU on each copy; this version leaves parameters, non-float tensors
(masks, ids) and small tensors where they are, and copies on a side stream so the forward pass does not wait.
A tensor waiting for its copy keeps its GPU memory, and the host queues work layers ahead of the GPU (measured on
an H200: 14 layer inputs, 1.1 GiB, waiting at the peak), so at most `max_inflight` copies may be pending: the host
waits for the oldest before it queues more.
"""

from __future__ import annotations

from collections import deque

import torch


class OffloadSavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: while active, saved float tensors of at least `min_bytes` on `device_type` are packed into
    CPU memory (pinned on CUDA) and copied back when the backward pass unpacks them."""

    def __init__(self, min_bytes: int = 1 << 20, device_type: str = "cuda", max_inflight: int = 2):
        self.min_bytes, self.device_type, self.max_inflight = min_bytes, device_type, max_inflight
        self.stream = torch.cuda.Stream() if device_type == "cuda" else None
        self.inflight: deque[torch.cuda.Event] = deque()  # one per queued copy
        self.offloaded_bytes = 0  # since construction: what the GPU did not have to hold
        super().__init__(self._pack, self._unpack)

    def _offloadable(self, t: torch.Tensor) -> bool:
        return (t.device.type == self.device_type and t.is_floating_point() and not isinstance(t, torch.nn.Parameter)
                and t.layout == torch.strided and t.numel() * t.element_size() >= self.min_bytes)

    def _pack(self, t: torch.Tensor):
        if not self._offloadable(t):
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.stream is not None)
        if self.stream is None:
            host.copy_(t)
        else:
            # the copy waits for the kernels that wrote `t`, then runs beside the next ones; record_stream keeps the
            # allocator from handing t's memory to a later kernel before the copy has read it
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                self.inflight.append(torch.cuda.Event())
                self.inflight[-1].record()
            t.record_stream(self.stream)
            while len(self.inflight) > self.max_inflight:
                self.inflight.popleft().synchronize()
        self.offloaded_bytes += host.numel() * host.element_size()
        return t.device, host

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        if self.stream is not None:
            torch.cuda.current_stream(device).wait_stream(self.stream)  # the offloading copy has finished
        return host.to(device, non_blocking=True)
