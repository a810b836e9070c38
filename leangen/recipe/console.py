"""What the recipes print on stderr besides their summary: one line per error, warning or
interruption, and the entry points that make that true from the first second.

This module imports nothing heavy: the entry points (``leangen-generate``, ``python -m
leangen.generate``, ``tune run leangen/generate``) import the recipe through ``launch``,
so that Ctrl-C while torch, torchtune and lm-eval import (seconds) ends like Ctrl-C later,
with one line and exit 130, never a traceback.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

DEBUG_ENV = "LEANGEN_DEBUG"
INTERRUPTED = "interrupted (Ctrl-C)."


def print_line(text: str) -> None:
    """``text`` on one line of stderr, after ``rank N: `` in a torchrun job: the one way the
    recipes report an error, a warning or an interruption (third-party messages span lines)."""
    print(_rank_prefix() + " ".join(str(text).split()), file=sys.stderr, flush=True)


def _rank_prefix() -> str:
    # leangen.parallel.ranks imports torch; before it is imported (Ctrl-C during the
    # imports) no process group exists yet, and the line goes without the rank
    ranks = sys.modules.get("leangen.parallel.ranks")
    return ranks.error_prefix() if ranks is not None and hasattr(ranks, "error_prefix") else ""


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for a recipe's process: ``warning: <text>``, without the
    source line Python's format adds, which means nothing to a user of the command."""
    print_line(f"warning: {message}")


def launch(module: str) -> int:
    """Import the recipe ``module`` and run its ``main``; Ctrl-C at any moment is one line."""
    previous = signal.getsignal(signal.SIGINT)
    if not os.environ.get(DEBUG_ENV):
        # A KeyboardInterrupt raised inside a third-party import can surface as another
        # error (numpy: "cannot load module more than once") or be swallowed. Nothing is
        # done yet while the recipe imports, so the handler ends the process right there.
        signal.signal(signal.SIGINT, _interrupted_while_importing)
    try:
        main = importlib.import_module(module).main
    finally:
        signal.signal(signal.SIGINT, previous)
    return main()


def _interrupted_while_importing(signum, frame) -> None:
    print_line(INTERRUPTED)
    os._exit(128 + signal.SIGINT)


def generate() -> int:
    """The ``leangen-generate`` script."""
    return launch("leangen.generate")


def evaluate() -> int:
    """The ``leangen-eval`` script."""
    return launch("leangen.eval")

