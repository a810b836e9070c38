"""tokenizer: auto: a model folder's tokenizer, encoding exactly as transformers does.

The folders are built here, offline: a byte-level BPE trained with `tokenizers` on a
few hundred made-up words, saved through transformers' PreTrainedTokenizerFast.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from leangen.decode.text import resolve_add_bos, tokenize
from leangen.errors import ConfigError
from leangen.hf.tokenizer import HFTokenizer, tokenizer_from_folder, tokenizer_model_kind
from leangen.recipe.components import tokenizer_from_config

DEMO = Path(__file__).parent.parent / "leangen" / "demo"

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Qwen2.5's own, shortened: a default system prompt, ChatML turns, whitespace control
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

TEXTS = ["kalo mine ruti", "  two  spaces\n\n\nthree newlines\t\ttabs   ", "日本语 ßé kavo, zequ!", "", " x",
         "line one\r\nline two\n \n  indented", "kalo<|eot_id|>mine"]


def _texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "qu", "é", "ß", "日本", "语", "\n", "  "]
    return [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(8))
            for _ in range(60)]


def train_bpe(specials: list[str], *, seed: int, qwen: bool = False):
    """A ~500-token byte-level BPE (Llama-3 style, or Qwen2's split + NFC)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if qwen:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_texts(seed), trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(changes)
    path.write_text(json.dumps(data, indent=1))


def make_llama_folder(root: Path) -> Path:
    """Llama-3 style: BOS from tokenizer.json's post-processor, <|eot_id|> as eos,
    a template with {{ bos_token }}, and generation_config's eos a list."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>"], seed=0)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                            chat_template=LLAMA_TEMPLATE).save_pretrained(root)
    _edit_json(root / "generation_config.json",
               eos_token_id=[tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")])
    return root


def make_qwen_folder(root: Path) -> Path:
    """Qwen2.5 style: no BOS (add_bos_token false), <|im_end|> eos, ChatML template
    with a default system prompt in tokenizer_config.json."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], seed=1, qwen=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=QWEN_TEMPLATE).save_pretrained(root)
    (root / "chat_template.jinja").unlink(missing_ok=True)  # the template in tokenizer_config.json instead
    _edit_json(root / "tokenizer_config.json", chat_template=QWEN_TEMPLATE, add_bos_token=False, bos_token=None)
    _edit_json(root / "generation_config.json",
               eos_token_id=[tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")])
    return root


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory) -> Path:
    return make_llama_folder(tmp_path_factory.mktemp("llama-tok"))


@pytest.fixture(scope="session")
def qwen_folder(tmp_path_factory) -> Path:
    return make_qwen_folder(tmp_path_factory.mktemp("qwen-tok"))


@pytest.fixture(scope="session")
def folders(llama_folder, qwen_folder) -> dict[str, Path]:
    return {"llama": llama_folder, "qwen": qwen_folder}


def _hf(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# -- encoding ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_encode_equals_transformers(folders, name):
    folder = folders[name]
    hf, ours = _hf(folder), HFTokenizer(folder)
    for text in TEXTS:
        expected = hf(text)["input_ids"]
        assert tokenize(text, ours, add_bos="auto").tokens == expected, text
        assert ours.encode(text, add_bos=ours.add_bos_default, add_eos=ours.add_eos_default) == expected, text


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_decode_round_trips(folders, name):
    hf, ours = _hf(folders[name]), HFTokenizer(folders[name])
    for text in TEXTS:
        ids = ours.encode(text, add_bos=True, add_eos=True)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        if "<|" not in text:
            assert ours.decode(ids) == text


def test_special_tokens_come_from_the_files(llama_folder, qwen_folder):
    llama = HFTokenizer(llama_folder)
    hf = _hf(llama_folder)
    assert (llama.bos_id, llama.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert llama.add_bos_default and not llama.add_eos_default  # from tokenizer.json's post-processor
    qwen = HFTokenizer(qwen_folder)
    assert qwen.bos_id is None and not qwen.add_bos_default
    assert qwen.eos_id == _hf(qwen_folder).convert_tokens_to_ids("<|im_end|>")
    assert qwen.pad_id == _hf(qwen_folder).convert_tokens_to_ids("<|endoftext|>")
    assert qwen.vocab_size == len(_hf(qwen_folder))


def test_the_post_processor_decides_bos_as_in_transformers(tmp_path, qwen_folder):
    """transformers 5 ignores add_bos_token/add_eos_token next to a tokenizer.json."""
    for f in qwen_folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    _edit_json(tmp_path / "tokenizer_config.json", bos_token="<|im_start|>", add_bos_token=True, add_eos_token=True)
    hf, ours = _hf(tmp_path), HFTokenizer(tmp_path)
    assert ours.bos_id == hf.bos_token_id is not None
    assert not ours.add_bos_default and not ours.add_eos_default
    for text in TEXTS:
        assert tokenize(text, ours, add_bos="auto").tokens == hf(text)["input_ids"]
    assert tokenize("kalo", ours, add_bos=True).tokens[0] == ours.bos_id


def test_stop_tokens_are_the_union_with_generation_config(llama_folder, qwen_folder):
    hf = _hf(llama_folder)
    llama = HFTokenizer(llama_folder)
    assert llama.stop_tokens == sorted({hf.convert_tokens_to_ids("<|end_of_text|>"), hf.eos_token_id})
    qwen = HFTokenizer(qwen_folder)
    assert set(qwen.stop_tokens) == {qwen.eos_id, qwen.pad_id}


def test_resolve_add_bos(llama_folder, qwen_folder):
    llama, qwen = HFTokenizer(llama_folder), HFTokenizer(qwen_folder)
    assert resolve_add_bos("auto", llama) and not resolve_add_bos("auto", qwen)
    assert not resolve_add_bos(False, llama) and not resolve_add_bos("false", llama)
    assert not resolve_add_bos(True, qwen)  # no BOS token to add
    assert tokenize("kalo", llama, add_bos=False).tokens == llama.encode("kalo", add_bos=False, add_eos=False)
    with pytest.raises(ConfigError, match="add_bos: 'maybe'"):
        resolve_add_bos("maybe", llama)


# -- tokenizer: auto -----------------------------------------------------------------

def test_tokenizer_auto_from_config(llama_folder, tmp_path):
    weights = tmp_path / "model.safetensors"
    for f in llama_folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights.write_bytes(b"")
    for path in (str(tmp_path), str(weights), [str(weights)]):
        cfg = OmegaConf.create({"tokenizer": "auto", "checkpoint": {"path": path}})
        assert isinstance(tokenizer_from_config(cfg), HFTokenizer)


def test_a_folder_without_tokenizer_files_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as error:
        tokenizer_from_folder(tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message and "tokenizer.json" in message


def test_tokenizer_auto_with_a_missing_checkpoint_names_it(tmp_path):
    cfg = OmegaConf.create({"tokenizer": "auto", "checkpoint": {"path": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match="nope.*does not exist"):
        tokenizer_from_config(cfg)


def _tiktoken_file(path: Path) -> Path:
    merges = [b"ka", b"lo", b"mi", b"kalo"]
    tokens = [bytes([b]) for b in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def test_tokenizer_model_kind_is_read_from_the_content(tmp_path):
    assert tokenizer_model_kind(DEMO / "tokenizer.model") == "sentencepiece"
    assert tokenizer_model_kind(_tiktoken_file(tmp_path / "tokenizer.model")) == "tiktoken"
    (tmp_path / "junk.model").write_bytes(b"\xff\xfe not a tokenizer")
    with pytest.raises(ConfigError, match="neither a sentencepiece"):
        tokenizer_model_kind(tmp_path / "junk.model")


def test_tokenizer_model_folders_use_torchtune_tokenizers(tmp_path):
    from torchtune.models.llama2 import Llama2Tokenizer
    from torchtune.models.llama3 import Llama3Tokenizer

    demo = tokenizer_from_folder(DEMO)  # sentencepiece
    assert isinstance(demo, Llama2Tokenizer) and resolve_add_bos("auto", demo)

    _tiktoken_file(tmp_path / "tokenizer.model")
    _edit_json(tmp_path / "generation_config.json", eos_token_id=7)
    _edit_json(tmp_path / "tokenizer_config.json", add_bos_token=False)
    tiktoken = tokenizer_from_folder(tmp_path)
    assert isinstance(tiktoken, Llama3Tokenizer)
    assert 7 in tiktoken.stop_tokens and tiktoken.eos_id in tiktoken.stop_tokens
    assert not resolve_add_bos("auto", tiktoken)
    assert tokenize("kalo mi", tiktoken).tokens == tiktoken.encode("kalo mi", add_bos=False, add_eos=False)


def test_lm_eval_tok_encode_follows_add_bos(llama_folder, qwen_folder):
    pytest.importorskip("lm_eval")
    import torch

    from leangen.evaluation.lm_eval_adapter import LeangenLM

    model = torch.nn.Linear(1, 1)  # tok_encode never runs the model
    for folder in (llama_folder, qwen_folder):
        lm = LeangenLM(model, HFTokenizer(folder), max_length=16)
        assert lm.tok_encode("kalo mine") == _hf(folder)("kalo mine")["input_ids"]
    llama = HFTokenizer(llama_folder)
    assert LeangenLM(model, llama, max_length=16, add_bos=False).tok_encode("kalo")[0] != llama.bos_id
