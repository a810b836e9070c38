"""A model's own chat template, rendered as transformers renders it.

The template comes from the model's folder: ``chat_template`` in
``tokenizer_config.json`` (a string, or a list of ``{name, template}`` of which
"default" is used), else ``chat_template.jinja``. It is rendered with jinja2's
sandbox and the same options, globals and filters as transformers'
``apply_chat_template`` (``transformers/utils/chat_template_utils.py``): trim_blocks,
lstrip_blocks, loop controls, ``raise_exception``, ``strftime_now``, a ``tojson``
that does not escape HTML, ``dict`` and ``namespace``; and with the named special
tokens (``bos_token``, ``eos_token``, ...) as variables.

The rendered text already holds every special token the model expects (e.g. its
``{{ bos_token }}``), so it is encoded without adding any: see
``HFTokenizer.tokenize_messages``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from leangen.errors import ConfigError

__all__ = ["ChatTemplate", "SPECIAL_TOKEN_NAMES"]

# The named special tokens transformers passes to a template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the jinja text
    where: str  # the file it came from, for error messages
    variables: dict[str, str] = field(default_factory=dict)  # bos_token etc.

    @classmethod
    def from_folder(cls, folder: Path, tokenizer_config: dict,
                    variables: Optional[dict[str, str]] = None) -> Optional["ChatTemplate"]:
        """The folder's template, or None when it has none."""
        variables = dict(variables or {})
        template = tokenizer_config.get("chat_template")
        where = str(folder / "tokenizer_config.json")
        if isinstance(template, list):  # [{name, template}, ...], as transformers saves several
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise ConfigError(f"{where}: chat_template lists {sorted(map(str, named))} but no 'default'.")
            template = named["default"]
        if template is None and (folder / "chat_template.jinja").is_file():
            where = str(folder / "chat_template.jinja")
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if template is None:
            return None
        if not isinstance(template, str):
            raise ConfigError(f"{where}: chat_template is a {type(template).__name__}, not a jinja string.")
        return cls(template, where, variables)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The conversation as text, ending with the assistant's header when asked."""
        import jinja2

        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return _compile(self.source).render(messages=messages, tools=None, documents=None,
                                                add_generation_prompt=add_generation_prompt,
                                                **self.variables)
        except jinja2.TemplateError as e:
            raise ConfigError(f"the chat template in {self.where} refused the prompt: {e}") from e


def _generation_blocks():
    """``{% generation %}...{% endgeneration %}``, which transformers' templates may use to
    mark the assistant's tokens for training masks: for a prompt, the body as it is."""
    import jinja2
    from jinja2.ext import Extension

    class GenerationBlocks(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationBlocks


@lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _generation_blocks()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"the chat template does not parse: {e} (line {e.lineno}).") from e


class _TemplateDict:
    """``dict(...)`` in a template, without access to the class itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _namespace_class():
    import jinja2.utils

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace, refusing underscore-prefixed attributes (as transformers does)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a chat template cannot set the underscore-prefixed attribute {name!r} on a namespace.")

    return Namespace


_Namespace = _namespace_class()
