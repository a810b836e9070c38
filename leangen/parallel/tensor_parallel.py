"""Stage (under torchrun): tensor parallelism where each rank maps only its own slice.

``load_model(..., parallel=TensorParallel(mesh))`` runs the usual pipeline with two hooks:

1. ``parallelize(model, builder)`` right after the meta build (and after ``Geometry`` was
   taken from the model): torchtune's ``prepare_mha_for_tp`` divides each attention
   module's head counts by the number of ranks, and ``parallelize_module`` applies a
   torchtune plan (``base_llama_tp_plan``: q/k/v, w1/w3 and the output column-wise,
   attention output and w2 row-wise, the embedding by vocabulary rows). Every planned
   parameter becomes a DTensor on meta whose placement says which rows or columns this
   rank owns.
2. ``take(name, meta)`` in ``assign``: for such a parameter, exactly those rows or
   columns come from the lazy view (``Checkpoint.slice``: a row shard of the mmap is a
   view, a column shard a copy of that shard only), go to the rank's device and dtype,
   and become ``DTensor.from_local``. The q/k permutation, where one is needed, runs on
   whole heads of the shard. Nothing else of a sharded tensor is read.

Everything the plan leaves alone (norms, and the embedding of a tied model, which the
output shares) is replicated: every rank takes it through the normal path (an mmap view
on CPU). RoPE buffers are rebuilt on each rank as in one process.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from leangen.checkpoint.convert import Geometry
from leangen.errors import ConfigError, ConversionError
from leangen.load.output import output_projection

# torchtune's plans, by the torchtune model package of the builder. base_llama_tp_plan
# names the modules of torchtune's Llama-style decoder (attn.q/k/v/output_proj,
# mlp.w1/w2/w3, tok_embeddings, output), which these builders all build (Qwen2's q/k/v
# biases are sharded with their rows). Gemma (GemmaTransformerDecoder, its own
# normalised embedding) and Phi-3 are left out until someone checks them: give
# tensor_parallel_plan explicitly to try.
LLAMA_PLAN = "torchtune.models.llama3.base_llama_tp_plan"
TP_PLANS: dict[str, str] = {
    **dict.fromkeys(["torchtune.models.llama2", "torchtune.models.llama3", "torchtune.models.llama3_1",
                     "torchtune.models.llama3_2", "torchtune.models.llama3_3",
                     "torchtune.models.code_llama2", "torchtune.models.mistral",
                     "torchtune.models.qwen2", "torchtune.models.qwen2_5"], LLAMA_PLAN),
    "leangen.hf.builders.llama2_tied": LLAMA_PLAN,  # torchtune's llama2 with a tied output
}

# Parameters whose sharded dimension may split unevenly: the embedding's and the
# output's vocabulary rows (DTensor pads those). Inside a layer an uneven split breaks
# DTensor's shape inference between the column- and row-wise halves of the MLP.
UNEVEN_OK = ("tok_embeddings.weight", "output.weight")


def builder_name(builder: Any) -> str:
    """The dotted path of a builder given as a path, a ``_component_`` block or a callable."""
    if isinstance(builder, str):
        return builder
    if isinstance(builder, DictConfig):
        return str(builder.get("_component_"))
    return f"{getattr(builder, '__module__', '')}.{getattr(builder, '__qualname__', builder)}"


def default_plan(builder: Any) -> str:
    """The torchtune plan for the builder's family, or a one-line refusal."""
    name = builder_name(builder)
    for prefix, plan in TP_PLANS.items():
        if name == prefix or name.startswith(prefix + "."):
            return plan
    raise ConfigError(
        f"no tensor-parallel plan for builder '{name}': leangen knows plans for "
        f"{', '.join(sorted({p.rsplit('.', 1)[-1] for p in TP_PLANS}))}. Set "
        "tensor_parallel_plan: {_component_: ...} to a torchtune plan, or run on one process."
    )


def resolve_plan(plan: Any, builder: Any) -> dict[str, Any]:
    """A module-path -> ParallelStyle dict from None (the family's), a dotted path, a
    ``_component_`` block, a callable or a dict; always a copy (torchtune's is a module global)."""
    from torchtune import config as tt_config

    if plan is None:
        plan = default_plan(builder)
    if isinstance(plan, str):
        plan = OmegaConf.create({"_component_": plan})
    try:
        if isinstance(plan, DictConfig):
            plan = tt_config.instantiate(plan)
        elif callable(plan):
            plan = plan()
    except Exception as e:  # an import or call error of the user's component
        raise ConfigError(f"tensor_parallel_plan failed: {' '.join(str(e).split())}") from e
    if not isinstance(plan, dict):
        raise ConfigError(f"tensor_parallel_plan gave a {type(plan).__name__}; a plan is a dict of "
                          "module path -> ParallelStyle (e.g. torchtune.models.llama3.base_llama_tp_plan).")
    return dict(plan)


def check_divisible(geometry: Geometry | None, ranks: int) -> None:
    """Heads and kv heads must split evenly over the ranks (one line naming the numbers)."""
    if geometry is None:
        raise ConfigError("tensor parallelism needs torchtune attention modules (num_heads, "
                          "num_kv_heads); this model has none.")
    bad = [what for n, what in ((geometry.num_heads, "attention heads"), (geometry.num_kv_heads, "kv heads"))
           if n % ranks]
    if bad:
        divisors = [d for d in range(1, geometry.num_kv_heads + 1)
                    if geometry.num_heads % d == 0 and geometry.num_kv_heads % d == 0]
        raise ConfigError(
            f"{ranks} ranks cannot split the {' and the '.join(bad)} evenly: the model has "
            f"{geometry.num_heads} attention heads and {geometry.num_kv_heads} kv heads. Use "
            f"--nproc_per_node {' or '.join(map(str, divisors))}."
        )


def shard_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` of ``size`` split as DTensor splits it
    (``torch.chunk``: parts of ceil(size / parts), the last ones shorter or empty)."""
    chunk = -(-size // parts)
    start = min(index * chunk, size)
    return start, min(start + chunk, size)


@dataclass
class TensorParallel:
    """One tensor-parallel group (a 1-D device mesh over all ranks) and its plan."""

    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    plan: Any = None  # None: the builder's family plan; else as resolve_plan takes
    notes: list[str] = field(default_factory=list)  # what was adapted, for the user

    @classmethod
    def start(cls, device: torch.device, plan: Any = None) -> "TensorParallel":
        """The mesh over every rank of the (already initialised) process group."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        return cls(init_device_mesh(device.type, (dist.get_world_size(),)), plan)

    @property
    def size(self) -> int:
        return self.mesh.size()

    @property
    def index(self) -> int:
        return self.mesh.get_local_rank()

    def parallelize(self, model: torch.nn.Module, builder: Any, geometry: Geometry | None) -> None:
        """Shard the meta model: heads per rank, then the plan's DTensor parameters.
        ``geometry`` is the full model's, taken before this."""
        from torch.distributed.tensor.parallel import parallelize_module
        from torchtune.training import prepare_mha_for_tp

        check_divisible(geometry, self.size)
        plan = resolve_plan(self.plan, builder)
        output = output_projection(model)
        if output is not None and output.tied:
            # The tied output multiplies by the embedding's weight, so both stay whole:
            # the embedding is replicated (an mmap view per rank on CPU).
            dropped = [k for k in plan if fnmatch.fnmatch("tok_embeddings", k) or fnmatch.fnmatch("output", k)]
            for key in dropped:
                del plan[key]
            if dropped:
                self.notes.append("tied output: the embedding is replicated on every rank")
        prepare_mha_for_tp(model, self.mesh)
        parallelize_module(model, self.mesh, plan)
        self._check_even(model)

    def _check_even(self, model: torch.nn.Module) -> None:
        from torch.distributed.tensor import DTensor

        for name, t in model.state_dict().items():
            if not isinstance(t, DTensor) or name in UNEVEN_OK:
                continue
            for placement in t.placements:
                if placement.is_shard() and t.shape[placement.dim] % self.size:
                    size = t.shape[placement.dim]
                    raise ConfigError(
                        f"{self.size} ranks cannot split '{name}' (size {size} along dim "
                        f"{placement.dim}) evenly; inside a layer DTensor needs even shards. "
                        f"Use a number of ranks that divides {size}."
                    )

    def per_rank(self, quantizer, cache_setting):
        """``(hook, cache setting)`` for ``quantize`` on this rank: each rank quantizes its own
        shards (``leangen.quant.sharded``), and the quantized cache is off: its entries hold
        one process's whole quantized model, keyed without the rank's shard."""
        if quantizer is None:
            return None, cache_setting
        from leangen.quant.sharded import ShardQuantizer

        if cache_setting:
            self.notes.append("quantize_cache is off: each rank quantizes its own shards on every load")
        return ShardQuantizer(quantizer), None

    def taker(self, view, device: torch.device, dtype: torch.dtype) -> Callable:
        """``take(name, meta)`` for ``assign``: this rank's final DTensor for a planned
        parameter, None for a replicated one (which takes the normal path)."""
        from torch.distributed.tensor import DTensor

        def take(name: str, meta: torch.Tensor) -> Optional[torch.Tensor]:
            if not isinstance(meta, DTensor):
                return None
            local = self._local(view, name, meta)
            expected = meta.to_local().shape  # what parallelize_module made for this rank
            if local.shape != expected:
                raise ConversionError(
                    f"'{name}': rank {self.index} took a shard of shape {tuple(local.shape)}, but "
                    f"the plan gives it {tuple(expected)} (placements {meta.placements})."
                )
            # cast on the device, as the move stage does; a column shard becomes contiguous here
            local = local.to(device).to(dtype if local.is_floating_point() else local.dtype).contiguous()
            return DTensor.from_local(local, self.mesh, meta.placements, run_check=False,
                                      shape=meta.shape, stride=meta.stride())

        return take

    def _local(self, view, name: str, meta) -> torch.Tensor:
        """This rank's rows or columns of ``name``, straight from the lazy view."""
        if len(meta.placements) != 1:
            raise ConfigError(f"'{name}': tensor parallelism runs on a 1-D mesh, not {meta.placements}.")
        (placement,) = meta.placements
        if placement.is_replicate():
            return view.tensor(name)
        if not placement.is_shard():
            raise ConfigError(f"'{name}': a parameter placed as {placement} cannot be loaded.")
        dim = placement.dim % meta.dim()
        start, stop = shard_range(meta.shape[dim], self.size, self.index)
        return view.slice(name, start, stop, dim=dim)

    def same_tokens(self, sampler: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        """Every rank continues with rank 0's tokens.

        All ranks hold the same all-gathered logits, so a shared seed would usually
        agree too; but only while every rank's generator has made exactly the same
        draws (``seed: null`` seeds each rank differently) and the logits are bitwise
        equal. A broadcast of [batch] ids per step costs nothing next to the
        per-layer all-reduces, and rank 0's pick is then the truth for all of them, so
        the ranks stop on the same stop token in the same step."""
        import torch.distributed as dist

        group = self.mesh.get_group()

        def sample(logits: torch.Tensor) -> torch.Tensor:
            tokens = sampler(logits).contiguous()
            dist.broadcast(tokens, src=dist.get_global_rank(group, 0), group=group)
            return tokens

        return sample
