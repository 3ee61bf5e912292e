"""The ShapesWorld proxies of a STARFlow2 checkpoint, generation included: held-out captions -> images
-> detector scores (`--metric=shapes`), held-out questions about test images -> answers -> accuracy
(`--metric=qa`). The outputs are the demo's (`demo.evaluate`: the same captions, questions, files):

  OUT/shapes_t2i/NNN.png, prompts.jsonl    one image per held-out caption
  OUT/shapes_qa/qa.jsonl, qa/NNN.png       {question, answer, prediction, file} per question
(a new shapes_t2i.<n> / shapes_qa.<n> when those exist: nothing is overwritten). Requests are sent in
chunks of `chunk` (`demo.generation.DemoGenerator`); settings: the checkpoint's config.sample.
"""
from __future__ import annotations

import os

import numpy as np

from starflow2_jax.demo import evaluate as demo_eval
from starflow2_jax.demo.generation import DemoGenerator
from starflow2_jax.errors import UserError
from starflow2_jax.eval import metrics

MODEL_KIND = "starflow2"  # the checkpoints these proxies generate with (generate.api.MODEL_KIND)
T2I_DIR = "shapes_t2i"
QA_DIR = "shapes_qa"


def new_dir(parent: str, name: str) -> str:
  """parent/name, or the first free parent/name.<n>."""
  path, n = os.path.join(parent, name), 1
  while os.path.exists(path):
    path, n = os.path.join(parent, f"{name}.{n}"), n + 1
  return path


def shapes_data(gen: DemoGenerator):
  """The checkpoint's data config; a model not trained on ShapesWorld examples is an error."""
  data = gen.gen.config.data
  found = data.get("examples_from", None)
  if found != "shapesworld":
    raise UserError(f"--metric=shapes|qa generate from held-out ShapesWorld scenes: the checkpoint's "
                    f"data.examples_from must be 'shapesworld', found {found!r}; score generated "
                    "folders with --samples / --answers instead")
  return data


def generate_t2i(gen: DemoGenerator, out: str, num_captions: int) -> str:
  """The held-out captions' images (`demo.evaluate.heldout_captions`) in a new folder under `out`."""
  captions = demo_eval.heldout_captions(shapes_data(gen), num_captions)
  images = gen.text_to_image([c["caption"] for c in captions])
  return demo_eval.write_t2i(new_dir(out, T2I_DIR), captions, images)


def generate_qa(gen: DemoGenerator, out: str, num_scenes: int) -> str:
  """Greedy answers to every question of the first `num_scenes` test scenes; -> the answers jsonl."""
  data = shapes_data(gen)
  world = demo_eval.test_world(data)
  num_scenes = min(num_scenes, len(world))
  questions = demo_eval.heldout_questions(data, num_scenes)
  images = np.stack([world[i]["image"] for i in range(num_scenes)])
  predictions = gen.answer(images[[q["scene"] for q in questions]], [q["question"] for q in questions])
  return demo_eval.write_qa(new_dir(out, QA_DIR), questions, images, predictions)


def generated_proxies(gen: DemoGenerator, out: str, which: tuple[str, ...], *, num_captions: int,
                      num_scenes: int) -> dict:
  """{"shapes": prompt following, "qa": QA accuracy} (those in `which`) of outputs that `gen` (one
  loaded STARFlow2: DemoGenerator(checkpoint, chunk, seed)) generates under `out`; each result names
  the folder or file it scored."""
  results = {}
  if "shapes" in which:
    folder = generate_t2i(gen, out, num_captions)
    results["shapes"] = {**metrics.shapes_prompt_following(folder), "samples": folder}
  if "qa" in which:
    answers = generate_qa(gen, out, num_scenes)
    results["qa"] = {**metrics.shapes_qa(answers), "answers": answers}
  return results
