"""The one exception type for a user's mistake.

`UserError` (a `ValueError`) marks an error that is the user's to fix: a bad flag or config field, a
missing or mismatched file, a checkpoint of another model. The `launch/` entry points print it as one
line (the message, which names the expected and the found value and what to do) and exit non-zero
without a traceback; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
  """A mistake in what the user asked for (flags, config, files), with a message that says the fix."""


def check_known_fields(cls, section: str, fields, extra=()) -> None:
  """Raise a UserError naming every key of `fields` that the dataclass `cls` (or `extra`) does not know."""
  import dataclasses
  known = {f.name for f in dataclasses.fields(cls)} | set(extra)
  unknown = sorted(set(fields) - known)
  if unknown:
    raise UserError(f"{section}: unknown field(s) {unknown}; the known fields are {sorted(known)}; "
                    "fix the spelling or drop them")
