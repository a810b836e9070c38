"""Recipe configs: find the YAML, apply overrides, validate keys and types.

``--config X`` is a path or the name of a packaged config (``recipes/configs/`` in
the repo, ``leangen._configs`` in the wheel). ``key=value`` and ``~key`` overrides go
through torchtune's own merge, so they behave exactly as with ``tune run``. Keys and
types are then checked against the recipe's dataclass schema with OmegaConf.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from leangen.demo import demo_dir
from leangen.errors import ConfigError, LeangenError

DEBUG_ENV = "LEANGEN_DEBUG"


def _demo_file(name: str = "") -> str:
    return str(demo_dir() / name)


# `${leangen.demo:tokenizer.model}` in a YAML is a file of the shipped demo model.
OmegaConf.register_resolver("leangen.demo", _demo_file, replace=True)


def packaged_configs_dir() -> Path:
    """Where the packaged YAMLs are: ``leangen/_configs`` in a wheel (pyproject maps
    recipes/configs there), else ``recipes/configs`` beside an editable checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "_configs"
    return installed if installed.is_dir() else here.parent / "recipes" / "configs"


def packaged_config_names() -> list[str]:
    return sorted(p.stem for p in packaged_configs_dir().glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    packaged = packaged_configs_dir() / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    raise ConfigError(
        f"config '{name_or_path}' is neither a file nor a packaged config. "
        f"Packaged: {', '.join(packaged_config_names())}."
    )


def parse_args(argv: Sequence[str], schema: type) -> DictConfig:
    """``--config X [key=value | ~key ...]`` to a validated config for ``schema``."""
    from torchtune.config._utils import _merge_yaml_and_cli_args

    parser = argparse.ArgumentParser(add_help=True)
    parser.add_argument("--config", required=True, help="YAML path or packaged config name")
    args, overrides = parser.parse_known_args(argv)
    path = resolve_config_path(args.config)
    try:
        yaml = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if not isinstance(yaml, dict):
            raise ValueError("the top level must be a mapping of keys to values")
        merged = _merge_yaml_and_cli_args(argparse.Namespace(**yaml), overrides)
    except (ValueError, OmegaConfBaseException, YAMLError) as e:
        raise ConfigError(f"{path}: {_one_line(e)}") from e
    return validate(merged, schema, source=str(path))


def validate(cfg: DictConfig, schema: type, *, source: str = "config") -> DictConfig:
    """Unknown keys and wrong types fail with the key's name; defaults fill the rest."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        known = ", ".join(f.name for f in fields(schema))
        raise ConfigError(
            f"{source}: invalid key '{key}': {_one_line(e)}. Valid top-level keys: {known}."
        ) from e
    missing = sorted(OmegaConf.missing_keys(typed))
    if missing:
        raise ConfigError(f"{source}: required key '{missing[0]}' is not set.")
    return typed


def output_path(key: str, value: str | None) -> Path | None:
    """An output file the recipe will write, checked before any work starts."""
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(f"{key}: '{value}' is a folder; give a file name.")
    if not path.resolve().parent.is_dir():
        raise ConfigError(f"{key}: the folder of '{value}' does not exist.")
    return path


def _one_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def run_recipe(main: Callable[[list[str]], Any]) -> Callable[[list[str] | None], int]:
    """Wrap a recipe's main: user errors print one line and exit 1, no traceback
    unless LEANGEN_DEBUG=1."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        argv = sys.argv[1:] if argv is None else argv
        try:
            main(argv)
        except (LeangenError, FileNotFoundError) as e:
            if os.environ.get(DEBUG_ENV):
                raise
            # one line whatever the message holds (torchtune's errors span several)
            print("error: " + " ".join(str(e).split()), file=sys.stderr)
            return 1
        return 0

    return wrapper
