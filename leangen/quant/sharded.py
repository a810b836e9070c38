"""Weight-only quantization under tensor parallelism: each rank quantizes only its shard.

``ShardQuantizer`` wraps the move stage's ``Quantizer`` hook. A Linear whose weight the
plan sharded (a DTensor) has its *local* shard quantized, through a plain ``nn.Linear``
of the shard's shape and the Quantizer's own choices (``Quantizer.config``: int8 per-row
scales; int4 groups along the shard's own inputs). Everything else (replicated Linears,
a tied output, the root's counts) goes to the Quantizer unchanged, so a tied output is
quantized whole on every rank, as its weight is replicated.

Why the quantized shard is not wrapped back into a DTensor: DTensor's dispatch
decomposes ``F.linear`` into ``aten.t`` and ``aten.mm`` on the local tensors. torchao's
int8 ``AffineQuantizedTensor`` implements those, but int4's ``Int4OpaqueTensor``
(torchao 0.14, the CPU format) implements only ``F.linear`` and cannot even be wrapped
(``DTensor.from_local`` calls ``aten.view`` on it). So the module keeps the quantized
shard as a plain parameter and multiplies the local tensors itself (``ShardLinear``):
the parallel style's hooks, which parallelize_module put on the module, still turn the
input into the placement the shard needs and reduce or gather the output, exactly as
for the full-precision module. One path for int8 and int4.

What per-shard quantization changes (the tests check each): a column-wise shard
(``Shard(0)``, output rows) is quantized exactly as those rows of the whole layer. A
row-wise shard (``Shard(1)``, input columns) is not, for int8: its per-row scale is the
maximum over the rank's inputs only, never larger than the whole row's, so the rounding
step is at most the one-process step. For int4 the groups run along the inputs, so a
row-wise shard is exact when its width is a multiple of the group size the whole layer
uses (the group boundaries then coincide).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Shard

from leangen.quant.quantize import linear_holding

# The placement of a Linear's output, by the placement of its weight: output rows give
# output features (the last dim); input columns give partial sums, which the parallel
# style's output hook reduces. A weight placed otherwise stays in full precision.
OUTPUT_PLACEMENT = {Shard(0): Shard(-1), Shard(1): Partial()}


class ShardLinear(torch.nn.Linear):
    """A planned Linear whose weight is this rank's quantized shard (a plain tensor).

    The forward takes the local input, multiplies it by the shard (torchao's kernel),
    and returns the DTensor that DTensor's own matmul would have made, so the parallel
    style's output hook (all-reduce, all-gather, to_local) runs unchanged."""

    mesh: Any
    placement: Any  # the weight's (Shard(0) or Shard(1)); the weight itself is the local shard
    output_placement: Any
    out_features_global: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = x.to_local() if isinstance(x, DTensor) else x
        y = F.linear(local, self.weight)
        # shape and stride given: an uneven split (the vocabulary's 49 + 48 rows) would
        # otherwise be taken as even
        shape = (*y.shape[:-1], self.out_features_global)
        stride = torch.empty(shape, device="meta").stride()
        y = DTensor.from_local(y, self.mesh, [self.output_placement], run_check=False,
                               shape=shape, stride=stride)
        # the bias is the plan's DTensor: DTensor adds it to partial sums only once
        return y if self.bias is None else y + self.bias


class ShardQuantizer:
    """The move stage's hook under tensor parallelism: a sharded Linear's local shard is
    quantized on this rank; any other module goes to ``quantizer`` (a Linear has no
    children and no tied outputs, so the quantizer has nothing else to do with it)."""

    def __init__(self, quantizer):
        self.quantizer = quantizer

    def __call__(self, name: str, module: torch.nn.Module) -> None:
        if type(module) is torch.nn.Linear and isinstance(module.weight, DTensor):
            self.quantize_shard(module)
        else:
            self.quantizer(name, module)

    def quantize_shard(self, linear: torch.nn.Linear) -> None:
        weight = linear.weight
        output = OUTPUT_PLACEMENT.get(weight.placements[0]) if len(weight.placements) == 1 else None
        local = weight.to_local()
        plain = linear_holding(local)
        if output is None or self.quantizer.config(plain) is None:
            self.quantizer.count(None)  # stays a full-precision DTensor
            return
        self.quantizer.quantize_linear(plain)  # counts it
        linear.weight = plain.weight  # quantize_ made it a Parameter
        # a new class on the same module object: parallelize_module's hooks stay on it
        linear.__class__ = ShardLinear
        linear.mesh, linear.placement, linear.output_placement = weight.device_mesh, weight.placements[0], output
        linear.out_features_global = weight.shape[0]
