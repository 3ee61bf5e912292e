"""The README's memory and speed table, reproducible: every (config, TPU slice) pair compiled ahead of
time by `launch.compile` (one subprocess per pair), collected into one Markdown table.

  python -m launch.memory_table --out=docs/memory_table.md \
      [--configs=starflow2_qwen7b:stage=3,tarflow_imagenet64,starflow_3b] \
      [--topologies=v5p-64,v5e-256,v4-128,v6e-64] [--cache=/tmp/memory_table] [--timeout=3600] \
      [--nocompile]

A config is `configs/<name>.py`, optionally with its `get_config` argument after a colon. Each pair's
report is kept as JSON in --cache, so an interrupted table resumes where it stopped (delete the cache
to recompute); --nocompile writes the table from the cache alone, a pair not compiled yet marked so.
Needs libtpu (`pip install -e '.[tpu]'`); big configs take minutes and many GiB of host
memory per compile. Columns: fits, per-chip memory against HBM, compiled / analytical FLOPs, and the
step time and examples/s at 50% of the chip's peak (arithmetic from the compiled FLOPs, not a
measurement).
"""
import json
import os
import subprocess
import sys

from absl import flags

from starflow2_jax import entry
from starflow2_jax.errors import UserError

DEFAULT_CONFIGS = ("starflow2_qwen7b:stage=1", "starflow2_qwen7b:stage=2", "starflow2_qwen7b:stage=3",
                   "tarflow_imagenet64", "starflow_3b")
DEFAULT_TOPOLOGIES = ("v5p-64", "v5e-256", "v4-128", "v6e-64")
_OUT = flags.DEFINE_string("out", None, "the Markdown table (never overwritten)")
_CONFIGS = flags.DEFINE_list("configs", list(DEFAULT_CONFIGS), "configs/<name>.py[:arg] to compile")
_TOPOLOGIES = flags.DEFINE_list("topologies", list(DEFAULT_TOPOLOGIES), "TPU slices")
_CACHE = flags.DEFINE_string("cache", "/tmp/memory_table", "per-pair JSON reports (resumable)")
_TIMEOUT = flags.DEFINE_integer("timeout", 3600, "seconds per compile")
_COMPILE = flags.DEFINE_bool("compile", True, "compile the pairs missing from --cache (false: mark them)")
flags.mark_flags_as_required(["out"])
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30
NO_FIT_EXIT = 3  # launch.compile's status for a step that does not fit
HEADER = ("| config | slice | chips | mesh (data, fsdp, tensor) | fits | memory / chip | "
          "compiled / analytical FLOPs | step at 50% peak | examples/s at 50% |\n"
          "|---|---|---|---|---|---|---|---|---|")


def _config_path(spec: str) -> str:
  name, _, arg = spec.partition(":")
  path = os.path.join(ROOT, "configs", f"{name}.py")
  if not os.path.isfile(path):
    raise UserError(f"--configs: {spec!r} names no file configs/{name}.py")
  return path + (f":{arg}" if arg else "")


NOT_COMPILED = "not compiled yet"


def compile_pair(config: str, topology: str, cache: str, timeout: int,
                 compile_missing: bool = True) -> dict:
  """The JSON report of one pair (from the cache, or a `launch.compile` subprocess; with
  compile_missing False, a pair missing from the cache is {"missing": ...})."""
  path = os.path.join(cache, f"{config.replace(':', '_')}@{topology}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  if not compile_missing:
    return {"missing": NOT_COMPILED}
  cmd = [sys.executable, "-m", "launch.compile", f"--config={_config_path(config)}",
         f"--topology={topology}", f"--json={path}", "--nogeneration"]
  print("$", " ".join(cmd), flush=True)
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"compile did not finish in {timeout} s"}
  print(proc.stdout, flush=True)
  if proc.returncode not in (0, NO_FIT_EXIT) or not os.path.exists(path):
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"error": last[:200]}
  with open(path) as f:
    return json.load(f)


def row(config: str, topology: str, r: dict) -> str:
  if "missing" in r:
    return f"| {config} | {topology} | | | {r['missing']} | | | | |"
  if "error" in r:
    return f"| {config} | {topology} | | | error: {r['error']} | | | | |"
  mesh = r["mesh"]
  mem = (f"{r['memory']['total'] / GIB:.1f} of {r['hbm_bytes'] / GIB:.0f} GiB" if r.get("memory")
         else f"over {r['hbm_bytes'] / GIB:.0f} GiB")
  ratio = f"{r['flop_ratio']:.2f}" if r.get("flop_ratio") else "-"
  step = r.get("step_seconds_at_utilisation")
  eps = r.get("examples_per_second_at_utilisation")
  return (f"| {config} | {topology} | {r['devices']} | {mesh['data']}, {mesh['fsdp']}, {mesh['tensor']} | "
          f"{'yes' if r['fits'] else 'no'} | {mem} | {ratio} | "
          f"{f'{step:.3g} s' if step else '-'} | {f'{eps:,.0f}' if eps else '-'} |")


def _preamble() -> str:
  """How the table was made: the command (reproducible) and the compiler versions."""
  import importlib.metadata
  import jax
  try:
    libtpu = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    libtpu = "not installed"
  cmd = " ".join(["python -m launch.memory_table", f"--configs={','.join(_CONFIGS.value)}",
                  f"--topologies={','.join(_TOPOLOGIES.value)}"])
  return (f"Generated by `{cmd}` (jax {jax.__version__}, libtpu {libtpu}). Step times are arithmetic "
          "from the compiled FLOPs at 50% of the chip's bf16 peak, not measurements.\n\n")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: every option is a --flag")
  if os.path.exists(_OUT.value):
    raise UserError(f"--out={_OUT.value} exists; choose a new file (a table is never overwritten)")
  for c in _CONFIGS.value:
    _config_path(c)
  os.makedirs(_CACHE.value, exist_ok=True)
  rows = [row(c, t, compile_pair(c, t, _CACHE.value, _TIMEOUT.value, _COMPILE.value))
          for c in _CONFIGS.value for t in _TOPOLOGIES.value]
  table = _preamble() + HEADER + "\n" + "\n".join(rows) + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  entry.run(main)
