"""The exceptions leangen raises for bad input.

Each message names the file, tensor or key at fault and says what to do next.
Recipes print ``str(error)`` on one line and exit 1; set ``LEANGEN_DEBUG=1`` for a
traceback.
"""

__all__ = ["LeangenError", "CheckpointError", "ConversionError", "ConfigError", "Interrupted"]


class LeangenError(Exception):
    """Base class: a user-facing error with a message that says what to do."""


class CheckpointError(LeangenError):
    """A checkpoint file is missing, unreadable, corrupt or refused (unsafe pickle)."""


class ConversionError(LeangenError):
    """The checkpoint does not fit the model: missing/unexpected keys, shapes, family."""


class ConfigError(LeangenError):
    """A recipe config is invalid: unknown key, wrong type, bad value."""


class Interrupted(LeangenError):
    """Ctrl-C during a run; the message says what was kept. Recipes exit 130."""
