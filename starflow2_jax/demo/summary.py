"""The demo's summary: summary.json and the table printed at the end.

summary.json = {
  "size": "full" | "smoke",
  "wall_seconds": {phase: seconds (summed over the runs that resumed it)}, "total_seconds": float,
  "latent_nll": held-out latent NLL of stage 3 (nats/dim),
  "lm": {"text_ce", "perplexity", "token_accuracy", "answer_exact"} (held out),
  "fae_psnr": held-out FAE reconstruction PSNR (dB),
  "prompt_following": {"overall" | "single_object" | "single_object_trained" | "excluded_combination":
                       {"colour", "kind", "size", "count", "relation", "position", "all": accuracy
                        or None, "num"}},
  "qa": {"count", "colour", "kind", "overall": accuracy, "num"},
  "stages": {stage: its held-out metrics}}
"""
from __future__ import annotations

import json
import math
import os

from starflow2_jax.eval.shapes_detector import ATTRIBUTES

SUMMARY_FILE = "summary.json"
GROUPS = ("overall", "single_object", "single_object_trained", "excluded_combination")
QA_TYPES = ("count", "colour", "kind", "overall")


def lm_metrics(held_out: dict) -> dict:
  """The lm phase's held-out metrics with perplexity = exp(text_ce)."""
  out = dict(held_out)
  if "text_ce" in out:
    out["perplexity"] = math.exp(out["text_ce"])
  return out


def write(root: str, summary: dict) -> str:
  path = os.path.join(root, SUMMARY_FILE)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
  os.replace(tmp, path)
  return path


def _pct(v) -> str:
  return "   -" if v is None else f"{100 * v:4.0f}"


def table(summary: dict) -> str:
  """The printed summary (plain text)."""
  lines = ["", f"STARFlow2 demo ({summary['size']})", "", "wall time per phase"]
  for phase, s in summary["wall_seconds"].items():
    lines.append(f"  {phase:<10} {s:8.1f} s")
  total = summary["total_seconds"]
  lines.append(f"  {'total':<10} {total:8.1f} s  ({total / 60:.1f} min)")
  lines.append("")
  lines.append(f"latent NLL, held out (stage 3)     {summary['latent_nll']:.4f} nats/dim")
  lm = summary["lm"]
  lines.append(f"language model, held out           CE {lm['text_ce']:.4f} nats/token, perplexity "
               f"{lm['perplexity']:.3f}, next-token accuracy {100 * lm['token_accuracy']:.1f}%")
  lines.append(f"FAE reconstruction PSNR, held out  {summary['fae_psnr']:.2f} dB")
  lines.append("")
  lines.append("prompt following (% correct)   " + " ".join(f"{a:>8}" for a in ATTRIBUTES) + "       n")
  for g in GROUPS:
    row = summary["prompt_following"][g]
    lines.append(f"  {g:<28} " + " ".join(f"{_pct(row.get(a)):>8}" for a in ATTRIBUTES) +
                 f" {row['num']:7d}")
  lines.append("")
  qa = summary["qa"]
  lines.append("QA accuracy (% correct)        " + " ".join(f"{t:>8}" for t in QA_TYPES) + "       n")
  lines.append(f"  {'by question type':<28} " + " ".join(f"{_pct(qa.get(t)):>8}" for t in QA_TYPES) +
               f" {qa['num']:7d}")
  lines.append("")
  return "\n".join(lines)
