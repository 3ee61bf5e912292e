#!/bin/bash
# The GPU measurement of issue 12 in one call on a lent GPU machine (launch/gpu_check.py): the digits
# job and a ~1B-parameter bf16 flow, step time and MFU against the chip's peak.
#
#   OUT=/tmp/out bash launch/gpu_check.sh [STEPS]        # default 60 steps per part
#
# Writes $OUT/gpu_check.json and $OUT/gpu_check.log; the runs go to a fresh directory under /tmp.
# Wheels in .whl/ (packages the machine's image lacks, e.g. ml-collections and grain with their
# dependencies, downloaded for its Python) are installed first into /tmp/site.
set -euo pipefail
STEPS=${1:-60}
: "${OUT:?set OUT to the directory for gpu_check.json and gpu_check.log}"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
$PY -m launch.gpu_check --workdir="$(mktemp -d /tmp/gpu_check.XXXXXX)" --steps="$STEPS" \
    --json="$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
