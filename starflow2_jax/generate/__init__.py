"""STARFlow2 generation (STARFLOW2.md 7): text-to-image, image understanding and interleaved
text-image documents with one jitted cached step over both streams.

  step     Caches (the VLM and deep KV caches) and joint_step (prefill = decode)
  loop     GenerateConfig and the while-loop generator (text, image and forced <|vision_end|> modes,
           guidance [cond; uncond], Jacobi chunks)
  prompts  the chat templates of generation, null prompts, left-padded batches, the generated sequence
           as teacher-forcing inputs
  decode   shallow inversion, score denoising, FAE decode, understanding inputs
  api      load a STARFlow2 checkpoint (Generator) and run whole requests
  cli      `python -m launch.sample` for model_kind "starflow2": PNGs, generation.json, index.html
"""
