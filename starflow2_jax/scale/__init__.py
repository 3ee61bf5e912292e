"""Pod scale: named TPU topologies, abstract train states, ahead-of-time compilation, memory and FLOP
reports (used by `launch.compile`, `launch.memory_table` and `launch.sweep`).

  topology    Cloud TPU names (v5p-64, v5e-256, v4-128, v6e-64, v5p:2x4x4) -> the slice's devices
  tpu_env     keeps libtpu quiet on a machine without TPU chips
  abstract    config -> mesh, task, abstract (trainable, optimizer, frozen, batch) and the train step
  hlo_flops   FLOPs of a compiled program with its loop trip counts
  model_flops the analytical model FLOPs of a step (6ND trained, 2ND frozen, plus attention)
  report      compile for a target; per-chip memory, FLOPs, step time at peak; the not-fit message
  generation  the STARFlow2 decode step (both KV caches sharded by the rules) compiled for a target:
              per-chip memory, FLOPs per generated token and image
"""
