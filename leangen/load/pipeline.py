"""``load_model``: the pipeline's orchestration, stage by stage.

build on meta -> open the checkpoint lazily -> assign mmap'd tensors ->
materialise buffers on the device -> move/cast/permute tensor by tensor.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Union

import torch
from omegaconf import DictConfig, OmegaConf

from leangen.checkpoint import CheckpointPath, open_raw
from leangen.checkpoint.convert import Geometry, Transform
from leangen.checkpoint.view import Checkpoint, open_checkpoint
from leangen.errors import ConfigError, ConversionError, LeangenError
from leangen.hf.check import check_model
from leangen.hf.config import parse_config
from leangen.hf.families import builder_for
from leangen.load.buffers import check_no_meta, materialise_buffers
from leangen.load.device import resolve_device
from leangen.load.dtypes import DTYPES, dtype_name
from leangen.load.move import chain, move_to_device
from leangen.load.output import output_projection
from leangen.load.prepack import Prepacker
from leangen.load.report import LoadReport, Quantization
from leangen.load.rope import match_stored_layout, qk_layout
from leangen.quant.cache import CacheSetting, open_cache
from leangen.quant.quantize import Quantizer, QuantSetting

if TYPE_CHECKING:
    from leangen.parallel.tensor_parallel import TensorParallel

Builder = Union[str, Callable[..., torch.nn.Module], DictConfig]
# assign's hook: (name, the meta parameter) -> the final tensor to install, or None.
Take = Callable[[str, torch.Tensor], "torch.Tensor | None"]
# Called after each stage of load_model with the stage's name and what it made (bytes, tensors).
OnStage = Callable[..., None]

# Devices that cannot compute in some dtype, with what to do instead.
_DTYPE_SUPPORT = {
    "cuda": lambda dtype: dtype != torch.bfloat16 or torch.cuda.is_bf16_supported(),
}

# Above this many bytes a GPU load shows a progress bar; a CPU load never does.
_PROGRESS_BYTES = 1 << 30


def load_model(builder: Builder, checkpoint: CheckpointPath, *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "auto", model_type: str = "auto",
               strict_config: bool = True, rope_positions: int | None = None,
               on_stage: OnStage | None = None, quantize: QuantSetting = None,
               prepack: bool = False, quantize_cache: CacheSetting = None,
               parallel: "TensorParallel | None" = None, **builder_kwargs: Any) -> torch.nn.Module:
    """Build ``builder`` on meta and fill it from ``checkpoint`` without copying.

    - ``builder``: a dotted path, a callable, a DictConfig with ``_component_``, or
      ``"auto"``: the torchtune builder and kwargs that config.json describes
      (``builder_kwargs`` then override single kwargs, e.g. ``max_seq_len``).
    - ``checkpoint``: a directory, a file or a list of files. When config.json is there,
      the built model is checked against it (RoPE, norms, heads, tying, biases...); a
      difference is a ConversionError, or a warning with ``strict_config=False``.
    - ``dtype="auto"`` keeps the stored dtype: on CPU every parameter is then the file's
      mmap, q/k included. For HF's rotate-half q/k rows the model's torchtune RoPE is
      wrapped in ``leangen.load.rope.RotateHalf`` instead of the rows being permuted, so the
      model's ``state_dict()`` is leangen's own (torchtune names, q/k rows as stored);
      ``load_tensors`` gives torchtune's layout.
    - ``rope_positions``: build the RoPE cache for that many positions (e.g. the KV-cache
      length; at most the builder's ``max_seq_len``); a forward that needs more is an error.
    - ``on_stage(name, **made)``, if given, is called after each stage
      (``benchmarks/load_profile.py`` times them).
    - ``quantize`` (None, "int8", "int4" or a ``leangen.quant.quantize.QuantSpec``): weight-only
      torchao quantization of every Linear, the output included (a tied one gets its own
      quantized copy), layer by layer as tensors are moved, so the full-precision model is
      never resident. ``model.leangen.quantization`` then holds the Linears quantized and
      skipped (skipped layers stay in full precision) and, for int4, the groups used (a
      group that does not divide a layer's inputs falls back to one that does), else None.
    - ``prepack=True`` (CPU, bf16/fp32): the Linears that stay in full precision are copied
      into oneDNN's blocked layout (``leangen.load.prepack``): decode is faster, but those
      weights then take anonymous memory instead of being the file's mmap.
      ``model.leangen.prepacked`` counts them (None when off).
    - ``quantize_cache`` (None, "auto" or a folder; only with ``quantize``): the quantized
      weights are written once to ``<folder>/<entry>.safetensors`` ("auto":
      ``$XDG_CACHE_HOME/leangen``, else ``~/.cache/leangen``), and later loads with the
      same key mmap them instead of quantizing (``leangen.quant.cache``).
      ``model.leangen.quant_cache`` is ``{"status": "hit" | "written" | "off", "file": path}``.
    - ``parallel``: a ``leangen.parallel.tensor_parallel.TensorParallel`` (under torchrun): the meta model
      is sharded by its plan and this rank reads only its rows or columns of each
      sharded tensor (DTensor parameters); the rest is replicated. With ``quantize``,
      each rank quantizes its own shards (``leangen.quant.sharded``; the counts are the
      rank's) and ``quantize_cache`` is off.

    Returns the model in eval mode on ``device``, nothing on meta, with what the load did
    as ``model.leangen`` (a ``leangen.load.report.LoadReport``: the files, device, dtype,
    parsed config.json, seconds, quantization and prepacking).
    """
    started = time.perf_counter()
    device = resolve_device(device)
    raw = open_raw(checkpoint)  # headers and config.json only
    config = parse_config(raw.config)
    if _is_auto(builder):
        if config is None:
            raise ConfigError(f"model: auto needs an HF config.json (with a model_type) beside "
                              f"{raw.files[0]}. Name a torchtune builder instead.")
        builder, auto_kwargs = builder_for(config)
        builder_kwargs = {**auto_kwargs, **builder_kwargs}
    mark = on_stage or (lambda stage, **made: None)
    model = build_on_meta(builder, **builder_kwargs)
    if config is not None:
        check_model(model, config, strict=strict_config)
    mark("build on meta")
    geometry = Geometry.from_model(model)
    view = open_checkpoint(raw, model_type=model_type, geometry=geometry)
    # q/k stay as stored: for HF's rotate-half rows the model's RoPE rotates halves
    # (RotateHalf). Rows in a layout the model's RoPE still differs from are permuted per
    # tensor in move.
    match_stored_layout(model, view.stored_layout)
    view = view.with_qk_layout(qk_layout(model))
    dtype = resolve_dtype(dtype, view, device)
    quantizer = Quantizer.for_load(quantize, device, dtype)  # None: keep full precision
    hook = quantizer
    if parallel is not None:  # each rank quantizes its shards; no cache
        hook, quantize_cache = parallel.per_rank(quantizer, quantize_cache)
    prepacker = Prepacker.for_load(prepack, device, dtype)  # None: keep the mmap
    if parallel is not None and prepacker is not None:  # the recipe refuses it too
        raise ConfigError("prepack with tensor parallelism is not supported: oneDNN's packed "
                          "Linear takes no DTensor shards. Drop prepack, or run one process.")
    cache = open_cache(quantize_cache, raw.files, raw.config, quantizer, dtype, model, builder=builder,
                       builder_kwargs=builder_kwargs, model_type=model_type,
                       family=view.family.name, qk_layout=qk_layout(model))
    mark("open checkpoint (headers, key plan, RoPE layout)")
    take = None
    if parallel is not None:
        parallel.parallelize(model, builder, geometry)  # after Geometry: it divides the heads
        take = parallel.taker(view, device, dtype)
        mark("tensor parallel plan on meta")
    pending = assign(model, view, take=take)
    mark("assign mmap views")
    # A hit: the quantized Linears are the cache file's mmap, final; nothing left to quantize.
    cached = cache.install(model, hook) if cache else set()
    if cached:  # the cache counted its Linears into the quantizer, as quantizing would have
        hook = None
        pending = {n: t for n, t in pending.items() if n not in cached}
        mark("quantized cache: install", tensors=len(cached))
    materialise_buffers(model, device, positions=rope_positions)
    mark("buffers (rope_init)", bytes=sum(b.numel() * b.element_size() for b in model.buffers()))
    nbytes = sum(t.numel() * dtype.itemsize for t in model.parameters())
    copied = sum(view.shape(n).numel() * dtype.itemsize for n in pending)
    move_to_device(model, pending, device, dtype, finish_module=chain(hook, prepacker),
                   final=cached,
                   progress=device.type != "cpu" and nbytes > _PROGRESS_BYTES)
    check_no_meta(model)
    mark("move: q/k permutation and casts", bytes=copied, tensors=len(pending))
    if cache and not cached:
        cache.write(model)
        mark("quantized cache: write")
    model.leangen = LoadReport(
        checkpoint=tuple(map(str, raw.files)), device=str(device), dtype=dtype_name(dtype),
        config=config, prepacked=prepacker.count if prepacker else None,
        quantization=_quantization(quantizer, cache), seconds=time.perf_counter() - started)
    return model.eval().requires_grad_(False)


def _quantization(quantizer: Quantizer | None, cache) -> Quantization | None:
    """What ``quantize`` did: the scheme, the Linears counted (by the quantizer, by a
    rank's shard hook into the quantizer's counts, or planned from the cache on a hit),
    the int4 groups used and the cache's status; None without ``quantize``."""
    if quantizer is None:
        return None
    done = quantizer.report()
    status = cache.report() if cache else {"status": "off", "file": None}
    return Quantization(scheme=done["kind"], group_size=done["group_size"], counts={"quantized": done["quantized"], "skipped": done["skipped"]},
                        groups=done["groups"], fallbacks=done["fallbacks"],
                        description=done["description"], cache=status["status"],
                        cache_file=status["file"])


def _is_auto(builder: Builder) -> bool:
    return isinstance(builder, str) and builder == "auto"


def resolve_dtype(dtype: str | torch.dtype, view: Checkpoint, device: torch.device) -> torch.dtype:
    """'auto' is the dtype holding most of the checkpoint's floating-point bytes."""
    if dtype == "auto":
        totals: dict[torch.dtype, int] = {}
        for name in view:
            if view.dtype(name).is_floating_point:
                totals[view.dtype(name)] = totals.get(view.dtype(name), 0) + view.shape(name).numel()
        resolved = max(totals, key=totals.get) if totals else torch.float32
    elif isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ConfigError(f"dtype '{dtype}' is unknown. Use auto or one of: {', '.join(DTYPES)}.")
    if not _DTYPE_SUPPORT.get(device.type, lambda _: True)(resolved):
        raise LeangenError(
            f"dtype {resolved} is not supported on {device} ({torch.cuda.get_device_name(device)}). "
            "Use dtype: fp16 or fp32."
        )
    return resolved


def build_on_meta(builder: Builder, **builder_kwargs: Any) -> torch.nn.Module:
    """The builder's model with every parameter on meta: no memory, no random init."""
    from torchtune import config as tt_config
    from torchtune.config._errors import InstantiationError  # a dotted path that does not import

    if isinstance(builder, str):
        builder = OmegaConf.create({"_component_": builder})
    try:
        with torch.device("meta"):
            if isinstance(builder, DictConfig):
                return tt_config.instantiate(builder, **builder_kwargs)
            return builder(**builder_kwargs)
    except (ImportError, AttributeError, TypeError, ValueError, InstantiationError) as e:
        name = builder.get("_component_") if isinstance(builder, DictConfig) else builder
        raise ConfigError(f"model builder {name!r} failed: {e}") from e


def assign(model: torch.nn.Module, view: Checkpoint, *, take: Take | None = None) -> dict[str, Transform]:
    """Attach the checkpoint's mmap views as the parameters; return the transforms still to run.

    ``take(name, meta)``, if given, may return the final tensor for a parameter instead
    (a tensor-parallel rank's DTensor shard, already on its device); None keeps the view."""
    expected = model.state_dict()  # meta tensors: names and shapes only
    # A tied builder has no output.weight: a stored lm_head is dropped, as torchtune does
    # (_check_keys refuses it when config.json says the checkpoint is untied).
    output = output_projection(model)
    tied_builder = output is not None and output.tied
    names = [n for n in view if not (tied_builder and n == "output.weight")]
    _check_keys(expected, names, view)
    _check_shapes(expected, view)
    taken = {}
    for name, meta in expected.items() if take is not None else ():
        tensor = take(name, meta)
        if tensor is not None:
            taken[name] = tensor
    model.load_state_dict({n: taken[n] if n in taken else view.stored(n) for n in expected},
                          strict=True, assign=True)
    return {n: view.entries[n].transform for n in expected
            if n not in taken and view.entries[n].transform.computes}


def _check_keys(expected: dict, names: list[str], view: Checkpoint) -> None:
    missing = [n for n in expected if n not in view]
    unexpected = [n for n in names if n not in expected]
    files = ", ".join(map(str, view.files[:2])) + (" ..." if len(view.files) > 2 else "")
    if missing == ["output.weight"] and "tok_embeddings.weight" in view:
        raise ConversionError(
            f"{files}: the checkpoint ties the output projection to the embedding (no lm_head), "
            "but the builder has a separate output.weight. Use a tied builder (e.g. "
            "llama3_2, qwen2 with tie_word_embeddings=True, gemma) that matches the checkpoint."
        )
    if "output.weight" in view and "output.weight" not in expected \
            and (view.config or {}).get("tie_word_embeddings") is False:
        raise ConversionError(
            f"{files}: the checkpoint has its own output projection (lm_head; config.json says "
            "tie_word_embeddings: false), but the builder ties output.weight to the embedding "
            "and would drop it. Use an untied builder (e.g. tie_word_embeddings=False)."
        )
    counts = [f"{len(names)} {kind} (first: {', '.join(names[:3])})"
              for kind, names in (("missing", missing), ("unexpected", unexpected)) if names]
    if counts:
        raise ConversionError(f"{files}: the checkpoint does not fit the builder: {', '.join(counts)}. "
                              "Check the builder and model_type.")


def _check_shapes(expected: dict, view: Checkpoint) -> None:
    wrong = [(n, view.shape(n), t.shape) for n, t in expected.items() if view.shape(n) != t.shape]
    if wrong:
        listed = "; ".join(f"'{n}': checkpoint {tuple(c)} vs model {tuple(m)}" for n, c, m in wrong[:3])
        raise ConversionError(
            f"{len(wrong)} tensors have the wrong shape ({listed}). The builder probably does "
            "not match the checkpoint: check the model component and its size arguments."
        )
