#!/usr/bin/env bash
# Sweep every checkpoint of the runs in an eval config over its preference set (see eval_rm.py for the outputs).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: ./run_eval.sh [CONFIG] [GPU] [-- EXTRA_ARGS...]

  CONFIG      eval config YAML (default: training_configs/eval_config_example.yaml)
  GPU         GPU index(es) to use, e.g. 0 or 0,1; sets CUDA_VISIBLE_DEVICES (default: leave it as it is)
  EXTRA_ARGS  config overrides passed to eval_rm.py, e.g. -- --max_eval_samples 200 --force

Examples:
  ./run_eval.sh
  ./run_eval.sh training_configs/eval_config_example7b.yaml 0
  ./run_eval.sh training_configs/eval_config_example7b.yaml 1 -- --force

eval_rm.py writes the run's log to logs/eval_TIMESTAMP.log; the exit code is eval_rm.py's
(1 when a checkpoint could not be evaluated). Python: $PYTHON, else .venv/bin/python, else python.
USAGE
}

config="training_configs/eval_config_example.yaml"
positional=()
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
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
if [[ ${#positional[@]} -eq 2 ]]; then
  if [[ ! "${positional[1]}" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    echo "run_eval.sh: GPU must be an index like 0 or 0,1, got '${positional[1]}'" >&2
    exit 2
  fi
  export CUDA_VISIBLE_DEVICES="${positional[1]}"
fi
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
exec "$python" "$here/eval_rm.py" "$config" "${extra[@]}"
