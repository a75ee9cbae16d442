"""InputError: bad input, found wherever it is checked (on the caller or inside a rank).

The command line prints an InputError as one line and exits with status 2,
also when a rank raised it: ``launch`` re-raises the rank's exception
unchanged, so a broken checkpoint found while a rank loads its shard reads
the same as one found before any rank started. Everything else that fails is
a bug and keeps its traceback.
"""
from __future__ import annotations


class InputError(ValueError):
    """Input that tplab cannot use; the message says what is wrong and what to do."""


class CheckpointError(InputError):
    """A checkpoint that cannot be read as its config.json describes it."""
