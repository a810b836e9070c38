"""Command-line overrides (``key=value``, ``~key``) read by the type the recipe's schema gives the key.

torchtune hands every value to YAML, so ``prompt.user="yes"`` became ``True`` and
``prompt="Q: 2+2? A:"`` a YAML error blamed on the config file. Here the schema decides:

- a key typed ``str`` takes the text after the first ``=``, verbatim (``null`` is null
  where the key is Optional);
- ``int``, ``float`` and ``bool`` keys are read by OmegaConf's own nodes, as in a YAML file;
- a list key takes ``[a, b]`` (items as the list's item type) or one item;
- a key that takes text or a block (``prompt``: a string or ``{system, user}``) is a block
  only when the value starts with ``{`` or ``[``, else the verbatim text;
- a key inside a free-form block (``model.*``, ``tokenizer.*``, ``checkpoint.*``, any
  ``_component_`` block's kwargs) is read as torchtune reads it, by YAML, so numbers,
  booleans and lists keep working; text that YAML would turn into a mapping (``a: b``),
  cut at a ``#`` comment, strip of leading zeros (``00004``) or fail on, stays the verbatim
  text. Quote for the shell to make YAML read a string: ``'model.name="3"'``.

``~key`` removals and the ``model=dotted.builder`` shorthand for ``model._component_``
are torchtune's (its own helpers do them).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode

from leangen.errors import ConfigError

# The scalar types a schema key can have: OmegaConf's node that reads one, and an example.
SCALARS: dict[type, tuple[type, str]] = {
    int: (IntegerNode, "300"),
    float: (FloatNode, "0.6"),
    bool: (BooleanNode, "true"),
}
NULL = "null"


class FreeForm:
    """A place in the config the schema leaves open (``Any``): kwargs of a block."""


def apply_overrides(config: DictConfig, overrides: list[str], schema: type) -> DictConfig:
    """``config`` with each override applied in order; a bad one fails naming it."""
    for override in overrides:
        if override.startswith("~"):
            config = _remove(config, override)
        elif "=" in override:
            config = _set(config, override, schema)
        else:
            raise ConfigError(f"'{override}': an override is key=value (key=null to unset) or ~key "
                              "to remove the key. --help lists the keys.")
    return config


def _remove(config: DictConfig, override: str) -> DictConfig:
    from torchtune.config._utils import _remove_key_by_dotpath

    container = OmegaConf.to_container(config, resolve=False)
    try:
        _remove_key_by_dotpath(container, override[1:])
    except ValueError as e:  # a _component_ block: torchtune refuses to remove it
        raise ConfigError(f"{override}: {e}; override its keys instead.") from e
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{override}: the config has no key '{override[1:]}' to remove.") from e
    return OmegaConf.create(container)


def _set(config: DictConfig, override: str, schema: type) -> DictConfig:
    from torchtune.config._utils import _has_component

    key, text = override.split("=", 1)
    current = OmegaConf.select(config, key, default=None, throw_on_missing=False)
    if OmegaConf.is_dict(current) and _has_component(current) and _is_dotted_name(text):
        key += "._component_"  # torchtune's shorthand: model=torchtune.models.x
    value = read_value(override, key, text, schema)
    tree: Any = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    try:
        return OmegaConf.merge(config, OmegaConf.create(tree))
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        # TypeError is OmegaConf's "Cannot merge incompatible container types" (a dict over a list)
        raise ConfigError(f"{override}: gives a {_kind(value)} where the config has a "
                          f"{_kind(current)}.") from e


def _is_dotted_name(text: str) -> bool:
    return "." in text and all(part.isidentifier() for part in text.split("."))


def _kind(value: Any) -> str:
    if isinstance(value, dict) or OmegaConf.is_dict(value):
        return "mapping"
    return "list" if isinstance(value, list) or OmegaConf.is_list(value) else "single value"


def read_value(override: str, key: str, text: str, schema: type) -> Any:
    """The value ``text`` gives ``key``, read by the key's type in ``schema``."""
    hint = key_type(override, key, schema)
    try:
        return _read(hint, text)
    except _Unreadable as e:
        advice = f", e.g. {key}={e.example}." if e.example else _QUOTING
        raise ConfigError(f"{override}: {key} takes {e.expected}{advice}") from None


class _Unreadable(Exception):
    def __init__(self, expected: str, example: str = ""):
        self.expected, self.example = expected, example


def key_type(override: str, key: str, schema: type) -> Any:
    """The type the schema gives a dotted key: a field's type (or its ``cli_type``),
    a dict's value type, or FreeForm inside an open block."""
    hint: Any = schema
    parts = key.split(".")
    for depth, part in enumerate(parts):
        inner = _block_member(_without_none(hint))
        if dataclasses.is_dataclass(inner):
            hint = _field_type(override, inner, part, parts[:depth])
        elif typing.get_origin(inner) is dict:
            hint = typing.get_args(inner)[1]
        elif inner is Any or inner is FreeForm or inner is dict:
            return FreeForm
        else:
            raise ConfigError(f"{override}: '{'.'.join(parts[:depth])}' takes {_expected(hint)}, "
                              "so it has no keys inside.")
    return hint


def _block_member(hint: Any) -> Any:
    """The block in a text-or-block Union (``prompt.user`` is a key of prompt's mapping)."""
    if typing.get_origin(hint) is Union:
        return next((m for m in typing.get_args(hint) if _is_block(m)), hint)
    return hint


def unknown_key(parents: list[str], leaf: str, known: list[str]) -> str:
    """``unknown key 'a.b'.`` with the closest valid key at that place, or the valid ones:
    the one wording for a config key that does not exist, typed or in a YAML."""
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"Did you mean '{'.'.join([*parents, close[0]])}'?" if close else f"Valid keys here: {', '.join(known)}."
    return f"unknown key '{'.'.join([*parents, leaf])}'. {hint} (--help lists every key.)"


def _field_type(override: str, schema: type, name: str, parents: list[str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    if name not in fields:
        raise ConfigError(f"{override}: {unknown_key(parents, name, list(fields))}")
    return fields[name].metadata.get("cli_type") or typing.get_type_hints(schema)[name]


def _without_none(hint: Any) -> Any:
    """``X`` for ``Optional[X]``; the Union of the rest for a wider Optional."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is Union and len(args) < len(typing.get_args(hint)):
        return args[0] if len(args) == 1 else Union[tuple(args)]
    return hint


def _is_optional(hint: Any) -> bool:
    return hint is Any or hint is FreeForm or type(None) in typing.get_args(hint)


def _read(hint: Any, text: Any) -> Any:
    """``text`` (a command-line string, or a piece of a parsed ``[...]``/``{...}``) as ``hint``."""
    inner = _without_none(hint)
    if inner is Any or inner is FreeForm:
        return free_form(text) if isinstance(text, str) else text
    if isinstance(text, str) and text == NULL and _is_optional(hint):
        return None
    members = typing.get_args(inner) if typing.get_origin(inner) is Union else (inner,)
    if str in members and isinstance(text, str):
        return _text_or_block(members, text)
    for member in members:
        if _starts_block(member, text):
            return _read_block(member, text)
    if len(members) == 1 and _is_block(inner):
        if typing.get_origin(inner) is list and isinstance(text, str):
            return [_read(typing.get_args(inner)[0], text)]  # one item: a list of one
        raise _Unreadable(_expected(hint))
    if inner in SCALARS and isinstance(text, str):
        node, example = SCALARS[inner]
        try:
            return node(value=text)._value()
        except ValidationError:
            raise _Unreadable(_expected(hint), example) from None
    raise _Unreadable(_expected(hint))


def _text_or_block(members: tuple, text: str) -> Any:
    """A key that takes text or a block: the block only when the value is written as one
    (``{system: ..., user: ...}``, ``[a, b]``) with every entry given; any other text,
    ``{x}`` and ``[1, 2, 3] reversed`` included, is the text."""
    for member in members:
        if _starts_block(member, text):
            try:
                block = _read_block(member, text)
            except _Unreadable:
                break
            if all(v not in ("", None) for v in (block.values() if isinstance(block, dict) else block)):
                return block
    return _verbatim(text)


def _verbatim(text: str) -> str:
    """``text`` as the string value, ``${`` included: OmegaConf would read that as an
    interpolation, so it is escaped (OmegaConf gives back the literal ``${``)."""
    return text.replace("${", "\\${")


def _is_block(hint: Any) -> bool:
    return typing.get_origin(hint) in (list, dict) or hint is dict or dataclasses.is_dataclass(hint)


def _starts_block(hint: Any, text: Any) -> bool:
    """A list or mapping type meets ``[...]`` or ``{...}`` (or an already parsed one)."""
    if not _is_block(hint):
        return False
    opener = "[" if typing.get_origin(hint) is list else "{"
    if isinstance(text, str):
        return text.lstrip().startswith(opener)
    return isinstance(text, list if opener == "[" else dict)


def _read_block(hint: Any, text: Any) -> Any:
    tree = text
    if isinstance(text, str):
        try:  # BaseLoader: every scalar stays a string, read below by its own type
            tree = yaml.load(text, Loader=yaml.BaseLoader)
        except yaml.YAMLError:
            raise _Unreadable(_expected(hint)) from None
    if typing.get_origin(hint) is list:
        if not isinstance(tree, list):
            raise _Unreadable(_expected(hint))
        return [_read(typing.get_args(hint)[0], item) for item in tree]
    if not isinstance(tree, dict):
        raise _Unreadable(_expected(hint), _QUOTING)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        fields = {f.name: f.metadata.get("cli_type") or hints[f.name] for f in dataclasses.fields(hint)}
        unknown = [k for k in tree if k not in fields]
        if unknown:
            raise _Unreadable(f"{_expected(hint)} of {', '.join(fields)} ('{unknown[0]}' is not one)")
        return {k: _read(fields[k], v) for k, v in tree.items()}
    value_type = typing.get_args(hint)[1] if typing.get_args(hint) else Any
    return {k: _read(value_type, v) for k, v in tree.items()}


_QUOTING = (". Quote the whole override for the shell when it holds spaces, quotes or brackets: "
            "'key=[a, b]', 'key={x: 1}', 'key=\"text\"'.")


def free_form(text: str) -> Any:
    """A value inside an open block, read by YAML as torchtune reads it, unless YAML
    would not give back what was typed: then the verbatim text."""
    if text == "None":  # torchtune's spelling of null on its command line
        return None
    try:  # OmegaConf's own reading of a dotlist value: the YAML rules of the config files
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]), resolve=False)["value"]
    except (yaml.YAMLError, OmegaConfBaseException):
        return text
    if isinstance(value, dict) and not text.lstrip().startswith("{"):
        return text  # "Q: 2+2?" is a sentence, not a mapping
    if text.count("#") > str(value).count("#"):
        return text  # YAML dropped a "# comment"
    if isinstance(value, int) and not isinstance(value, bool) and re.fullmatch(r"[+-]?0\d+", text.strip()):
        return text  # leading zeros, e.g. torchtune's max_filename: "00004"
    if value is None and text.strip() not in ("", "null", "~", "Null", "NULL"):
        return text
    return value


def type_name(hint: Any) -> str:
    """A type as --help shows it: ``int``, ``str|null``, ``list[str]``, ``mapping``, ``any``."""
    if hint is type(None):
        return NULL
    if hint is Any or hint is FreeForm:
        return "any"
    origin = typing.get_origin(hint)
    if origin is Union and Any in typing.get_args(hint):
        return "any"
    if origin is Union:
        names = [type_name(a) for a in typing.get_args(hint) if a is not type(None)]
        return "|".join(names + ([NULL] if type(None) in typing.get_args(hint) else []))
    if origin is list:
        return f"list[{type_name(typing.get_args(hint)[0])}]"
    if origin is dict or hint is dict or dataclasses.is_dataclass(hint):
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def _expected(hint: Any) -> str:
    """``hint`` in words, for an error."""
    words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text",
             "mapping": "a mapping {key: value, ...}", "any": "a value", NULL: "null"}
    parts = []
    for name in type_name(hint).split("|"):
        parts.append("a list [a, b] (or one item)" if name.startswith("list[") else words.get(name, name))
    return " or ".join(parts)
