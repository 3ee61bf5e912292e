"""tests/parity_guard.py: under CI=true a parity test skipped for want of its reference package fails
the run; locally it stays a skip, listed loudly; other skips are untouched."""
import os
import subprocess
import sys
import textwrap

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))

# Packages whose import fails as a missing one does (ModuleNotFoundError: importorskip skips).
MISSING = {"torch": "raise ModuleNotFoundError(\"No module named 'torch._C'\")",
           "tiktoken": "raise ModuleNotFoundError(\"No module named 'tiktoken'\")"}
# A broken install: the package is there, its import raises a plain ImportError. pytest < 9.1 skips
# it through importorskip (with a deprecation warning), pytest >= 9.1 reports a collection error.
BROKEN = {"torch": "raise ImportError('libtorch_cpu.so: cannot open shared object file')"}
SUITE = {
    "test_module_level.py": """
        import pytest
        torch = pytest.importorskip("torch")

        def test_parity():
          assert torch
        """,
    "test_inside.py": """
        import pytest

        def test_tokenizer_parity():
          pytest.importorskip("tiktoken")

        def test_unrelated_skip():
          pytest.importorskip("not_a_parity_package_anywhere")

        def test_plain():
          assert True
        """,
}


def _pytest(tmp_path, ci, fakes=MISSING, workers=0):
  fake = tmp_path / "site"
  for name, body in fakes.items():
    (fake / name).mkdir(parents=True)
    (fake / name / "__init__.py").write_text(body + "\n")
  suite = tmp_path / "suite"
  suite.mkdir()
  (suite / "pytest.ini").write_text("[pytest]\n")  # the run's own rootdir and settings
  for name, body in SUITE.items():
    (suite / name).write_text(textwrap.dedent(body))
  env = {k: v for k, v in os.environ.items() if k != "CI"}
  env["PYTHONPATH"] = os.pathsep.join([str(fake), TESTS])
  if ci is not None:
    env["CI"] = ci
  return subprocess.run([sys.executable, "-m", "pytest", "-p", "parity_guard", "-p", "no:cacheprovider",
                         "-q", "-rs", "-n", str(workers), str(suite)], cwd=suite, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci,failed,workers", [("true", True, 0), ("1", True, 0), (None, False, 0),
                                               ("false", False, 0), ("true", True, 2)])
def test_parity_skips_fail_only_in_ci(tmp_path, ci, failed, workers):
  """Also across two xdist workers (pytest.ini's default), whose skips the controller sees."""
  r = _pytest(tmp_path, ci, workers=workers)
  out = r.stdout
  assert r.returncode == (1 if failed else 0), out + r.stderr
  assert "1 passed, 3 skipped" in out, out  # every test still ran (or skipped) as before
  verdict = "CI=true: failing the run" if failed else "set CI=true to make this an error"
  assert f"2 parity test(s) skipped ({verdict})" in out, out
  assert ("SKIPPED PARITY test_module_level.py: could not import 'torch': "
          "No module named 'torch._C'") in out, out
  assert ("SKIPPED PARITY test_inside.py::test_tokenizer_parity: could not import 'tiktoken': "
          "No module named 'tiktoken'") in out, out
  assert "SKIPPED PARITY test_inside.py::test_unrelated_skip" not in out


def test_a_broken_parity_install_fails_ci(tmp_path):
  """Whatever pytest does with an ImportError in importorskip (skip or collection error), CI fails."""
  r = _pytest(tmp_path, "true", fakes={**MISSING, **BROKEN})
  assert r.returncode != 0, r.stdout + r.stderr
  assert "libtorch_cpu.so: cannot open shared object file" in r.stdout, r.stdout
