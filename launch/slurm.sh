#!/usr/bin/env bash
# Multi-node GPU training with SLURM: one process per node driving all of its GPUs. JAX's cluster
# detection reads the SLURM environment (`jax.distributed.initialize()` in `parallel.initialize_
# distributed`): the coordinator is the first node, every node a process, each with its local GPUs.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm.sh \
#       --config=configs/tarflow_imagenet64.py --workdir=/shared/runs/in64 \
#       --config.data.data_dir=/shared/tensorflow_datasets
#
# The arguments are those of `python -m launch.train`. The checkout and its environment
# (pip install -e '.[cuda]') must be on a file system every node sees; set VENV to activate one.
# The workdir must be shared too (checkpoints are written by all processes).
#SBATCH --job-name=starflow2_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=slurm-%j.out
set -euo pipefail

[[ $# -ge 1 ]] || { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ -n "${VENV:-}" ]] && source "$VENV/bin/activate"
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

# one process per node: every local GPU is visible to it
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

${DRY_RUN:+echo} srun --ntasks-per-node=1 --kill-on-bad-exit=1 python -m launch.train "$@"
