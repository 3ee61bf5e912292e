"""The one exception type for a user's mistake.

`UserError` (a `ValueError`) marks an error that is the user's to fix: a bad flag or config field, a
missing or mismatched file, a checkpoint of another model. The `launch/` entry points print it as one
line (the message, which names the expected and the found value and what to do) and exit non-zero
without a traceback; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
  """A mistake in what the user asked for (flags, config, files), with a message that says the fix."""
