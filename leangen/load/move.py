"""Stage: move loaded tensors to their device and dtype, one tensor at a time.

Host memory stays bounded: CUDA copies go through two fixed pinned buffers
(``staging_bytes`` in all) with ``non_blocking`` transfers, and the q/k permutation
(only where the stored row layout differs from the model's RoPE) and the dtype cast
happen per tensor on the device, so no second copy of the model
ever exists on the host.
"""

from __future__ import annotations

from typing import Callable, Collection

import torch
from tqdm import tqdm

from leangen.checkpoint.convert import Transform

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


# Called once per module, children before parents, when its tensors are final; may
# replace the module's parameters (leangen.quant.quantize.Quantizer does).
FinishModule = Callable[[str, torch.nn.Module], None]


def chain(*hooks: FinishModule | None) -> FinishModule | None:
    """One hook that runs the given ones (None skipped) in order on each module."""
    hooks = tuple(h for h in hooks if h is not None)
    if not hooks:
        return None

    def run(name: str, module: torch.nn.Module) -> None:
        for hook in hooks:
            hook(name, module)
    return run


def move_to_device(model: torch.nn.Module, pending: dict[str, Transform], device: torch.device,
                   dtype: torch.dtype, *, progress: bool = False,
                   finish_module: FinishModule | None = None, final: Collection[str] = ()) -> None:
    """Give every parameter (and persistent buffer) its final device, layout and dtype;
    those named in ``final`` already have them (quantized weights from the cache).

    Modules are finished in post-order: a module's own tensors, then
    ``finish_module(name, module)`` once its subtree is done (the root, ``""``, last), so
    a hook that quantizes a Linear sees it final while the rest of the model is still
    the checkpoint's mmap.
    """
    stager = Stager(device) if device.type != "cpu" else None
    tensors = model.state_dict(keep_vars=True)
    bar = tqdm(total=len(tensors), desc=f"loading to {device}", unit="tensor",
               disable=not progress, leave=False)
    for prefix, module in _post_order(model):
        # the root takes whatever its children's own names did not cover
        names = [prefix + n for n in _own_tensors(module)] if prefix else list(tensors)
        for name in names:
            tensor = tensors.pop(name, None)
            # None: not in the state_dict, or a shared module's, done
            if tensor is not None and name not in final:
                if not _final(tensor, pending.get(name), device, dtype):
                    _move(tensor, pending.get(name), stager, dtype)
                bar.update()
        tensor = None  # hold no reference to what the hook may replace
        if finish_module is not None:
            finish_module(prefix.rstrip("."), module)
    bar.close()
    if stager:
        stager.finish()


def _move(tensor: torch.Tensor, transform: Transform | None, stager: Stager | None,
          dtype: torch.dtype) -> None:
    t = stager.copy(tensor.data) if stager else tensor.data
    t = (transform or Transform()).apply(t)
    if isinstance(tensor, torch.nn.Parameter) and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)  # parameters only: buffers keep their dtype, as in an eager build
    tensor.data = t


def _final(tensor: torch.Tensor, transform: Transform | None, device: torch.device,
           dtype: torch.dtype) -> bool:
    """Already on ``device`` in its final dtype with nothing to compute: left as it is
    (e.g. a tensor-parallel shard, a DTensor that its taker finished)."""
    cast = isinstance(tensor, torch.nn.Parameter) and tensor.is_floating_point() and tensor.dtype != dtype
    return (transform is None or not transform.computes) and not cast and tensor.device == device


def _own_tensors(module: torch.nn.Module) -> list[str]:
    """The module's own state_dict names: parameters and persistent buffers."""
    return [*(n for n, p in module._parameters.items() if p is not None),
            *(n for n, b in module._buffers.items()
              if b is not None and n not in module._non_persistent_buffers_set)]


def _post_order(module: torch.nn.Module, prefix: str = "", seen: set | None = None):
    """(prefix, module) for every module, each once, children before their parent."""
    seen = set() if seen is None else seen
    seen.add(id(module))
    for name, child in list(module.named_children()):
        if id(child) not in seen:
            yield from _post_order(child, f"{prefix}{name}.", seen)
    yield prefix, module
