"""The metrics of `launch.evaluate`, as library functions (each returns a JSON-ready dict).

  bits_per_dim     pixel flows: bits/dim of the held-out split exactly as TarFlow defines it
                   (STARFLOW2.md 2.5): uniform dequantisation x = (x_int + U[0,1)) / 256 * 2 - 1, the
                   log 128 bin constant, the validation split (config.data.eval_split) in order, no
                   flips, no labels (a class-conditional model gets label -1: the mean class embedding).
  latent_nll       latent flows: NLL in nats/dim of given latents [N, h, w, C] (continuous, no
                   dequantisation and no bin constant): L + 0.5 log 2 pi. Never reported as bits/dim.
  frechet_metric   FID (FID Inception pool features) or FD-DINOv2 (DINOv2 CLS token) of images (a PNG
                   folder, or samples drawn from a flow checkpoint) against reference statistics.
                   FD-DINOv2 preprocesses as dgm-eval (layer6ai-labs/dgm-eval, the tool of Stein et al.
                   2023) does: PIL bicubic resize of the uint8 image to 224 x 224 (torchvision's
                   Resize((224, 224), BICUBIC) on a PIL image), / 255, ImageNet mean and std.
  shapes_prompt_following / shapes_qa   the ShapesWorld proxies on a folder of generated PNGs with
                   prompts.jsonl, and on a QA answers jsonl (the demo's eval/t2i and eval/qa.jsonl).

Sharding: example batches are split over every device of the mesh (its data x fsdp axes), each process
loading only its own rows (`parallel.host_batch_slice`); per-example results are gathered to every
process, so every process returns the same numbers. A short last batch is padded and the padding
dropped.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from starflow2_jax import ckpt, flows, logging_utils, parallel
from starflow2_jax.data import pipeline
from starflow2_jax.errors import UserError
from starflow2_jax.eval import frechet, inception, shapes_detector
from starflow2_jax.flows import cli as flow_cli
from starflow2_jax.flows.likelihood import HALF_LOG_2PI
from starflow2_jax.train.flow_task import images_to_float

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PROMPTS_FILE = "prompts.jsonl"
_DEQUANT_STREAM = 0  # fold_in(fold_in(rng, position), 0): the dequantisation noise of one example


def resolve_checkpoint(path: str) -> str:
  """A parameter checkpoint directory: `path` itself, or the newest `params_<step>/` of a training
  workdir."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path} not found: pass --checkpoint=DIR, a parameter checkpoint "
                            "(launch.convert --out, or a training run's WORKDIR/params_<step>) or a workdir")
  if ckpt.is_params_checkpoint(path):
    return path
  exports = sorted(d for d in os.listdir(path) if d.startswith("params_")
                   and ckpt.is_params_checkpoint(os.path.join(path, d)))
  if not exports:
    raise FileNotFoundError(f"{path} is neither a parameter checkpoint (no meta.json) nor a training "
                            "workdir with a finished params_<step>/ export")
  return os.path.join(path, exports[-1])


def eval_mesh() -> jax.sharding.Mesh:
  """Every device on the data axis (evaluation is data parallel)."""
  return parallel.make_mesh(parallel.default_mesh_config())


def sharded_map(fn: Callable, batches: Iterable[dict], total: int, mesh: jax.sharding.Mesh,
                progress: str = "") -> dict[str, np.ndarray]:
  """Apply the jitted `fn(batch with "pos") -> {name: [b, ...]}` to global batches split over the mesh;
  -> {name: numpy [total, ...]} gathered on every process, padding removed."""
  shards = parallel.batch_shards(mesh) * jax.process_count()
  bar = logging_utils.Progress(total, 0) if progress else None
  outs: dict[str, list[np.ndarray]] = {}
  start = 0
  for b in batches:
    n = len(next(iter(b.values())))
    padded = -(-n // shards) * shards
    b = {k: np.concatenate([v, np.repeat(v[-1:], padded - n, 0)]) for k, v in b.items()}
    local = {k: v[parallel.host_batch_slice(padded)] for k, v in b.items()}
    gb = parallel.make_global_batch(local, mesh, padded)
    gb["pos"] = start + jnp.arange(padded, dtype=jnp.int32)
    with jax.set_mesh(mesh):
      out = fn(gb)
    for k, v in out.items():
      outs.setdefault(k, []).append(np.asarray(multihost_utils.process_allgather(v, tiled=True))[:n])
    start += n
    if bar is not None:
      bar.update(n)
  if bar is not None:
    bar.close()
  return {k: np.concatenate(v) for k, v in outs.items()}


def _mean_and_sem(values: np.ndarray) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  sem = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
  return float(values.mean()), sem


def _flow_model(checkpoint: str):
  config = ckpt.load_config(checkpoint)
  kind = config.get("model_kind", None)
  if kind != "flow":
    raise UserError(f"{checkpoint}: bits/dim and latent NLL evaluate flow checkpoints (model_kind "
                    f"'flow'), found model_kind {kind!r}")
  model, params, config = flow_cli.load_flow(checkpoint, config)
  return model, jax.device_put(params), config


def bits_per_dim(checkpoint: str, *, num: int | None = None, batch_size: int = 64, seed: int = 0,
                 mesh: jax.sharding.Mesh | None = None, progress: bool = True) -> dict:
  """Held-out bits/dim of a pixel flow checkpoint (module docstring); num=None: the whole split."""
  model, params, config = _flow_model(checkpoint)
  cfg = model.cfg
  mesh = mesh or eval_mesh()
  data = config.data
  if (data.image_size, data.image_size, data.channels) != cfg.image_shape:
    raise UserError(f"{checkpoint}: data.image_size/channels {(data.image_size, data.channels)} do not "
                    f"give the model's images {cfg.image_shape}; is this a latent flow? Use --metric=nll "
                    "--latents=FILE.npy")
  source = pipeline.build_source(data, data.eval_split)
  n = len(source) if num is None else min(num, len(source))
  rng = jax.random.key(seed)

  @jax.jit
  def per_example(batch):
    keys = jax.vmap(lambda p: jax.random.fold_in(jax.random.fold_in(rng, p), _DEQUANT_STREAM))(batch["pos"])
    x = jax.vmap(lambda k, xi: flows.dequantize(k, xi, "uniform", 0.0))(keys, images_to_float(batch["image"]))
    tokens = flows.patchify(x, cfg.patch_size, cfg.layout)
    labels = jnp.full(x.shape[:1], -1, jnp.int32) if cfg.num_classes else None
    out = model.apply({"params": params}, tokens, labels)
    return {"bpd": flows.bits_per_dim(flows.nll_per_sample(out))}

  batches = ({"image": b["image"]} for b in pipeline.eval_batches(
      data, source, batch_size, lambda r: {"image": np.asarray(r["image"], np.uint8)}, n))
  res = sharded_map(per_example, batches, n, mesh, progress="bpd" if progress else "")
  mean, sem = _mean_and_sem(res["bpd"])
  return {"bpd": mean, "bpd_sem": sem, "num": n, "split": data.eval_split, "dataset": data.name,
          "dequantisation": "uniform", "labels": "none"}


def latent_nll(checkpoint: str, latents: np.ndarray, *, batch_size: int = 64,
               mesh: jax.sharding.Mesh | None = None, progress: bool = True) -> dict:
  """Held-out latent NLL in nats/dim of latents [N, h, w, C] (a latent flow: its images are latents)."""
  model, params, _ = _flow_model(checkpoint)
  cfg = model.cfg
  latents = np.asarray(latents, np.float32)
  if latents.ndim != 4 or latents.shape[1:] != cfg.image_shape:
    raise UserError(f"--latents: expected [N, {', '.join(map(str, cfg.image_shape))}] (the model's "
                    f"latent grid and channels), found {list(latents.shape)}")
  mesh = mesh or eval_mesh()

  @jax.jit
  def per_example(batch):
    tokens = flows.patchify(batch["latent"], cfg.patch_size, cfg.layout)
    labels = jnp.full(tokens.shape[:1], -1, jnp.int32) if cfg.num_classes else None
    out = model.apply({"params": params}, tokens, labels)
    return {"nll": flows.nll_per_sample(out) + HALF_LOG_2PI}

  batches = ({"latent": latents[s:s + batch_size]} for s in range(0, len(latents), batch_size))
  res = sharded_map(per_example, batches, len(latents), mesh, progress="nll" if progress else "")
  mean, sem = _mean_and_sem(res["nll"])
  return {"latent_nll_nats_per_dim": mean, "latent_nll_sem": sem, "num": len(latents)}


# -- image folders ------------------------------------------------------------------------------------
def image_files(folder: str) -> list[str]:
  folder = os.path.abspath(os.path.expanduser(folder))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder {folder} not found")
  files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
  if not files:
    raise UserError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
  return [os.path.join(folder, f) for f in files]


def read_rgb(path: str) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"), np.uint8)


def _image_batches(files: list[str], batch_size: int) -> Iterator[dict]:
  for s in range(0, len(files), batch_size):
    chunk = [read_rgb(f) for f in files[s:s + batch_size]]
    shapes = {c.shape for c in chunk}
    if len(shapes) > 1:
      raise UserError(f"images of one folder must share a size, found {sorted(shapes)}")
    yield {"image": np.stack(chunk)}


# -- Frechet distances --------------------------------------------------------------------------------
NETWORKS = ("inception", "dinov2")  # the feature networks of FID and FD-DINOv2
DGM_EVAL_SIZE = 224  # dgm-eval's DINOv2 input side (dgm_eval/models/dinov2.py)


def dgm_eval_resize(images: np.ndarray) -> np.ndarray:
  """uint8 [b, H, W, 3] -> uint8 [b, 224, 224, 3]: dgm-eval's DINOv2 resize (PIL bicubic of each RGB
  image, what torchvision's Resize((224, 224), BICUBIC) does to a PIL image)."""
  size = (DGM_EVAL_SIZE, DGM_EVAL_SIZE)
  if images.shape[1:3] == size:
    return images
  return np.stack([np.asarray(Image.fromarray(im).resize(size, Image.BICUBIC)) for im in images])


@functools.lru_cache(maxsize=2)
def _feature_fn(network: str, checkpoint: str | None, mesh: jax.sharding.Mesh):
  """The jitted uint8 batch {"image": [b, H, W, 3]} -> {"features": [b, F]} of a converted network
  (one per network and directory, so repeated evaluations in one process compile once):
  inception: the FID Inception's 2048-d pool features of pixels / 255;
  dinov2: the final-normed CLS token of DINOv2 of 224 x 224 images (`dgm_eval_resize` first), ImageNet
  normalisation: the representation of FD-DINOv2 (Stein et al. 2023; their encoder is ViT-L/14 at
  224 x 224: convert with --input_size=224)."""
  if network == "inception":
    if not checkpoint:
      raise UserError("FID needs the FID Inception network: convert pytorch-fid's weights with python -m "
                      "launch.convert --from=pytorch_fid_inception --checkpoint="
                      "pt_inception-2015-12-05-6726825d.pth --out=DIR, then pass --inception=DIR")
    model, variables = inception.load_inception(checkpoint)
    variables = jax.device_put(variables)

    @jax.jit
    def features(batch):
      return {"features": model.apply(variables, batch["image"].astype(jnp.float32) / 255.0)}
    return features
  if not checkpoint:
    raise UserError("FD-DINOv2 needs a converted DINOv2: python -m launch.convert --from=hf_dinov2 "
                    "--checkpoint=HF_DINOV2_DIR --out=DIR --input_size=224, then pass --dinov2=DIR")
  from starflow2_jax.fae import dinov2  # the FAE package's DINOv2 port
  model, params, cfg = dinov2.load_dinov2(checkpoint, mesh)
  if tuple(cfg.input_hw) != (DGM_EVAL_SIZE, DGM_EVAL_SIZE):
    raise UserError(f"--dinov2={checkpoint}: FD-DINOv2 (dgm-eval) feeds DINOv2 {DGM_EVAL_SIZE} x "
                    f"{DGM_EVAL_SIZE} images, but this checkpoint takes input_size {list(cfg.input_hw)}; "
                    f"convert it again with launch.convert --from=hf_dinov2 --input_size={DGM_EVAL_SIZE}")

  @jax.jit
  def cls_features(batch):
    return {"features": dinov2.features(model, params, dinov2.preprocess(batch["image"], cfg))[:, 0]}
  return cls_features


def network_features(network: str, checkpoint: str | None, batches: Iterable[dict], total: int, *,
                     mesh: jax.sharding.Mesh | None = None, progress: bool = True) -> np.ndarray:
  """Features [total, F] of uint8 image batches {"image": [b, H, W, 3]} (`_feature_fn`)."""
  mesh = mesh or eval_mesh()
  fn = _feature_fn(network, checkpoint, mesh)
  if network == "dinov2":
    batches = ({"image": dgm_eval_resize(b["image"])} for b in batches)
  return sharded_map(fn, batches, total, mesh, network if progress else "")["features"]


def folder_features(network: str, folder: str, checkpoint: str | None, *, batch_size: int = 50,
                    mesh: jax.sharding.Mesh | None = None, progress: bool = True) -> np.ndarray:
  files = image_files(folder)
  return network_features(network, checkpoint, _image_batches(files, batch_size), len(files),
                          mesh=mesh, progress=progress)


def flow_sample_batches(checkpoint: str, num: int, batch_size: int, seed: int,
                        mesh: jax.sharding.Mesh) -> Iterator[dict]:
  """uint8 RGB samples [b, H, W, 3] of a flow checkpoint, guided and denoised as its config.sample and
  training noise say; sample r uses noise row r of `seed` (independent of the batching)."""
  model, params, config = _flow_model(checkpoint)
  cfg = model.cfg
  guidance = flow_cli.guidance_from_config(config.get("sample", ml_collections.ConfigDict()),
                                           cfg.parametrisation)
  key = jax.random.key(seed)

  @functools.partial(jax.jit, static_argnums=(1,))
  def draw(first_row, rows):
    z = flows.noise(key, rows, cfg.num_tokens, cfg.token_dim, first_row=first_row)
    labels = jnp.full((rows,), -1, jnp.int32) if cfg.num_classes else None
    x, _ = flows.reverse(model, {"params": params}, z, labels, guidance=guidance)
    if cfg.dequant == "gaussian" and cfg.noise_std > 0:
      x = flows.denoise(model, {"params": params}, x, labels)
    img = flows.unpatchify(x, cfg.patch_size, cfg.layout, cfg.image_shape)
    return jnp.round((jnp.clip(img, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)

  if cfg.channels not in (1, 3):
    raise UserError(f"FID reads RGB (or grey) images; this flow models {cfg.channels} channels (a latent "
                    "flow: decode its samples to pixels first)")
  for s in range(0, num, batch_size):
    rows = min(batch_size, num - s)
    with jax.set_mesh(mesh):
      img = np.asarray(multihost_utils.process_allgather(draw(s, rows), tiled=True))
    yield {"image": np.repeat(img, 3, axis=-1) if cfg.channels == 1 else img}


def frechet_metric(network: str, *, ref_stats: str | None, checkpoint_dir: str | None,
                   samples: str | None = None, flow: str | None = None, num_samples: int = 0,
                   batch_size: int = 50, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                   progress: bool = True) -> dict:
  """FID (network "inception") or FD-DINOv2 ("dinov2") of a PNG folder (`samples`) or of
  `num_samples` samples of the flow checkpoint `flow`, against `ref_stats`."""
  name = {"inception": "fid", "dinov2": "fd_dinov2"}[network]
  if not ref_stats:
    flag = {"inception": "--ref_stats", "dinov2": "--dinov2_ref_stats"}[network]
    raise UserError(f"{name} needs reference statistics: pass {flag}=FILE.npz (pytorch-fid's format; "
                    f"write them with --metric={name} --images=DIR --save_stats=FILE.npz)")
  ref_mu, ref_sigma = frechet.load_statistics(ref_stats)
  mesh = mesh or eval_mesh()
  if samples:
    feats = folder_features(network, samples, checkpoint_dir, batch_size=batch_size, mesh=mesh,
                            progress=progress)
    source = os.path.abspath(samples)
  else:
    if not num_samples or num_samples < 2:
      raise UserError(f"{name} of a flow checkpoint needs --num_samples >= 2 (50000 for the paper's "
                      f"FID), got {num_samples}")
    batches = flow_sample_batches(flow, num_samples, batch_size, seed, mesh)
    feats = network_features(network, checkpoint_dir, batches, num_samples, mesh=mesh, progress=progress)
    source = f"samples of {flow} (seed {seed})"
  return {name: frechet.frechet_distance_to_features(feats, ref_mu, ref_sigma), "num": len(feats),
          "samples": source, "ref_stats": os.path.abspath(ref_stats)}


def fid(*, ref_stats: str | None, inception_dir: str | None, samples: str | None = None,
        checkpoint: str | None = None, **kw) -> dict:
  """FID with the FID Inception (`frechet_metric`)."""
  return frechet_metric("inception", ref_stats=ref_stats, checkpoint_dir=inception_dir, samples=samples,
                        flow=checkpoint, **kw)


def fd_dinov2(*, ref_stats: str | None, dinov2_dir: str | None, samples: str | None = None,
              checkpoint: str | None = None, **kw) -> dict:
  """FD-DINOv2 with a converted DINOv2 (`frechet_metric`)."""
  return frechet_metric("dinov2", ref_stats=ref_stats, checkpoint_dir=dinov2_dir, samples=samples,
                        flow=checkpoint, **kw)


# -- ShapesWorld proxies ------------------------------------------------------------------------------
def read_jsonl(path: str, required: tuple[str, ...]) -> list[dict]:
  """Rows of a jsonl file; an empty or malformed line, or a row missing a field, is an error naming
  the line."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found")
  rows = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        raise UserError(f"{path} line {i} is empty: every line must be one JSON object with "
                        f"{list(required)}; remove the empty line")
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{path} line {i} is not JSON ({e.msg}): expected an object with "
                        f"{list(required)}") from e
      missing = [k for k in required if not isinstance(row, dict) or k not in row]
      if missing:
        raise UserError(f"{path} line {i}: missing {missing} (each line needs {list(required)})")
      rows.append(row)
  if not rows:
    raise UserError(f"{path} has no rows")
  return rows


def shapes_prompt_following(samples: str | None, progress: bool = True) -> dict:
  """Prompt following of a folder of generated images: `samples`/prompts.jsonl lines
  {"file", "caption", "excluded_combination" (optional)}, files relative to the folder."""
  if not samples:
    raise UserError("--metric=shapes reads generated images: pass --samples=DIR holding the PNGs and "
                    f"{PROMPTS_FILE} (one {{\"file\", \"caption\", \"excluded_combination\"}} per line)")
  folder = os.path.abspath(os.path.expanduser(samples))
  rows = read_jsonl(os.path.join(folder, PROMPTS_FILE), ("file", "caption"))
  bar = logging_utils.Progress(len(rows), 0) if progress else None
  scored = []
  for r in rows:
    path = os.path.join(folder, r["file"])
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{PROMPTS_FILE} names {r['file']}, but {path} does not exist")
    scored.append({"caption": r["caption"], "detections": shapes_detector.detect(read_rgb(path)),
                   "excluded_combination": bool(r.get("excluded_combination", False))})
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  return shapes_detector.prompt_following(scored)


def shapes_qa(answers: str | None) -> dict:
  """QA accuracy by question type of a jsonl of {"question", "answer", "prediction"}."""
  if not answers:
    raise UserError("--metric=qa reads answers: pass --answers=FILE.jsonl with one "
                    "{\"question\", \"answer\", \"prediction\"} per line")
  return shapes_detector.qa_accuracy(read_jsonl(answers, ("question", "answer", "prediction")))


def write_results(out_dir: str, name: str, results: dict, step: int = 0) -> str | None:
  """`out_dir`/`name`.json (a new `name`.<n>.json if that exists: never overwritten) and the numeric
  results as TensorBoard scalars under `out_dir`/tensorboard_eval (process 0). Returns the JSON path."""
  if jax.process_index() != 0:
    return None
  os.makedirs(out_dir, exist_ok=True)
  path, n = os.path.join(out_dir, f"{name}.json"), 1
  while os.path.exists(path):
    path, n = os.path.join(out_dir, f"{name}.{n}.json"), n + 1
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  writer = logging_utils.MetricWriter(os.path.join(out_dir, "tensorboard_eval"))
  writer.scalars(step, {k: v for k, v in _flatten(results).items()})
  writer.close()
  return path


def _flatten(tree: dict, prefix: str = "") -> dict[str, float]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, name + "/"))
    elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
      out[name] = float(v)
  return out
