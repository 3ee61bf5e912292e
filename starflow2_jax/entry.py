"""The one way a `launch/` entry point starts: `entry.run(main)` in place of `absl.app.run(main)`.

  if __name__ == "__main__":
    entry.run(main)

What it adds to absl's `app.run`:
  * A user's mistake is one line on stderr, `error: <message>`, and exit status `USER_ERROR_EXIT`,
    without a traceback: `errors.UserError`, `FileNotFoundError`, `FileExistsError` and
    `app.UsageError` raised by `main`; a bad or unknown flag; an unknown `--config.<field>` override
    (named, with a "Did you mean" hint); a `--config` file that does not exist. Any other exception is a
    bug and keeps its traceback (exit status 1).
  * Quiet libraries: records below WARNING from outside this project (orbax, grain, jax, absl) are
    dropped unless `--verbosity` (`-v`) is given: then absl's own rule holds (`--verbosity=0` shows
    every INFO record, 1 adds DEBUG). The project's own INFO lines and the progress bar stay.
"""
from __future__ import annotations

import difflib
import logging
import os
import sys
from typing import Any, Callable, NoReturn

from absl import app, flags
from absl import logging as absl_logging
from ml_collections.config_flags.config_flags import get_config_filename, is_config_flag

from starflow2_jax.errors import UserError

# Exit status of a user's mistake (the shell convention for a usage error; a bug exits with 1).
USER_ERROR_EXIT = 2
# Mistakes raised by `main` that are printed as one line: the user's to fix, never a bug.
USER_MISTAKES = (UserError, FileNotFoundError, FileExistsError, app.UsageError)
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class ProjectLogFilter(logging.Filter):
  """Passes a record at WARNING or above, one from a file under `roots`, or any record once
  `--verbosity` is given on the command line; drops library chatter otherwise."""

  def __init__(self, roots: tuple[str, ...]):
    super().__init__()
    self.roots = tuple(os.path.join(os.path.abspath(r), "") for r in roots)

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING or flags.FLAGS["verbosity"].present:
      return True
    return os.path.abspath(record.pathname).startswith(self.roots)


def fail(message: str) -> NoReturn:
  """Print a user's mistake as `error: <message>` on stderr and exit with `USER_ERROR_EXIT`."""
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(USER_ERROR_EXIT)


def _config_flags() -> dict[str, Any]:
  """name -> ml_collections config flag, for every config flag defined."""
  return {name: flags.FLAGS[name] for name in flags.FLAGS if is_config_flag(flags.FLAGS[name])}


def _argument(argv: list[str], name: str) -> str | None:
  """The value of `--name=VALUE` (or `--name VALUE`) in `argv`, or None if absent."""
  for i, arg in enumerate(argv[1:], 1):
    head, eq, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and head == name:
      return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _unknown_override(argv: list[str], name: str, config) -> str | None:
  """The message for the first `--name.<path>` override in `argv` that names no field of `config`
  (with the closest field name as a hint), or None if every path exists."""
  for arg in argv[1:]:
    head = arg.lstrip("-").split("=", 1)[0]
    if not (arg.startswith("-") and head.startswith(name + ".")):
      continue
    parts, node = head.split(".")[1:], config
    for depth, part in enumerate(parts):
      keys = [str(k) for k in node.keys()] if hasattr(node, "keys") else []
      if part not in keys:
        where = ".".join([name, *parts[:depth]])
        close = difflib.get_close_matches(part, keys, n=1)
        hint = (f'Did you mean "{close[0]}"?' if close else
                f"Its fields are {sorted(keys)}." if keys else f"{where} is a value, not a section.")
        return f"{arg}: {where} has no field {part!r}. {hint}"
      node = node[part]
  return None


def config_mistake(argv: list[str], parsed: bool) -> str | None:
  """The message for a `--config` file that cannot be loaded or (when flag parsing failed,
  `parsed=False`) an override naming no config field; None if there is neither. ml_collections defers
  a missing file's error (an OSError) to the config's first use: this names it at start-up."""
  for name, flag in _config_flags().items():
    if parsed and flag.value is None:  # an optional config flag not given
      continue
    path = get_config_filename(flag) if parsed else _argument(argv, name)
    if path is None:
      continue
    config = flag.value if parsed else flag.parser.parse(path)
    try:
      getattr(config, "keys")
    except OSError:
      reason = "no such file" if not os.path.exists(path.split(":", 1)[0]) else "it could not be loaded"
      return (f"--{name}={path}: {reason} (a path to a config .py file, relative to the current "
              f"directory {os.getcwd()})")
    message = None if parsed else _unknown_override(argv, name, config)
    if message:
      return message
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl `flags_parser`: parse `argv`; a flag or config mistake ends the program with one line."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail("; ".join(str(e).splitlines()) + " (--helpshort lists the flags)")  # all on one line
  except (AttributeError, KeyError, OSError):
    message = config_mistake(argv, parsed=False)
    if message is None:  # not a user's override: a bug, keep the traceback
      raise
    fail(message)
  message = config_mistake(argv, parsed=True)
  if message:
    fail(message)
  return rest


def run(main: Callable[[list[str]], Any]) -> None:
  """Run an absl `main(argv)` with one-line user errors and quiet library logs (module docstring)."""
  main_file = getattr(sys.modules.get(main.__module__), "__file__", None) or PACKAGE_DIR
  absl_logging.get_absl_handler().addFilter(
      ProjectLogFilter((PACKAGE_DIR, os.path.dirname(os.path.abspath(main_file)))))

  def guarded(argv):
    try:
      return main(argv)
    except USER_MISTAKES as e:
      fail(str(e))

  app.run(guarded, flags_parser=parse_flags)
