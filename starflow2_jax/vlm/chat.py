"""Chat with an imported Qwen2.5-VL checkpoint: the logic behind `python -m launch.sample` for
checkpoints whose config.model_kind is "qwen2_5_vl".

  python -m launch.sample --checkpoint=DIR --tokenizer=qwen2.5 --prompt="Describe it." \
      --image=cat.jpg --max_new_tokens=64 --temperature=0 --out=/tmp/chat
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax import ckpt
from starflow2_jax.errors import UserError
from starflow2_jax.parallel import (DEFAULT_LOGICAL_RULES, inference_mesh, param_shardings,
                                    sharding_context)
from starflow2_jax.vlm import tokenizer as tok_lib
from starflow2_jax.vlm.config import MODEL_KIND
from starflow2_jax.vlm.generate import SamplingConfig, generate
from starflow2_jax.vlm.model import Qwen2_5_VL, QwenConfig, abstract_params
from starflow2_jax.vlm.positions import mrope_positions
from starflow2_jax.vlm.vision import preprocess_image

GENERATION_FILE = "generation.json"
LM_KIND = "lm"  # train/lm_task.py: a text-only Qwen2.5 language model trained by launch.train


def load_vlm(checkpoint: str, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
             rules=DEFAULT_LOGICAL_RULES):
  """A converted checkpoint (or an lm run's export) -> (model, params, config), params the plain tree
  (the convention of `flows.cli.load_flow` too). dtype: the parameter dtype the caller expects (None =
  whatever is stored); a different stored dtype is an error, not a silent cast. mesh: restore the
  parameters sharded by `rules` (None = one device); a `sharding` section of an older checkpoint's config
  is ignored."""
  config = ckpt.load_config(checkpoint)
  kind = config.get("model_kind")
  if kind not in (MODEL_KIND, LM_KIND):
    raise UserError(f"{checkpoint}: expected a {MODEL_KIND!r} checkpoint (or the export of a "
                    f"{LM_KIND!r} run), found model_kind {kind!r}")
  cfg = QwenConfig.from_config(config.model)
  if dtype is not None and dtype != cfg.param_dtype:
    raise UserError(f"{checkpoint} stores {cfg.param_dtype} parameters, but {dtype} was requested: "
                    f"re-import with `launch.convert --dtype={dtype}`")
  abstract = abstract_params(cfg)
  shardings = param_shardings(abstract, mesh, rules)
  if kind == LM_KIND:  # launch.train's export of the lm task: {"params": the same tree}
    params = ckpt.load_params(checkpoint, {"params": nn.unbox(abstract)}, {"params": shardings})["params"]
  else:
    params = ckpt.load_params(checkpoint, nn.unbox(abstract), shardings)
  return Qwen2_5_VL(cfg), params, config


def build_prompt(tokenizer, config, prompt: str, images: Sequence, system: str | None):
  """-> (prompt ids [L], patches [N, patch_dim] or None, patch grids, language-model grids)."""
  cfg = QwenConfig.from_config(config.model)
  image_id = tok_lib.special_id(tokenizer, tok_lib.IMAGE_PAD)
  if image_id != config.model.image_token_id:
    raise UserError(f"tokenizer and checkpoint disagree: the tokenizer's {tok_lib.IMAGE_PAD} is "
                    f"{image_id}, the checkpoint's image_token_id is {config.model.image_token_id}")
  patches, grids = [], []
  for image in images:
    if cfg.vision is None:
      raise UserError("images were given, but this checkpoint has no vision tower")
    p, g = preprocess_image(image, cfg.vision)
    patches.append(p)
    grids.append(g)
  merge = cfg.vision.spatial_merge_size if images else 1
  llm_grids = [(h // merge, w // merge) for _, h, w in grids]
  text = tok_lib.chat_prompt(prompt, [h * w for h, w in llm_grids], system)
  ids = np.asarray(tokenizer.encode(text).ids, np.int32)
  return ids, (np.concatenate(patches) if patches else None), tuple(grids), llm_grids


def chat(checkpoint: str, tokenizer: str, prompt: str, images: Sequence[str] = (),
         max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
         seed: int = 0, out: str | None = None, system: str | None = tok_lib.DEFAULT_SYSTEM,
         max_len: int | None = None, mesh_shape: tuple[int, int] | None = None) -> dict:
  """Generate the assistant's answer to one user turn (images first, then the prompt text).

  Returns {"text", "prompt_ids", "generated_ids"}; with `out`, also writes them to out/generation.json.
  max_len: the longest prompt + answer allowed (default: the model's max_position_embeddings).
  mesh_shape: (fsdp, tensor) to shard the model over that many devices (None = one device).
  """
  if out is not None and os.path.exists(os.path.join(out, GENERATION_FILE)):
    raise FileExistsError(f"{os.path.join(out, GENERATION_FILE)} exists: choose a new --out")
  missing = [p for p in images if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"--image: no such file(s): {missing}")
  from PIL import Image
  mesh = None if mesh_shape is None else inference_mesh(*mesh_shape)
  model, params, config = load_vlm(checkpoint, mesh=mesh)
  with sharding_context(mesh):
    record = _answer(model, params, config, tok_lib.load_tokenizer(tokenizer), prompt,
                     [Image.open(p) for p in images], max_new_tokens, max_len, system,
                     temperature, top_k, top_p, seed)
  record["images"] = list(images)
  if out is not None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, GENERATION_FILE), "w") as f:
      json.dump(record, f, indent=2)
  return record


def _answer(model, params, config, tk, prompt, images, max_new_tokens, max_len, system, temperature,
            top_k, top_p, seed) -> dict:
  cfg = model.cfg
  ids, patches, grids, llm_grids = build_prompt(tk, config, prompt, images, system)
  limit = max_len or cfg.max_position_embeddings
  if len(ids) + max_new_tokens > limit:
    raise UserError(f"prompt of {len(ids)} tokens + max_new_tokens {max_new_tokens} = "
                    f"{len(ids) + max_new_tokens} exceeds the maximum length {limit}: shorten the "
                    "prompt, use fewer or smaller images, or lower --max_new_tokens")
  if ids.max() >= cfg.vocab_size:
    raise UserError(f"the tokenizer produced id {ids.max()}, but the model has only {cfg.vocab_size} "
                    "embedding rows: this tokenizer does not belong to this checkpoint")
  positions, next_pos = mrope_positions(ids[None], None, llm_grids, config.model.image_token_id,
                                        config.model.get("image_positions", "mrope"))
  image_embeds = image_index = None
  if patches is not None:
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, grids, method=Qwen2_5_VL.encode_images))
    image_embeds = encode(params, jnp.asarray(patches))
    is_img = ids == config.model.image_token_id
    image_index = jnp.asarray(np.where(is_img, np.cumsum(is_img) - 1, -1)[None].astype(np.int32))
  eos = {tk.token_to_id(t) for t in (tok_lib.IM_END, tok_lib.END_OF_TEXT)} - {None}
  eos |= set(config.model.eos_token_id or [])
  pad = config.model.get("pad_token_id")
  vocab = tk.get_vocab_size(with_added_tokens=True)
  sampling = SamplingConfig(
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
      eos_ids=tuple(sorted(eos)), pad_id=min(eos) if pad is None else pad,
      vocab_limit=vocab if vocab < cfg.vocab_size else None)
  result = generate(model, params, jnp.asarray(ids[None]), jnp.ones((1, len(ids)), bool),
                    jnp.asarray(positions), jnp.asarray(next_pos), jax.random.key(seed), sampling,
                    image_embeds, image_index)
  generated = np.asarray(result["tokens"][0, :int(result["lengths"][0])]).tolist()
  return {"prompt": prompt, "prompt_ids": ids.tolist(), "generated_ids": generated,
          "text": tk.decode(generated, skip_special_tokens=True)}
