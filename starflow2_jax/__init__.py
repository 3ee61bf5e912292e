"""starflow2_jax: STARFlow2 / STARFlow / TarFlow in JAX + Flax."""
from starflow2_jax.scale import tpu_env as _tpu_env

_tpu_env.quiet_without_tpu()  # before JAX lists devices: libtpu installed on a machine without chips
