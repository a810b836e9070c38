"""A CPU kernel for torchao's int8 weight-only linear, registered through torchao's own
extension point (``register_aqt_quantized_linear_dispatch``).

Why: torchao 0.14 runs an int8 weight-only linear in eager mode by converting the whole
int8 weight to the activation's dtype on every call, then ``mm``, then scaling (its
comment says the ``aten._weight_int8pack_mm`` path is still to do). Measured on this
machine for a 8192x2048 layer and one token: 18.9 ms, against 2.6 ms for the bf16 layer
and 1.0 ms for ``aten._weight_int8pack_mm``, so ``quantize: int8`` decoded ~10x slower
than bf16. That aten kernel reads the int8 weight once, accumulates in fp32 and scales
per output channel, which is exactly torchao's per-channel symmetric int8 format.

The kernel is put in front of torchao's own check, which stays registered behind it for
everything it does not cover (CUDA, MPS, a tensor-subclass input). Its results differ from
torchao's eager path only in rounding: torchao rounds the product to bf16 before scaling,
the kernel after.
"""

from __future__ import annotations

import torch

_installed = False


def install() -> None:
    """Register the kernel once per process (quantize: int8 calls this)."""
    global _installed
    if _installed:
        return
    from torchao.dtypes.affine_quantized_tensor_ops import (
        deregister_aqt_quantized_linear_dispatch,
        register_aqt_quantized_linear_dispatch,
    )
    from torchao.dtypes.uintx.plain_layout import _linear_fp_act_int8_weight_check as torchao_check
    from torchao.dtypes.uintx.plain_layout import _linear_fp_act_int8_weight_impl as torchao_impl

    # The table is checked in insertion order: ours, then torchao's again, as its fallback.
    deregister_aqt_quantized_linear_dispatch(torchao_check)
    register_aqt_quantized_linear_dispatch(_applies(torchao_check), _int8pack_linear)
    register_aqt_quantized_linear_dispatch(torchao_check, torchao_impl)
    _installed = True


def _applies(torchao_check):
    def check(x: torch.Tensor, weight, bias) -> bool:
        return x.device.type == "cpu" and torchao_check(x, weight, bias)
    return check


# torch's CPU _weight_int8pack_mm reads the weight with 64-byte-aligned loads when it
# multiplies several rows: a weight at 8 bytes past a 64-byte boundary (where safetensors
# puts the quantized cache's tensors) crashed the process with SIGSEGV in a prefill, while
# one-row decode steps ran (torch 2.13, measured on Mistral-7B's cached int8 q_proj).
KERNEL_ALIGNMENT = 64


def _int8pack_linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    impl = weight.tensor_impl
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    data = impl.int_data
    if rows.shape[0] > 1 and data.data_ptr() % KERNEL_ALIGNMENT:
        # one layer's int8 copy (torch's allocator aligns to 64), for this call only: decode
        # steps (one row) keep reading the mmap
        data = data.clone(memory_format=torch.contiguous_format)
    y = torch.ops.aten._weight_int8pack_mm(rows, data, impl.scale.to(x.dtype))
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y + bias.to(y.dtype) if bias is not None else y
