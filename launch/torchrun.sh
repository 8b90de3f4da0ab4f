#!/usr/bin/env bash
# Launch megatron_mm pretraining on this node:
#   launch/torchrun.sh FILE.yaml [key=value ...]
# Environment: NPROC (default: all visible GPUs, or 1 without CUDA), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON (the repo's .venv python if present),
# DRY_RUN=1 (check the config and its layout for NNODES x NPROC ranks, print the layout, start nothing).
# The config is checked in one process before torchrun starts, so a bad one is a single line
# `error: ...` and exit 2 instead of one per rank followed by torchrun's failure report.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 FILE.yaml [key=value ...]" >&2
  exit 2
fi
config=$1
shift

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $repo/.venv/bin/python ]]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi

# torch's count honours CUDA_VISIBLE_DEVICES; a CPU-only machine trains as one process.
nproc=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')}
nnodes=${NNODES:-1}

check=("$PYTHON" -m megatron_mm.pretrain --config "$config" --dry-run --world-size $((nproc * nnodes)) "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exec "${check[@]}"
fi
"${check[@]}" >/dev/null || exit $?

# python -m torch.distributed.run is torchrun, pinned to the chosen interpreter. It forwards these
# signals to the ranks (SIGUSR1 too: Slurm's --signal), which then save and exit 0; it waits
# SHUTDOWN_TIMEOUT seconds for that save before killing them.
exec "$PYTHON" -m torch.distributed.run \
  --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --shutdown_timeout "${SHUTDOWN_TIMEOUT:-300}" \
  --nproc_per_node "$nproc" \
  --nnodes "$nnodes" \
  --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29500}" \
  -m megatron_mm.pretrain --config "$config" "$@"
