"""Stage: move loaded tensors to their device and dtype, one tensor at a time.

Host memory stays bounded: CUDA copies go through two fixed pinned buffers
(``staging_bytes`` in all) with ``non_blocking`` transfers, and the q/k permutation
(only where the stored row layout differs from the model's RoPE) and the dtype cast
happen per tensor on the device, so no second copy of the model
ever exists on the host.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from leangen.convert import Transform

DEFAULT_STAGING_BYTES = 64 << 20


def host_buffer(nbytes: int, *, pin: bool) -> torch.Tensor:
    """A byte buffer, page-locked when asked and possible (a CPU-only torch cannot pin)."""
    if pin:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(nbytes, dtype=torch.uint8)


class Stager:
    """Copies host tensors to ``device`` through two alternating staging buffers.

    While one buffer's chunk is in flight to the device, the next chunk fills the
    other; an event per buffer says when it may be refilled. On a CPU target (used
    by the tests) the same path runs with plain copies and no events.
    """

    def __init__(self, device: torch.device | str, staging_bytes: int = DEFAULT_STAGING_BYTES):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.chunk = max(1, staging_bytes // 2)
        self.buffers = [host_buffer(self.chunk, pin=cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._next = 0

    def copy(self, src: torch.Tensor) -> torch.Tensor:
        src = src.contiguous()  # stored tensors and row views already are: no copy
        dst = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        src_bytes, dst_bytes = _as_bytes(src), _as_bytes(dst)
        for start in range(0, src_bytes.numel(), self.chunk):
            n = min(self.chunk, src_bytes.numel() - start)
            buffer, event = self.buffers[self._next], self.events[self._next]
            if event is not None:
                event.synchronize()  # the previous transfer out of this buffer is done
            buffer[:n].copy_(src_bytes[start:start + n])
            dst_bytes[start:start + n].copy_(buffer[:n], non_blocking=True)
            if event is not None:  # on the stream that carries copies to this device
                event.record(torch.cuda.current_stream(self.device))
            self._next ^= 1
        return dst

    def finish(self) -> None:
        """Wait for the last transfers: the staging buffers must outlive them."""
        for event in self.events:
            if event is not None:
                event.synchronize()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def move_to_device(model: torch.nn.Module, pending: dict[str, Transform], device: torch.device,
                   dtype: torch.dtype, *, progress: bool = False) -> None:
    """Give every parameter (and persistent buffer) its final device, layout and dtype."""
    stager = Stager(device) if device.type != "cpu" else None
    tensors = model.state_dict(keep_vars=True)
    for name, tensor in tqdm(tensors.items(), desc=f"loading to {device}", unit="tensor",
                             disable=not progress, leave=False):
        t = stager.copy(tensor.data) if stager else tensor.data
        t = pending.get(name, Transform()).apply(t)
        if isinstance(tensor, torch.nn.Parameter) and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)  # parameters only: buffers keep their dtype, as in an eager build
        tensor.data = t
    if stager:
        stager.finish()
