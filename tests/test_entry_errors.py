"""Entry points (`starflow2_jax.entry.run`): a user's mistake is one `error:` line and exit status 2
without a traceback, a bug keeps its traceback, and library INFO logs stay quiet unless --verbosity."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from starflow2_jax import ckpt, entry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import tarflow_digits  # noqa: E402


def _run(args, cwd=REPO, pythonpath=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=pythonpath)
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=180)


def _assert_user_error(r, error_line):
  """Exit status 2, no traceback, and one `error:` line (after any log lines), equal to `error_line`;
  a multi-line message continues after it. Returns the lines from the error line on."""
  assert r.returncode == entry.USER_ERROR_EXIT, (r.returncode, r.stderr)
  assert "Traceback" not in r.stderr, r.stderr
  lines = r.stderr.splitlines()
  errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
  assert len(errors) == 1 and lines[errors[0]] == error_line, r.stderr
  return lines[errors[0]:]


def test_unknown_config_field_is_one_line_with_the_hint(tmp_path):
  r = _run(["-m", "launch.train", "--config=configs/tarflow_digits.py", f"--workdir={tmp_path}",
            "--config.train.stepz=5"])
  _assert_user_error(r, "error: --config.train.stepz=5: config.train has no field 'stepz'. "
                        'Did you mean "steps"?')
  assert len(r.stderr.splitlines()) == 1, r.stderr  # nothing else is printed
  assert not os.listdir(tmp_path)  # failed before writing anything


@pytest.mark.parametrize("args,error_line", [
    (["--config=configs/nope.py"],
     f"error: --config=configs/nope.py: no such file (a path to a config .py file, relative to the "
     f"current directory {REPO})"),
    (["--config=configs/tarflow_digits.py", "--config.model.widht=3"],
     "error: --config.model.widht=3: config.model has no field 'widht'. Did you mean \"width\"?"),
    (["--config=configs/tarflow_digits.py", "--config.train.steps=many"],
     "error: flag --config.train.steps=many: invalid literal for int() with base 10: 'many' "
     "(--helpshort lists the flags)"),
    (["--config=configs/tarflow_digits.py", "--stepz=5"],
     "error: Unknown command line flag 'stepz' (--helpshort lists the flags)"),
])
def test_flag_mistakes_are_one_line(args, error_line, tmp_path):
  r = _run(["-m", "launch.train", *args, f"--workdir={tmp_path / 'w'}"])
  _assert_user_error(r, error_line)
  assert len(r.stderr.splitlines()) == 1, r.stderr  # nothing else is printed
  assert not os.path.exists(tmp_path / "w")


def test_packing_a_task_that_reads_one_record_a_row_is_refused(tmp_path):
  r = _run(["-m", "launch.train", "--config=configs/tarflow_digits.py", f"--workdir={tmp_path}",
            "--config.data.pack=2"])
  _assert_user_error(r, "error: data.pack=2: the flow task's rows hold one record each; set data.pack=1")


def test_missing_checkpoint_dir(tmp_path):
  missing = tmp_path / "no_such_checkpoint"
  r = _run(["-m", "launch.sample", f"--checkpoint={missing}", f"--out={tmp_path / 'out'}", "--num=2"])
  _assert_user_error(r, f"error: {missing} is not a starflow2_jax checkpoint: {missing}/config.json "
                        "is missing")


def _config_only_checkpoint(path):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(tarflow_digits.get_config().to_json_best_effort())
  return str(path)


def test_existing_output_is_refused(tmp_path):
  checkpoint = _config_only_checkpoint(tmp_path / "ckpt")
  out = tmp_path / "out"
  out.mkdir()
  (out / "samples.png").write_bytes(b"a user's file")
  r = _run(["-m", "launch.sample", f"--checkpoint={checkpoint}", f"--out={out}", "--num=2"])
  _assert_user_error(r, f"error: {out} already holds ['samples.png']; choose a new --out")
  assert (out / "samples.png").read_bytes() == b"a user's file"


def test_mismatched_checkpoint(tmp_path):
  checkpoint = ckpt.save_params(str(tmp_path / "ckpt"), {"params": {"w": np.zeros((2,), np.float32)}},
                                tarflow_digits.get_config())
  r = _run(["-m", "launch.sample", f"--checkpoint={checkpoint}", f"--out={tmp_path / 'out'}", "--num=2"])
  message = _assert_user_error(r, f"error: checkpoint {checkpoint} does not match the model config:")
  assert "  ['params']['blocks_0']['proj_out']['bias']: expected (32,), missing" in message[1:]


def test_existing_dataset_is_refused(tmp_path):
  (tmp_path / "digits16" / "1.0.0").mkdir(parents=True)
  r = _run(["-m", "launch.build_dataset", "--source=digits", "--name=digits16",
            f"--data_dir={tmp_path}"])
  _assert_user_error(r, f"error: {tmp_path}/digits16/1.0.0 exists: refusing to overwrite a dataset; "
                        "choose another name or version")


# A fake entry point: main raises what --raise names; `lib.chatter` logs from outside the project.
FAKE_MAIN = """
from absl import flags, logging
import lib
from starflow2_jax import entry
from starflow2_jax.errors import UserError

RAISE = flags.DEFINE_enum("raise", "none", ["none", "user", "missing", "bug"], "what main raises")


def main(argv):
  logging.info("project line")
  lib.chatter()
  if RAISE.value == "user":
    raise UserError("train.stepz: no such field; did you mean train.steps?")
  if RAISE.value == "missing":
    open("/no/such/file")
  if RAISE.value == "bug":
    raise TypeError("an internal bug")


if __name__ == "__main__":
  entry.run(main)
"""
FAKE_LIB = """
import logging as std_logging
from absl import logging


def chatter():
  logging.info("library absl info")
  std_logging.getLogger("lib").info("library python info")
  logging.warning("library warning")
"""


@pytest.fixture
def fake_entry(tmp_path):
  (tmp_path / "app").mkdir()
  (tmp_path / "lib").mkdir()
  (tmp_path / "app" / "main.py").write_text(textwrap.dedent(FAKE_MAIN))
  (tmp_path / "lib" / "lib.py").write_text(textwrap.dedent(FAKE_LIB))
  return lambda *flags: _run([str(tmp_path / "app" / "main.py"), *flags],
                             pythonpath=os.pathsep.join([REPO, str(tmp_path / "lib")]))


def test_user_mistakes_from_main_are_one_line(fake_entry):
  _assert_user_error(fake_entry("--raise=user"),
                     "error: train.stepz: no such field; did you mean train.steps?")
  _assert_user_error(fake_entry("--raise=missing"),
                     "error: [Errno 2] No such file or directory: '/no/such/file'")


def test_a_bug_keeps_its_traceback(fake_entry):
  r = fake_entry("--raise=bug")
  assert r.returncode == 1, r.stderr
  assert "Traceback (most recent call last)" in r.stderr
  assert r.stderr.rstrip().endswith("TypeError: an internal bug")
  assert not any(line.startswith("error: ") for line in r.stderr.splitlines())


def test_library_info_is_quiet_unless_verbosity(fake_entry):
  quiet = fake_entry().stderr
  assert "project line" in quiet and "library warning" in quiet
  assert "library absl info" not in quiet and "library python info" not in quiet
  for verbosity in ("--verbosity=0", "-v=1"):  # given: absl's own rule
    loud = fake_entry(verbosity).stderr
    for line in ("project line", "library warning", "library absl info", "library python info"):
      assert line in loud, loud
