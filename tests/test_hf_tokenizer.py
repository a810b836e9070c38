"""tokenizer: auto: a model folder's tokenizer, encoding exactly as transformers does.

The folders are built offline by tiny_models.py: a byte-level BPE trained with `tokenizers`
on a few hundred made-up words, saved through transformers' PreTrainedTokenizerFast.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tiny_models import copy_folder, edit_json, transformers_tokenizer, write_tiktoken_file

from leangen.decode.text import resolve_add_bos, tokenize
from leangen.errors import ConfigError
from leangen.hf.tokenizer import HFTokenizer, tokenizer_from_folder, tokenizer_model_kind
from leangen.recipe.components import tokenizer_from_config

DEMO = Path(__file__).parent.parent / "leangen" / "demo"

TEXTS = ["kalo mine ruti", "  two  spaces\n\n\nthree newlines\t\ttabs   ", "日本语 ßé kavo, zequ!", "", " x",
         "line one\r\nline two\n \n  indented", "kalo<|eot_id|>mine"]


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_encode_equals_transformers(tokenizer_folders, name):
    folder = tokenizer_folders[name]
    hf, ours = transformers_tokenizer(folder), HFTokenizer(folder)
    for text in TEXTS:
        expected = hf(text)["input_ids"]
        assert tokenize(text, ours, add_bos="auto").tokens == expected, text
        assert ours.encode(text, add_bos=ours.add_bos_default, add_eos=ours.add_eos_default) == expected, text


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_decode_round_trips(tokenizer_folders, name):
    hf, ours = transformers_tokenizer(tokenizer_folders[name]), HFTokenizer(tokenizer_folders[name])
    for text in TEXTS:
        ids = ours.encode(text, add_bos=True, add_eos=True)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        if "<|" not in text:
            assert ours.decode(ids) == text


def test_special_tokens_come_from_the_files(llama_tokenizer_folder, qwen_tokenizer_folder):
    llama = HFTokenizer(llama_tokenizer_folder)
    hf = transformers_tokenizer(llama_tokenizer_folder)
    assert (llama.bos_id, llama.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert llama.add_bos_default and not llama.add_eos_default  # from tokenizer.json's post-processor
    qwen = HFTokenizer(qwen_tokenizer_folder)
    assert qwen.bos_id is None and not qwen.add_bos_default
    assert qwen.eos_id == transformers_tokenizer(qwen_tokenizer_folder).convert_tokens_to_ids("<|im_end|>")
    assert qwen.pad_id == transformers_tokenizer(qwen_tokenizer_folder).convert_tokens_to_ids("<|endoftext|>")
    assert qwen.vocab_size == len(transformers_tokenizer(qwen_tokenizer_folder))


def test_the_post_processor_decides_bos_as_in_transformers(tmp_path, qwen_tokenizer_folder):
    """transformers 5 ignores add_bos_token/add_eos_token next to a tokenizer.json."""
    copy_folder(qwen_tokenizer_folder, tmp_path)
    edit_json(tmp_path / "tokenizer_config.json", bos_token="<|im_start|>", add_bos_token=True, add_eos_token=True)
    hf, ours = transformers_tokenizer(tmp_path), HFTokenizer(tmp_path)
    assert ours.bos_id == hf.bos_token_id is not None
    assert not ours.add_bos_default and not ours.add_eos_default
    for text in TEXTS:
        assert tokenize(text, ours, add_bos="auto").tokens == hf(text)["input_ids"]
    assert tokenize("kalo", ours, add_bos=True).tokens[0] == ours.bos_id


def test_stop_tokens_are_the_union_with_generation_config(llama_tokenizer_folder, qwen_tokenizer_folder):
    hf = transformers_tokenizer(llama_tokenizer_folder)
    llama = HFTokenizer(llama_tokenizer_folder)
    assert llama.stop_tokens == sorted({hf.convert_tokens_to_ids("<|end_of_text|>"), hf.eos_token_id})
    qwen = HFTokenizer(qwen_tokenizer_folder)
    assert set(qwen.stop_tokens) == {qwen.eos_id, qwen.pad_id}


def test_resolve_add_bos(llama_tokenizer_folder, qwen_tokenizer_folder):
    llama, qwen = HFTokenizer(llama_tokenizer_folder), HFTokenizer(qwen_tokenizer_folder)
    assert resolve_add_bos("auto", llama) and not resolve_add_bos("auto", qwen)
    assert not resolve_add_bos(False, llama) and not resolve_add_bos("false", llama)
    assert not resolve_add_bos(True, qwen)  # no BOS token to add
    assert tokenize("kalo", llama, add_bos=False).tokens == llama.encode("kalo", add_bos=False, add_eos=False)
    with pytest.raises(ConfigError, match="add_bos: 'maybe'"):
        resolve_add_bos("maybe", llama)


# -- tokenizer: auto -----------------------------------------------------------------

def test_tokenizer_auto_from_config(llama_tokenizer_folder, tmp_path):
    weights = tmp_path / "model.safetensors"
    for f in llama_tokenizer_folder.iterdir():
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


def test_tokenizer_model_kind_is_read_from_the_content(tmp_path):
    assert tokenizer_model_kind(DEMO / "tokenizer.model") == "sentencepiece"
    assert tokenizer_model_kind(write_tiktoken_file(tmp_path / "tokenizer.model")) == "tiktoken"
    (tmp_path / "junk.model").write_bytes(b"\xff\xfe not a tokenizer")
    with pytest.raises(ConfigError, match="neither a sentencepiece"):
        tokenizer_model_kind(tmp_path / "junk.model")


def test_tokenizer_model_folders_use_torchtune_tokenizers(tmp_path):
    from torchtune.models.llama2 import Llama2Tokenizer
    from torchtune.models.llama3 import Llama3Tokenizer

    demo = tokenizer_from_folder(DEMO)  # sentencepiece
    assert isinstance(demo, Llama2Tokenizer) and resolve_add_bos("auto", demo)

    write_tiktoken_file(tmp_path / "tokenizer.model")
    edit_json(tmp_path / "generation_config.json", eos_token_id=7)
    edit_json(tmp_path / "tokenizer_config.json", add_bos_token=False)
    tiktoken = tokenizer_from_folder(tmp_path)
    assert isinstance(tiktoken, Llama3Tokenizer)
    assert 7 in tiktoken.stop_tokens and tiktoken.eos_id in tiktoken.stop_tokens
    assert not resolve_add_bos("auto", tiktoken)
    assert tokenize("kalo mi", tiktoken).tokens == tiktoken.encode("kalo mi", add_bos=False, add_eos=False)


def test_lm_eval_tok_encode_follows_add_bos(llama_tokenizer_folder, qwen_tokenizer_folder):
    pytest.importorskip("lm_eval")
    import torch

    from leangen.evaluation.lm_eval_adapter import LeangenLM

    model = torch.nn.Linear(1, 1)  # tok_encode never runs the model
    for folder in (llama_tokenizer_folder, qwen_tokenizer_folder):
        lm = LeangenLM(model, HFTokenizer(folder), max_length=16)
        assert lm.tok_encode("kalo mine") == transformers_tokenizer(folder)("kalo mine")["input_ids"]
    llama = HFTokenizer(llama_tokenizer_folder)
    assert LeangenLM(model, llama, max_length=16, add_bos=False).tok_encode("kalo")[0] != llama.bos_id
