"""Weight-only int8/int4 quantization while loading (leangen.quant.quantize)."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import DEMO_PROMPT as PROMPT
from tiny_models import DEMO_TOKENS as TOKENS
from tiny_models import GOLDEN_IDS, load_demo
from tiny_models import mapped_file as _mapped_file

import leangen
from leangen.demo import demo_dir
from leangen.errors import ConfigError
from leangen.quant.quantize import Quantizer, QuantSpec, tensor_bytes
from leangen.recipe.metrics import model_bytes


@pytest.fixture(scope="module")
def fp32_logits():
    with torch.no_grad():
        return load_demo()(TOKENS)


@pytest.mark.parametrize("kind, dtype, tolerance", [
    # Tolerances, against the demo's fp32 logits (max |logit| ~12, top-1 margins 3-8 on
    # these positions), as a fraction of the largest logit. int8 per-row scales err by at
    # most 1/254 of a row's largest weight per weight: measured 0.3% (fp32) and 0.6% (with
    # bf16 activations, whose own rounding alone gives 0.3%): bound 2%. int4 steps are
    # 1/15 of a group's range: measured ~4%: bound 8%. Both far below the margins, so
    # the argmax must not move either.
    ("int8", "fp32", 0.02), ("int8", "bf16", 0.02),
    ("int4", "fp32", 0.08), ("int4", "bf16", 0.08),
])
def test_quantized_logits_stay_close_to_full_precision(fp32_logits, kind, dtype, tolerance):
    model = load_demo(quantize=kind, dtype=dtype)
    assert model.leangen.quantized == {"quantized": 15, "skipped": 0}  # 2x7 + the output
    with torch.no_grad():
        logits = model(TOKENS).float()
    scale = fp32_logits.abs().max()
    assert (logits - fp32_logits).abs().max() <= tolerance * scale
    counting = slice(len(PROMPT) - 1, None)  # after BOS the next word is anyone's guess
    assert torch.equal(logits[:, counting].argmax(-1), fp32_logits[:, counting].argmax(-1))
    assert type(model.output.weight) is not torch.Tensor  # torchao's subclass
    assert type(model.tok_embeddings.weight) in (torch.Tensor, torch.nn.Parameter)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_golden_greedy_output_survives_quantization(kind):
    from torchtune.models.llama2 import llama2_tokenizer

    model = load_demo(quantize=kind)
    tokenizer = llama2_tokenizer(str(demo_dir() / "tokenizer.model"), prompt_template=None)
    assert leangen.generate_text(model, tokenizer, "one two three", max_new_tokens=20).tokens == GOLDEN_IDS


def test_model_bytes_count_the_quantized_tensors():
    full, int8, int4 = (model_bytes(load_demo(quantize=q, dtype="bf16")) for q in (None, "int8", "int4"))
    assert int4 < int8 < full
    linear = torch.nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    Quantizer(QuantSpec("int8"), torch.device("cpu"), torch.bfloat16).quantize_linear(linear)
    # int8 rows, plus a bf16 scale and an int64 zero point per row
    assert tensor_bytes(linear.weight) == 64 * 256 + 64 * (2 + 8)


def test_int4_group_falls_back_to_the_largest_divisor_else_skips_and_says_so(capfd):
    spec = QuantSpec("int4", group_size=128)
    assert [spec.group_for(n) for n in (256, 192, 96, 48)] == [128, 64, 32, None]
    assert QuantSpec("int4", group_size=64).group_for(256) == 64
    quantizer = Quantizer(spec, torch.device("cpu"), torch.bfloat16)
    model = torch.nn.Sequential(*(torch.nn.Linear(n, 32).to(torch.bfloat16) for n in (256, 192, 48)))
    for name, module in model.named_children():
        quantizer(name, module)
    quantizer("", model)
    assert quantizer.counts == {"quantized": 2, "skipped": 1}
    assert model[0].weight.block_size[-1] == 128 and model[1].weight.block_size[-1] == 64
    assert type(model[2].weight) is torch.nn.Parameter  # stays full precision
    assert quantizer.report() == {
        "kind": "int4", "group_size": 128, "groups": {128: 1, 64: 1}, "fallbacks": {64: [192]},
        "quantized": 2, "skipped": 1,
        "description": "int4 g128 (g64 on 1 of 2 Linears: in_features 192), 1 of 3 Linears left unquantized"}
    out, err = capfd.readouterr()
    assert out == "" and err == ("note: int4 group 128 does not divide every layer's inputs: group 64 on "
                                 "1 of 2 Linears (in_features 192). Set quantize_group_size: 64 for one "
                                 "group throughout.\n")


def test_int4_defaults_to_group_32_and_reports_the_group_each_weight_has(capfd):
    """The report is what the weights are: every int4 tensor's own block size."""
    assert QuantSpec("int4").group_size == 32
    model = load_demo(quantize="int4", dtype="bf16")  # 64 and 192 wide: 32 divides both
    blocks = {m.weight.block_size[-1] for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert blocks == {32}
    q = model.leangen.quantization
    assert (q.scheme, q.group_size, q.groups, q.fallbacks, q.counts, q.description) == (
        "int4", 32, {32: 15}, {}, {"quantized": 15, "skipped": 0}, "int4 g32")
    assert capfd.readouterr().err == ""  # no fallback, no note


def test_a_group_no_layer_takes_falls_back_everywhere_and_the_report_says_which_widths(capfd):
    model = load_demo(quantize=QuantSpec("int4", group_size=128), dtype="bf16")  # 64 and 192 wide
    blocks = {m.weight.block_size[-1] for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert blocks == {64}
    report = model.leangen.quantization
    assert report.groups == {64: 15} and report.fallbacks == {64: [64, 192]}
    assert report.description == "int4 g128 (g64 on 15 of 15 Linears: in_features 64, 192)"
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: int4 group 128 does not divide")
    assert "group 64 on 15 of 15 Linears (in_features 64, 192)." in err


def test_int8_reports_its_kind_and_no_group():
    model = load_demo(quantize="int8", dtype="bf16")
    q = model.leangen.quantization
    assert (q.scheme, q.group_size, q.groups, q.fallbacks, q.counts, q.description) == (
        "int8", None, {}, {}, {"quantized": 15, "skipped": 0}, "int8")
    assert load_demo().leangen.quantization is None


def test_bad_settings_are_refused_in_one_line():
    for bad in ("int3", "fp8"):
        with pytest.raises(ConfigError, match="Use null, int8 or int4"):
            load_demo(quantize=bad)
    with pytest.raises(ConfigError, match="group size"):
        QuantSpec("int4", group_size=100)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_tied_output_gets_its_own_quantized_copy_and_the_embedding_stays_the_mmap(tiny_checkpoint, kind):
    ckpt = tiny_checkpoint("llama3_2")  # tied by default
    model = leangen.load_model(ckpt.builder, ckpt.path, quantize=kind, **ckpt.builder_kwargs)
    reference = leangen.load_model(ckpt.builder, ckpt.path, **ckpt.builder_kwargs)
    assert isinstance(model.output, torch.nn.Linear)  # was torchtune's TiedLinear
    assert type(model.output.weight) is not torch.nn.Parameter
    embedding = model.tok_embeddings.weight
    assert type(embedding) is torch.nn.Parameter
    mapped = _mapped_file(embedding)  # still the file's mmap, not a copy
    assert mapped is not None and mapped[0] in {str(f.resolve()) for f in ckpt.path.glob("*.safetensors")}
    assert model.leangen.quantized["quantized"] == 2 * 7 + 1
    tokens = torch.tensor([[1, 5, 9, 17, 33, 65]])
    with torch.no_grad():
        got, want = model(tokens), reference(tokens)
    assert (got - want).abs().max() <= (0.02 if kind == "int8" else 0.15) * want.abs().max()


def test_quantization_is_streamed_one_full_precision_linear_at_a_time(monkeypatch):
    """Loaded as bf16 from the fp32 demo, each Linear is cast (a new bf16 tensor) and
    must be quantized before the next one is cast: unquantized Linears stay fp32 mmap."""
    import leangen.quant.quantize as quantize

    resident = []
    model_ref = {}

    def counting(self, linear):
        model = model_ref.get("model")
        if model is not None:
            resident.append(sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear)
                                and type(m.weight) is torch.nn.Parameter
                                and m.weight.dtype == torch.bfloat16))
        return original(self, linear)

    original = quantize.Quantizer.quantize_linear
    monkeypatch.setattr(quantize.Quantizer, "quantize_linear", counting)
    build = leangen.load.pipeline.build_on_meta

    def remember(*args, **kwargs):
        model_ref["model"] = build(*args, **kwargs)
        return model_ref["model"]

    monkeypatch.setattr(leangen.load.pipeline, "build_on_meta", remember)
    model = load_demo(quantize="int8", dtype="bf16")
    assert len(resident) == 15 and max(resident) == 1  # the one about to be quantized
    assert not any(type(m.weight) is torch.nn.Parameter
                   for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_compiled_decode_gives_the_same_greedy_tokens_as_eager(kind):
    from leangen.decode.generation import complete
    from leangen.decode.sampling import sample

    greedy = functools.partial(sample, temperature=0)

    model = load_demo(quantize=kind)
    runs = [complete(model, [PROMPT], max_new_tokens=6, sampler=greedy, stop_tokens=[2],
                     decode_forward=forward).tokens[0]
            for forward in (None, torch.compile(model))]
    assert runs[0] == runs[1] == GOLDEN_IDS[:6]


def test_int8_linear_runs_the_aten_int8_kernel_on_cpu():
    """quantize: int8 installs leangen.quant.int8_kernel in front of torchao's eager path, which
    converts the whole weight to bf16 on every call (~10x slower than bf16 on CPU)."""
    from torchao.dtypes.uintx.plain_layout import _linear_fp_act_int8_weight_impl as torchao_impl

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64, bias=True, dtype=torch.bfloat16).requires_grad_(False)
    Quantizer(QuantSpec("int8"), torch.device("cpu"), torch.bfloat16)(name="layer", module=linear)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    impl = linear.weight.tensor_impl
    expected = torch.ops.aten._weight_int8pack_mm(x.reshape(15, 256), impl.int_data,
                                                  impl.scale.to(x.dtype)).reshape(3, 5, 64) + linear.bias
    assert torch.equal(linear(x), expected)
    # torchao's own path rounds before scaling: the check above can tell the two apart
    assert not torch.equal(torchao_impl(x, linear.weight, linear.bias), expected)
    reference = x.float() @ (impl.int_data.float() * impl.scale.float()[:, None]).T + linear.bias.float()
    torch.testing.assert_close(linear(x).float(), reference, atol=0.05, rtol=0.02)



def test_int8_kernel_takes_a_weight_that_is_not_64_byte_aligned():
    """The quantized cache's tensors sit 8 bytes past a 64-byte boundary (safetensors'
    layout), and torch's _weight_int8pack_mm crashed the process (SIGSEGV) on such a
    weight with several input rows (a prefill). A regression here kills the test run."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 256, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    Quantizer(QuantSpec("int8"), torch.device("cpu"), torch.bfloat16)(name="layer", module=linear)
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    aligned = linear(x)
    impl = linear.weight.tensor_impl
    buffer = torch.empty(impl.int_data.numel() + 64, dtype=torch.int8)
    start = (8 - buffer.data_ptr()) % 64
    impl.int_data = buffer[start:start + impl.int_data.numel()].view(impl.int_data.shape).copy_(impl.int_data)
    assert impl.int_data.data_ptr() % 64 == 8
    assert torch.equal(linear(x), aligned)
    assert torch.equal(linear(x[:1]), aligned[:1])  # one row: read in place

# -- large Linears are quantized in row chunks (peak memory: one chunk's temporaries) ----

def quantized_parts(t: torch.Tensor) -> list:
    """Everything that makes a torchao tensor, recursively: class, flatten context, outer
    shape and strides, and each plain inner tensor (compared with torch.equal)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return [(t.dtype, t.shape, t.stride(), t)]
    names, context = t.__tensor_flatten__()
    return [(type(t), context, t.shape, t.stride(), names),
            *(part for n in names for part in quantized_parts(getattr(t, n)))]


def assert_identical(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = quantized_parts(got), quantized_parts(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(g[-1], torch.Tensor):
            assert g[:-1] == w[:-1] and torch.equal(g[-1], w[-1])
        else:
            assert g == w


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of ROW_MULTIPLE (64) rows, so the small layers here are cut in several."""
    import leangen.quant.quantize as quantize

    monkeypatch.setattr(quantize, "CHUNK_BYTES", 1)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [256, 208])  # 208: a last chunk of 16 rows, a partial int4 block
def test_row_chunks_join_into_the_whole_layer_bit_for_bit(small_chunks, monkeypatch, kind, rows):
    torch.manual_seed(0)
    quantizer = Quantizer(QuantSpec(kind), torch.device("cpu"), torch.bfloat16)
    weight = torch.randn(rows, 256, dtype=torch.bfloat16)
    whole = torch.nn.Linear(256, rows, bias=True, dtype=torch.bfloat16).requires_grad_(False)
    whole.weight.copy_(weight)
    chunked = torch.nn.Linear(256, rows, bias=True, dtype=torch.bfloat16).requires_grad_(False)
    chunked.load_state_dict(whole.state_dict())
    from torchao.quantization import quantize_

    quantize_(whole, quantizer.config(whole))  # torchao, the whole layer at once
    calls = []
    original = Quantizer.quantize_weight
    monkeypatch.setattr(Quantizer, "quantize_weight",
                        lambda self, w, c: calls.append(w.shape[0]) or original(self, w, c))
    quantizer.quantize_linear(chunked)
    assert calls == [64] * (rows // 64) + ([rows % 64] if rows % 64 else [])
    assert_identical(chunked.weight, whole.weight)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(chunked(x), whole(x))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_chunked_quantization_gives_the_same_logits(monkeypatch, kind):
    """The demo's MLP (192 rows) and output (96) are cut in 64-row chunks with small_chunks."""
    import leangen.quant.quantize as quantize

    with torch.no_grad():
        whole = load_demo(quantize=kind, dtype="bf16")(TOKENS)
        monkeypatch.setattr(quantize, "CHUNK_BYTES", 1)
        chunked = load_demo(quantize=kind, dtype="bf16")(TOKENS)
    assert torch.equal(chunked, whole)


def test_no_chunk_handed_to_torchao_is_larger_than_the_chunk_size(tiny_checkpoint, small_chunks,
                                                                  monkeypatch):
    """The tied output (128 x 64) included: it is quantized in untie, not in the move."""
    import torchao.quantization

    sizes = []
    original = torchao.quantization.quantize_
    monkeypatch.setattr(torchao.quantization, "quantize_",
                        lambda module, config: sizes.append(module.weight.shape[0])
                        or original(module, config))
    ckpt = tiny_checkpoint("llama3_2")
    model = leangen.load_model(ckpt.builder, ckpt.path, quantize="int8", **ckpt.builder_kwargs)
    assert model.leangen.quantized == {"quantized": 15, "skipped": 0}
    assert max(sizes) == 64 and sizes.count(64) > 15  # 128-row layers went in two chunks


def test_a_format_whose_rows_are_not_known_is_quantized_whole(small_chunks, monkeypatch):
    """A torchao format missing from ROW_DIMS (CUDA's tile-packed int4) is not cut: the
    first chunk shows the format, then the whole layer goes through torchao at once."""
    import leangen.quant.quantize as quantize

    monkeypatch.setattr(quantize, "ROW_DIMS", {})
    torch.manual_seed(0)
    quantizer = Quantizer(QuantSpec("int4"), torch.device("cpu"), torch.bfloat16)
    linear = torch.nn.Linear(256, 128, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    reference = quantizer.quantize_weight(linear.weight, quantizer.config(linear))
    assert quantizer.quantize_rows(linear.weight, quantizer.config(linear)) is None
    quantizer.quantize_linear(linear)
    assert_identical(linear.weight, reference)


def test_int4_group_256_on_cpu_is_one_line():
    """QuantSpec takes 256 (CUDA's tile-packed int4 does), but torchao's CPU packing
    asserts on it: the load must say so instead of failing inside torchao."""
    with pytest.raises(ConfigError, match="int4 on CPU takes groups of 128, 64, 32.*not 256"):
        Quantizer(QuantSpec("int4", 256), torch.device("cpu"), torch.bfloat16)
