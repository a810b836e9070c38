"""Tokens out: sampling as small pure functions (``sampling``), prefill then decode
(``generation``), and text to ids and back (``text``)."""
