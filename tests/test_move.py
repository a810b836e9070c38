"""move: the staged, chunked copy (exercised on CPU) and the per-tensor cast."""

from __future__ import annotations

import pytest
import torch

from leangen.checkpoint.convert import Transform
from leangen.load.move import Stager, host_buffer, move_to_device


def _sample(dtype: torch.dtype, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(-2**40, 2**40, shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64, torch.bool])
@pytest.mark.parametrize("shape", [(7, 13), (1,), (1000,), (3, 5, 11), ()])
@pytest.mark.parametrize("staging_bytes", [2, 6, 50, 1 << 20])  # chunks of 1, 3, 25 bytes, or whole
def test_chunked_copy_is_exact(dtype, shape, staging_bytes):
    src = _sample(dtype, shape)
    stager = Stager("cpu", staging_bytes=staging_bytes)
    out = stager.copy(src)
    stager.finish()
    assert out.dtype == dtype and out.shape == src.shape
    assert torch.equal(out, src)
    if src.numel():
        assert out.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()


def test_many_tensors_through_one_stager_alternate_buffers():
    stager = Stager("cpu", staging_bytes=64)  # two 32-byte buffers
    srcs = [_sample(torch.float32, (n,)) for n in (1, 9, 33, 100)]
    outs = [stager.copy(s) for s in srcs]
    stager.finish()
    assert all(torch.equal(o, s) for o, s in zip(outs, srcs))
    assert all(b.numel() == 32 for b in stager.buffers)


def test_non_contiguous_and_offset_sources():
    base = _sample(torch.float32, (16, 24))
    for src in (base.t(), base[:, 3:17], base[5:9], base[::2, ::3]):
        stager = Stager("cpu", staging_bytes=40)
        out = stager.copy(src)
        assert out.is_contiguous() and torch.equal(out, src)
    assert torch.equal(base, _sample(torch.float32, (16, 24)))  # the source is untouched


def test_empty_tensor():
    out = Stager("cpu", staging_bytes=8).copy(torch.empty(0, 5, dtype=torch.bfloat16))
    assert out.shape == (0, 5) and out.dtype == torch.bfloat16


def test_host_buffer_degrades_without_pinning():
    buffer = host_buffer(1024, pin=True)  # this CPU-only torch cannot pin: no error
    assert buffer.numel() == 1024 and buffer.dtype == torch.uint8
    assert buffer.is_pinned() == (torch.cuda.is_available())
    assert not host_buffer(16, pin=False).is_pinned()


def test_staging_memory_is_bounded():
    stager = Stager("cpu", staging_bytes=4096)
    big = _sample(torch.float32, (1 << 16,))  # 256 KiB through 2 KiB chunks
    assert torch.equal(stager.copy(big), big)
    assert sum(b.numel() for b in stager.buffers) == 4096


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Parameter(torch.arange(32.0).reshape(8, 4))
        self.ids = torch.nn.Parameter(torch.arange(6), requires_grad=False)
        self.register_buffer("step", torch.tensor(3))
        self.register_buffer("scale", torch.full((4,), 0.1, dtype=torch.float32))


def test_move_to_device_applies_transform_then_casts():
    model = _Tiny()
    q, scale = model.q.detach().clone(), model.scale.clone()
    move_to_device(model, {"q": Transform(permute_heads=2)}, torch.device("cpu"), torch.bfloat16)
    assert model.q.dtype == torch.bfloat16 and isinstance(model.q, torch.nn.Parameter)
    assert torch.equal(model.q, Transform(permute_heads=2).apply(q).to(torch.bfloat16))
    assert model.ids.dtype == torch.int64 and model.step.dtype == torch.int64  # integers stay
    # buffers are moved, never cast, as in an eager build: RoPE's cache stays fp32
    assert model.scale.dtype == torch.float32 and torch.equal(model.scale, scale)


def test_move_to_device_without_work_keeps_the_storage():
    model = _Tiny()
    ptr = model.q.data_ptr()
    move_to_device(model, {}, torch.device("cpu"), torch.float32)
    assert model.q.data_ptr() == ptr  # same dtype, no transform, same device: zero copy
