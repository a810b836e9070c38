"""Recipe configs: find the YAML, apply overrides, validate keys and types.

``--config X`` is a path or the name of a packaged config (``recipes/configs/`` in
the repo, ``leangen._configs`` in the wheel). ``key=value`` and ``~key`` overrides are
read by the type the schema gives each key (leangen.recipe.overrides: text stays text),
with torchtune's removals and ``_component_`` shorthand. Keys and types are then checked
against the recipe's dataclass schema with OmegaConf.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import typing
import warnings
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from yaml import YAMLError

from leangen.demo import demo_dir
from leangen.errors import ConfigError, Interrupted, LeangenError
from leangen.parallel.ranks import peer_failure, stop
from leangen.recipe.console import DEBUG_ENV, INTERRUPTED, print_line, show_warning
from leangen.recipe.overrides import apply_overrides, type_name, unknown_key


def _demo_file(name: str = "") -> str:
    return str(demo_dir() / name)


# `${leangen.demo:tokenizer.model}` in a YAML is a file of the shipped demo model.
OmegaConf.register_resolver("leangen.demo", _demo_file, replace=True)


def packaged_configs_dir() -> Path:
    """Where the packaged YAMLs are: ``leangen/_configs`` in a wheel (pyproject maps
    recipes/configs there), else ``recipes/configs`` beside an editable checkout."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "_configs"
    return installed if installed.is_dir() else package.parent / "recipes" / "configs"


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
    """``--config X [key=value | ~key ...]`` to a validated config for ``schema``.

    ``--help``, ``--list-configs`` and ``--copy-config NAME DEST`` answer and exit
    (SystemExit 0), in the spirit of ``tune ls`` and ``tune cp``. Overrides are read by
    the type the schema gives their key (leangen.recipe.overrides).
    """
    args, overrides = _cli_parser(schema).parse_known_args(argv)
    if args.help or args.list_configs or args.copy_config:
        _answer_and_exit(args, schema)
    if args.config is None:
        raise ConfigError("--config is required: a YAML path or a packaged config name "
                          "(--list-configs shows them; --help shows the keys).")
    path = resolve_config_path(args.config)
    config = _load_yaml(path)
    check_recipe(args.config, path, config, schema)
    return validate(apply_overrides(config, overrides, schema), schema, source=str(path))


def _load_yaml(path: Path) -> DictConfig:
    try:
        config = OmegaConf.load(path)
    except (OmegaConfBaseException, YAMLError) as e:
        raise ConfigError(f"{path}: {_one_line(e)}") from e
    if not isinstance(config, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values.")
    return config


# Where each recipe's schema is, to tell a user who ran one recipe with the other's config.
RECIPE_SCHEMAS = {"generate": ("leangen.generate", "GenerateConfig"), "eval": ("leangen.eval", "EvalConfig")}


def check_recipe(name: str, path: Path, config: DictConfig, schema: type) -> None:
    """A config written for the other recipe (its header says so, or its keys fit only
    that recipe's schema) fails with the command that runs it."""
    mine = recipe_name(schema)
    if set(config) <= _top_level_keys(schema):
        return
    for other in RECIPE_SCHEMAS:
        if other != mine and (_header_recipe(path) == other or set(config) <= _top_level_keys(_schema(other))):
            raise ConfigError(f"{name} is a config for leangen/{other}: run "
                              f"`tune run leangen/{other} --config {name}` (or leangen-{other}).")


def _header_recipe(path: Path) -> str | None:
    """The one recipe the config's leading comments name (``tune run leangen/eval ...``)."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    named = set(re.findall(r"leangen/(\w+)", "\n".join(header))) & set(RECIPE_SCHEMAS)
    return named.pop() if len(named) == 1 else None


def _top_level_keys(schema: type) -> set[str]:
    return {f.name for f in fields(schema)}


def _schema(recipe: str) -> type:
    module, name = RECIPE_SCHEMAS[recipe]
    return getattr(importlib.import_module(module), name)


def config_key(default: Any, help: str, cli_type: Any = None) -> Any:
    """A recipe config key with the meaning ``--help`` shows. ``cli_type``: the type a
    command-line value is read as, where the field is ``Any`` for OmegaConf's sake (a
    string or a block: OmegaConf has no such Union)."""
    metadata = {"help": help, **({"cli_type": cli_type} if cli_type is not None else {})}
    if isinstance(default, (list, dict)):  # a mutable default needs a fresh copy per config
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _cli_parser(schema: type) -> argparse.ArgumentParser:
    # add_help=False: --help must show the config keys, which argparse does not know
    parser = argparse.ArgumentParser(prog=f"leangen-{recipe_name(schema)}", add_help=False)
    parser.add_argument("--config", help="YAML path or packaged config name")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--list-configs", action="store_true")
    parser.add_argument("--copy-config", nargs=2, metavar=("NAME", "DEST"))
    return parser


def _answer_and_exit(args: argparse.Namespace, schema: type) -> None:
    if args.copy_config:
        answer = f"copied to {copy_config(*args.copy_config)}"
    elif args.list_configs:
        answer = list_configs(recipe_name(schema))
    else:
        answer = help_text(schema)
    try:
        print(answer, flush=True)
    except BrokenPipeError:  # `--help | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(0)


def recipe_name(schema: type) -> str:
    """``generate`` or ``eval``: the schema's RECIPE class attribute."""
    return getattr(schema, "RECIPE", "generate")


def config_description(path: Path) -> str:
    """A packaged YAML's first comment line, after its ``name:`` prefix."""
    first = path.read_text().splitlines()[0] if path.read_text() else ""
    return first.lstrip("# ").split(": ", 1)[-1] if first.startswith("#") else ""


def list_configs(recipe: str) -> str:
    """The packaged configs that run with ``recipe``, a line each with what they run."""
    paths = [packaged_configs_dir() / f"{name}.yaml" for name in packaged_config_names()]
    mine = [p for p in paths if f"leangen/{recipe} " in p.read_text()]
    width = max((len(p.stem) for p in mine), default=0)
    return "\n".join(f"{p.stem:<{width}}  {config_description(p)}" for p in mine)


def copy_config(name: str, dest: str) -> Path:
    """Copy a packaged config to ``dest`` (a file, or a folder to put NAME.yaml in);
    like ``tune cp``, an existing file is never overwritten."""
    source = resolve_config_path(name)
    target = Path(dest).expanduser()
    if dest.endswith(("/", os.sep)) and not target.is_dir():  # Path() drops the slash
        raise ConfigError(f"--copy-config: the folder '{dest}' does not exist.")
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise ConfigError(f"--copy-config: '{target}' already exists; choose another destination.")
    if not target.parent.is_dir():
        raise ConfigError(f"--copy-config: the folder of '{target}' does not exist.")
    shutil.copyfile(source, target)
    return target


def help_text(schema: type) -> str:
    """Usage, every config key with its default and meaning, and the packaged configs."""
    recipe = recipe_name(schema)
    lines = [
        f"usage: leangen-{recipe} --config CONFIG [key=value | key=null | ~key ...]",
        f"       (also: tune run leangen/{recipe} --config CONFIG ..., python -m leangen.{recipe} ...)",
        f"       leangen-{recipe} --list-configs | --copy-config NAME DEST | --help",
        "",
        "CONFIG is a YAML path or a packaged config name. Keys (type, default, meaning):",
        *_key_lines(schema),
        "",
        "key=value: a str key takes the text after the first '=' as typed; int, float and bool keys",
        "are read as in YAML, list keys as [a, b] or one item, key=null unsets a key that allows null.",
        "Keys of a free block (type any: model.*, tokenizer.*, checkpoint.*) are read as YAML, but",
        "text YAML cannot read back as typed stays text; 'key=\"3\"' (shell-quoted) is the string 3.",
        "",
        f"Packaged configs for leangen/{recipe}:",
        *("  " + line for line in list_configs(recipe).splitlines()),
        "",
        f"Errors print one line; set {DEBUG_ENV}=1 for a traceback.",
    ]
    return "\n".join(lines)


def _key_lines(schema: type, prefix: str = "") -> list[str]:
    lines, hints = [], typing.get_type_hints(schema)
    for f in fields(schema):
        nested = _dataclass_of(hints[f.name])
        default = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
        shown = "???" if default is MISSING else json.dumps(default, default=str)
        kind = type_name(f.metadata.get("cli_type") or hints[f.name])
        lines.append(f"  {prefix + f.name:<28} {kind:<16} {shown:<14} {f.metadata.get('help', '')}".rstrip())
        if nested:
            lines += _key_lines(nested, prefix + f.name + ".")
    return lines


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass inside ``Optional[X]``, or None."""
    candidates = typing.get_args(annotation) or (annotation,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def validate(cfg: DictConfig, schema: type, *, source: str = "config") -> DictConfig:
    """Unknown keys and wrong types fail with the key's name; defaults fill the rest."""
    _lists_from_scalars(cfg, schema)
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except ConfigKeyError as e:
        raise ConfigError(f"{source}: {_unknown_key(e.full_key, schema)}") from e
    except (OmegaConfBaseException, TypeError) as e:
        key = getattr(e, "full_key", None) or "a key"
        raise ConfigError(f"{source}: '{key}' has a value of the wrong type: {_one_line(e).rstrip('.')}. "
                          f"--help shows each key's type and default.") from e
    missing = sorted(OmegaConf.missing_keys(typed))
    if missing:
        raise ConfigError(f"{source}: required key '{missing[0]}' is not set.")
    return typed


def _lists_from_scalars(cfg: DictConfig, schema: type) -> None:
    """One value where the schema wants a list is a list of one: ``lm_eval.tasks=arc_easy``."""
    hints = typing.get_type_hints(schema)  # real types even under `from __future__ import annotations`
    for f in fields(schema):
        value = cfg.get(f.name) if isinstance(cfg, DictConfig) and f.name in cfg else None
        if _is_list_type(hints[f.name]) and isinstance(value, (str, int, float)):
            cfg[f.name] = [value]
        nested = _dataclass_of(hints[f.name])
        if nested and OmegaConf.is_dict(value):
            _lists_from_scalars(value, nested)


def _is_list_type(annotation: Any) -> bool:
    return any(typing.get_origin(a) is list for a in (annotation, *typing.get_args(annotation)))


def _unknown_key(full_key: str, schema: type) -> str:
    *parents, leaf = full_key.split(".")
    for parent in parents:  # the block the key is in
        hint = typing.get_type_hints(schema).get(parent)
        schema = (_dataclass_of(hint) if hint else None) or schema
    return unknown_key(parents, leaf, [f.name for f in fields(schema)])


def output_path(key: str, value: str | None) -> Path | None:
    """An output file the recipe will write, checked before any work starts: a run
    must not compute for an hour and then lose its results to a read-only folder."""
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(f"{key}: '{value}' is a folder; give a file name.")
    if not path.resolve().parent.is_dir():
        raise ConfigError(f"{key}: the folder of '{value}' does not exist.")
    try:  # results are written by temp file and rename, so the folder must take a new file
        with tempfile.TemporaryFile(dir=path.resolve().parent):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: cannot write to the folder of '{value}' ({e.strerror}). "
                          "Choose a writable path.") from e
    return path


def _one_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def run_recipe(main: Callable[[list[str]], Any]) -> Callable[[list[str] | None], int]:
    """Wrap a recipe's main: user errors print one line and exit 1; Ctrl-C (SIGINT) and
    `kill` (SIGTERM) print one line, keep what was finished, and exit 128 + the signal;
    warnings print as one ``warning:`` line; no traceback unless LEANGEN_DEBUG=1. Known
    third-party noise is silenced so that stderr holds only leangen's summary."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        argv = sys.argv[1:] if argv is None else argv
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        with warnings.catch_warnings():  # restores the caller's filters and showwarning
            quiet_known_warnings()
            warnings.showwarning = show_warning
            try:
                try:
                    main(argv)
                except Exception as e:  # a torchrun peer that died: one line, not a collective's traceback
                    raise peer_failure(e) or e
            except (LeangenError, FileNotFoundError, KeyboardInterrupt) as e:
                if os.environ.get(DEBUG_ENV):
                    raise
                print_line(_error_line(e))  # torchtune's errors span several lines
                return _exit_code(e)
            finally:
                signal.signal(signal.SIGTERM, previous)
                stop()  # leave a torchrun process group, if the recipe joined one
        return 0

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so the same code keeps finished results."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _exit_code(e: BaseException) -> int:
    """128 + the signal for an interrupted run (130 for Ctrl-C, 143 for SIGTERM), as a
    shell reports a process the signal ended; 1 for an error."""
    cause = e.__cause__ if isinstance(e, Interrupted) else e
    if isinstance(cause, KeyboardInterrupt):
        return 128 + getattr(cause, "signum", signal.SIGINT)
    return 1


def _error_line(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (SIGTERM)." if isinstance(e, Terminated) else INTERRUPTED
    prefix = "interrupted" if isinstance(e, Interrupted) else "error"
    return f"{prefix}: {e}"


def quiet_known_warnings() -> None:
    """torchtune 0.6.1's RMSNorm hands F.rms_norm fp32 activations with a bf16 weight,
    which torch 2.13 reports once per process in the middle of the streamed text. The
    result is correct (the unfused path; docs/troubleshooting.md#warnings gives its cost), so the
    recipes, which own their process, hide it. API users keep their own filters."""
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight",
                            category=UserWarning)
