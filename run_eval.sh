#!/usr/bin/env bash
# Sweep every checkpoint of the runs in an eval config over its preference sets (see eval_rm.py for the outputs),
# in one process or, with several GPUs, one process per replica under torchrun.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: ./run_eval.sh [CONFIG] [GPU] [--nproc N] [-- EXTRA_ARGS...]

  CONFIG      eval config YAML (default: training_configs/eval_config_example.yaml)
  GPU         GPU index(es), e.g. 0 or 0,1,2,3; sets CUDA_VISIBLE_DEVICES. With several, the sweep runs under
              torchrun with one process per gpus_per_process GPUs (a config key, default 1): each process scores a
              shard of every (checkpoint, dataset) with its own replica, and rank 0 writes the outputs, exactly as
              one process writes them
  --nproc N   processes without GPUs (CPU processes on gloo), e.g. --nproc 2 on a laptop; with GPU it must agree
  EXTRA_ARGS  config overrides passed to eval_rm.py, e.g. -- --max_eval_samples 200 --force

Examples:
  ./run_eval.sh
  ./run_eval.sh training_configs/eval_config_example7b.yaml 0
  ./run_eval.sh training_configs/eval_config_example7b.yaml 0,1,2,3,4,5,6,7          # 8 processes, 1 GPU each
  ./run_eval.sh training_configs/eval_config_72b.yaml 0,1,2,3,4,5,6,7 -- --gpus_per_process 4   # 2 replicas of 4
  ./run_eval.sh training_configs/eval_config_example.yaml --nproc 2                  # 2 CPU processes

eval_rm.py writes the run's log to logs/eval_TIMESTAMP.log; the exit code is eval_rm.py's (1 when a checkpoint
could not be evaluated). Python: $PYTHON, else .venv/bin/python, else python; torchrun: $TORCHRUN, else the one
beside that Python.
USAGE
}

config="training_configs/eval_config_example.yaml"
positional=()
extra=()
nproc=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nproc) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "run_eval.sh: --nproc needs a positive number" >&2; exit 2; }
             nproc="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -*) echo "run_eval.sh: unknown option $1 (config overrides go after --)" >&2; usage >&2; exit 2 ;;
    *) positional+=("$1"); shift ;;
  esac
done
if [[ ${#positional[@]} -gt 2 ]]; then
  echo "run_eval.sh: expected at most CONFIG and GPU, got: ${positional[*]}" >&2
  exit 2
fi
[[ ${#positional[@]} -ge 1 ]] && config="${positional[0]}"
if [[ ! -f "$config" ]]; then
  echo "run_eval.sh: config not found: $config" >&2
  exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python="python"; fi
fi
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

if [[ ${#positional[@]} -eq 2 ]]; then
  if [[ ! "${positional[1]}" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    echo "run_eval.sh: GPU must be an index like 0 or a list like 0,1,2,3, got '${positional[1]}'" >&2
    exit 2
  fi
  export CUDA_VISIBLE_DEVICES="${positional[1]}"
  IFS=, read -r -a gpus <<< "${positional[1]}"
  # gpus_per_process as the sweep will read it (the config file, then the overrides after --)
  per_process="$("$python" - "$config" "${extra[@]}" <<'PY'
import sys
from vlrm.train.config import EvalConfig
from vlrm.train.config_files import load_config
print(load_config(EvalConfig, sys.argv[1], sys.argv[2:]).gpus_per_process)
PY
)" || { echo "run_eval.sh: $config does not load (run eval_rm.py on it for the reason)" >&2; exit 2; }
  if (( ${#gpus[@]} % per_process != 0 )); then
    echo "run_eval.sh: ${#gpus[@]} GPUs do not divide into replicas of gpus_per_process=$per_process" >&2
    exit 2
  fi
  replicas=$(( ${#gpus[@]} / per_process ))
  if [[ -n "$nproc" && "$nproc" != "$replicas" ]]; then
    echo "run_eval.sh: --nproc $nproc, but ${#gpus[@]} GPUs with gpus_per_process=$per_process make $replicas" >&2
    exit 2
  fi
  nproc="$replicas"
fi

if [[ -z "$nproc" || "$nproc" == 1 ]]; then
  exec "$python" "$here/eval_rm.py" "$config" "${extra[@]}"
fi
torchrun="${TORCHRUN:-$(dirname "$python")/torchrun}"
command -v "$torchrun" >/dev/null || torchrun=torchrun
if [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  # CPU processes: share the cores between them (torchrun would give each one thread).
  cores="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}"
fi
# --standalone: a rendezvous on a free local port, so two sweeps on one machine never collide.
exec "$torchrun" --standalone --nproc_per_node "$nproc" "$here/eval_rm.py" "$config" "${extra[@]}"
