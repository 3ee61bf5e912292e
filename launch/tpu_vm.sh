#!/usr/bin/env bash
# Cloud TPU VM slices: create (or queue) a slice, copy this checkout to every worker, install it with
# jax[tpu], and run one command on every worker at once (JAX finds the other workers itself).
#
#   export ZONE=us-east5-a ACCELERATOR=v5p-64            # PROJECT=... RUNTIME=... SPOT=1 optional
#   launch/tpu_vm.sh queue  my-slice                     # queued resource: waits for capacity
#   launch/tpu_vm.sh create my-slice                     # or: create now (fails without capacity)
#   launch/tpu_vm.sh status my-slice
#   launch/tpu_vm.sh copy   my-slice                     # this checkout's tracked files -> ~/starflow2_jax
#   launch/tpu_vm.sh setup  my-slice                     # pip install -e '.[tpu]' on every worker
#   launch/tpu_vm.sh run    my-slice python -m launch.train --config=configs/tarflow_imagenet64.py \
#       --workdir=gs://BUCKET/run1 --config.data.data_dir=gs://BUCKET/tfds
#   launch/tpu_vm.sh delete my-slice
#
# Plan first, on any machine: python -m launch.compile --config=... --topology=$ACCELERATOR.
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

RUNTIMES=(  # the TPU VM base image of each generation
  "v4=tpu-ubuntu2204-base" "v5p=v2-alpha-tpuv5" "v5litepod=v2-alpha-tpuv5-lite"
  "v5e=v2-alpha-tpuv5-lite" "v6e=v2-alpha-tpuv6e")
REMOTE_DIR="starflow2_jax"  # in the home directory of every worker

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

[[ $# -ge 2 ]] || usage
action=$1; name=$2; shift 2
: "${ZONE:?set ZONE (e.g. us-east5-a)}"
common=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && common+=(--project="$PROJECT")

runtime() {
  local gen=${ACCELERATOR%%-*}
  for entry in "${RUNTIMES[@]}"; do
    [[ ${entry%%=*} == "$gen" ]] && { echo "${RUNTIME:-${entry#*=}}"; return; }
  done
  echo "unknown accelerator generation '$gen' in ACCELERATOR=$ACCELERATOR; set RUNTIME" >&2; exit 2
}

case $action in
  create|queue)
    : "${ACCELERATOR:?set ACCELERATOR (e.g. v5p-64)}"
    spot=(); [[ "${SPOT:-0}" == 1 ]] && spot=(--spot)
    if [[ $action == create ]]; then
      run gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type="$ACCELERATOR" \
        --version="$(runtime)" "${spot[@]}"
    else
      run gcloud compute tpus queued-resources create "$name" "${common[@]}" --node-id="$name" \
        --accelerator-type="$ACCELERATOR" --runtime-version="$(runtime)" "${spot[@]}"
    fi ;;
  status)
    run gcloud compute tpus tpu-vm describe "$name" "${common[@]}" --format="value(state,health)" ;;
  copy)
    root=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
    archive=$(mktemp -t starflow2_jax.XXXXXX.tgz)
    (cd "$root" && git ls-files -z | tar --null -czf "$archive" -T -)
    run gcloud compute tpus tpu-vm scp "$archive" "$name:starflow2_jax.tgz" "${common[@]}" --worker=all
    run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all \
      --command="mkdir -p ~/$REMOTE_DIR && tar -xzf ~/starflow2_jax.tgz -C ~/$REMOTE_DIR"
    rm -f "$archive" ;;
  setup)
    run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all \
      --command="cd ~/$REMOTE_DIR && python3 -m pip install -U pip && python3 -m pip install -e '.[tpu]'" ;;
  run)
    [[ $# -ge 1 ]] || usage
    cmd=$(printf '%q ' "$@")
    run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all \
      --command="cd ~/$REMOTE_DIR && $cmd" ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet ;;
  *) usage ;;
esac
