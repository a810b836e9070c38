"""The package tree shows the pipeline, and dotted paths that YAMLs already name keep working."""

import importlib
from pathlib import Path

import pytest
from torchtune.config._utils import _get_component_from_path

import leangen

PACKAGE = Path(leangen.__file__).resolve().parent
STAGES = ["checkpoint", "hf", "load", "quant", "parallel", "decode", "evaluation", "recipe"]


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_is_a_package_that_says_what_it_holds(stage):
    module = importlib.import_module(f"leangen.{stage}")
    assert (PACKAGE / stage / "__init__.py").is_file()
    assert module.__doc__ and module.__doc__.strip()


def test_the_recipes_stay_where_tune_run_finds_them():
    # `tune run leangen/generate` runs the module leangen.generate through runpy
    for recipe in ("generate", "eval"):
        assert callable(importlib.import_module(f"leangen.{recipe}").main)


def test_top_level_modules_are_only_the_recipes_errors_and_old_paths():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "errors", "eval", "generate", "hf_config"]


@pytest.mark.parametrize("old, new", [
    ("leangen.hf_config.gemma2", "leangen.hf.builders.gemma2"),
    ("leangen.hf_config.llama2_tied", "leangen.hf.builders.llama2_tied"),
])
def test_builder_paths_written_in_older_yamls_resolve_as_torchtune_resolves_them(old, new):
    assert _get_component_from_path(old) is _get_component_from_path(new)


def test_public_api_is_importable_from_the_package():
    for name in ("load_model", "load_tensors", "open_checkpoint", "generate_text",
                 "LeangenError", "ConfigError", "CheckpointError", "ConversionError"):
        assert hasattr(leangen, name), name
