"""`launch.demo`'s logic: the phases of `demo.phases` in order (finished ones skipped), then the summary.

run(workdir, smoke) -> the summary dict (demo.summary), also DIR/summary.json and the printed table; or
None when a training phase was stopped by a signal (SIGTERM: `launch.train` writes its checkpoint and
returns). That phase is not marked done, so running the demo again resumes it from its checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np
from absl import logging

from starflow2_jax.demo import evaluate, phases as phases_lib, summary as summary_lib
from starflow2_jax.pretzel import toy_tokenizer

EVAL_PARTIAL = "eval.partial"  # the eval phase writes here, renamed to eval/ when complete
# held-out sizes of the evaluation: (captions, QA scenes, documents)
EVAL_SIZES = {"full": (64, 32, 2), "smoke": (4, 2, 1)}


class Stopped(Exception):
  """A training phase stopped by a signal before its last step (its checkpoint written)."""


def _train(loop, phase: phases_lib.TrainPhase, phase_dir: str) -> dict:
  summary = loop.train_and_evaluate(phase.build(), phase_dir)
  if summary["preempted"]:
    raise Stopped(f"{phase.name}: stopped by a signal at step {summary['step']}, its checkpoint written "
                  f"in {phase_dir}; run the demo again to resume it")
  return summary


def _say(text: str) -> None:
  sys.stderr.write(text + "\n")
  sys.stderr.flush()


def _eval_phase(layout: phases_lib.Layout, stage3: phases_lib.TrainPhase, size: str) -> dict:
  """Generate, write and score the outputs of evaluate's docstring into DIR/eval (atomically)."""
  from starflow2_jax.demo import generation  # imports the generation stack only when it runs
  final, partial = layout.dir("eval"), layout.dir(EVAL_PARTIAL)
  if os.path.isfile(os.path.join(final, evaluate.SCORES_FILE)):  # complete, the state not yet marked
    return _read_scores(layout)
  if os.path.isdir(partial):  # the demo's own leftovers of an interrupted evaluation
    shutil.rmtree(partial)
  os.makedirs(partial)
  data = stage3.build().data
  num_captions, num_scenes, num_docs = EVAL_SIZES[size]
  gen = generation.DemoGenerator(layout.export("stage3"))
  captions = evaluate.heldout_captions(data, num_captions)
  evaluate.write_t2i(os.path.join(partial, "t2i"), captions,
                     gen.text_to_image([c["caption"] for c in captions]))
  questions = evaluate.heldout_questions(data, num_scenes)
  world = evaluate.test_world(data)
  images = np.stack([world[i]["image"] for i in range(num_scenes)])
  predictions = gen.answer(images[[q["scene"] for q in questions]], [q["question"] for q in questions])
  evaluate.write_qa(partial, questions, images, predictions)
  prompts = evaluate.document_prompts(data, num_docs)
  evaluate.write_documents(os.path.join(partial, "interleaved"), [(p, gen.document(p)) for p in prompts])
  scores = evaluate.score(partial)
  os.replace(partial, final)
  return scores


def _read_scores(layout: phases_lib.Layout) -> dict:
  with open(os.path.join(layout.dir("eval"), evaluate.SCORES_FILE)) as f:
    return json.load(f)


def run(workdir: str, smoke: bool = False) -> dict | None:
  """Run (or resume) the whole demo in `workdir`; returns the summary (None: stopped by a signal)."""
  from starflow2_jax.train import loop  # after flag parsing: grain workers spawn the entry module
  root = os.path.abspath(os.path.expanduser(workdir))
  size = "smoke" if smoke else "full"
  state = phases_lib.State(root, size)
  layout = phases_lib.Layout(root)
  train = {p.name: p for p in phases_lib.train_phases(layout, smoke)}
  total = len(phases_lib.PHASES)
  for k, name in enumerate(phases_lib.PHASES, 1):
    if state.done(name):
      _say(f"[{k}/{total}] {name}: done ({state.seconds(name):.0f} s), skipped")
      continue
    if name == "tokenizer":
      _say(f"[{k}/{total}] tokenizer: the toy BPE on ShapesWorld text -> {layout.tokenizer}")
      if not os.path.exists(layout.tokenizer):
        state.run(name, lambda: toy_tokenizer.train_shapesworld_tokenizer(
            layout.tokenizer, layout=phases_lib.shapes_layout(list(train.values()))))
      else:
        state.run(name, lambda: None)
    elif name in train:
      phase, phase_dir = train[name], layout.dir(name)
      _say(f"[{k}/{total}] {name}: {phase.command(phase_dir)}")
      try:
        state.run(name, lambda: _train(loop, phase, phase_dir))
      except Stopped as stopped:
        _say(f"[{k}/{total}] {stopped}")
        return None
    else:
      _say(f"[{k}/{total}] eval: generation, detector and QA -> {layout.dir('eval')}")
      state.run(name, lambda: _eval_phase(layout, train["stage3"], size))
  scores = _read_scores(layout)
  stage_evals = {f"stage{n}": phases_lib.latest_eval(layout.dir(f"stage{n}"), required=n == 3)
                 for n in phases_lib.STAGES}
  wall = {p: state.seconds(p) for p in phases_lib.PHASES}
  result = {
      "size": size, "wall_seconds": wall, "total_seconds": sum(wall.values()),
      "latent_nll": stage_evals["stage3"]["latent_nll"],
      "lm": summary_lib.lm_metrics(phases_lib.latest_eval(layout.dir("lm"))),
      "fae_psnr": phases_lib.latest_eval(layout.dir("fae"))["psnr"],
      "prompt_following": scores["prompt_following"], "qa": scores["qa"], "stages": stage_evals,
      "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  path = summary_lib.write(root, result)
  print(summary_lib.table(result))
  logging.info("summary written to %s", path)
  return result
