#!/usr/bin/env bash
# Launch train_rm.py on several GPUs (or CPU processes) with torchrun; tee everything to logs/train_TIMESTAMP.log.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: ./run_distributed.sh [options] --config FILE [-- EXTRA_ARGS...]

Runs `torchrun ... train_rm.py FILE EXTRA_ARGS` from the repository root and tees the output of every process
to logs/train_TIMESTAMP.log. Exits with the training's exit code.

Options:
  --config FILE        training config, YAML or JSON (required), e.g. training_configs/7b_config.yaml
  --gpus N             processes (GPUs) per node (default: 8)
  --port PORT          rendezvous port on the master node (default: 29500)
  --nnodes N           number of machines (default: 1)
  --node-rank R        this machine's rank, 0 .. nnodes-1 (default: 0)
  --master-addr ADDR   address of the node with rank 0 (required when --nnodes > 1)
  --log-dir DIR        where the launcher log goes (default: logs/ in the repository)
  -h, --help           show this help
  -- EXTRA_ARGS        passed to train_rm.py as config overrides, e.g. -- --learning_rate 5e-6 --num_train_epochs 5

Examples:
  ./run_distributed.sh --gpus 8 --config training_configs/7b_config.yaml
  ./run_distributed.sh --gpus 4 --port 29501 --config training_configs/qwen3b_config_balance_irrelevant.yaml
  ./run_distributed.sh --gpus 8 --config training_configs/7b_config.yaml -- --learning_rate 5e-6 --num_train_epochs 5
  # two machines, 8 GPUs each: run on both, with --node-rank 0 and 1
  ./run_distributed.sh --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --gpus 8 \
      --config training_configs/72b_config.yaml

Without a CUDA GPU, --gpus N starts N CPU processes on the gloo backend (ACCELERATE_USE_CPU=true,
DS_ACCELERATOR=cpu), so the same command runs on a laptop:
  ./run_distributed.sh --gpus 2 --config training_configs/tiny_demo.yaml -- --max_steps 20

Paths in the config and in EXTRA_ARGS are relative to the repository root (the script runs from there).

Environment:
  PYTHON        Python used to count GPUs (default: .venv/bin/python, else python3)
  TORCHRUN      torchrun executable (default: .venv/bin/torchrun, else torchrun on PATH)
  TRAIN_SCRIPT  script torchrun starts (default: train_rm.py)
EOF
}

die() {
    echo "run_distributed.sh: error: $*" >&2
    echo "Run ./run_distributed.sh --help for usage." >&2
    exit 2
}

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

need_value() {
    [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
}

GPUS=8
PORT=29500
NNODES=1
NODE_RANK=0
MASTER_ADDR=""
CONFIG=""
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_DIR="$REPO/logs"
EXTRA_ARGS=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --gpus) need_value "$@"; GPUS="$2"; shift 2 ;;
        --port) need_value "$@"; PORT="$2"; shift 2 ;;
        --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
        --nnodes) need_value "$@"; NNODES="$2"; shift 2 ;;
        --node-rank) need_value "$@"; NODE_RANK="$2"; shift 2 ;;
        --master-addr) need_value "$@"; MASTER_ADDR="$2"; shift 2 ;;
        --log-dir) need_value "$@"; LOG_DIR="$2"; shift 2 ;;
        --) shift; EXTRA_ARGS=("$@"); break ;;
        *) die "unknown argument: $1 (arguments for train_rm.py go after --)" ;;
    esac
done

[[ -n "$CONFIG" ]] || die "--config FILE is required"
[[ -f "$CONFIG" ]] || die "config file not found: $CONFIG"
case "$CONFIG" in
    *.yaml | *.yml | *.json) ;;
    *) die "config must be a .yaml, .yml or .json file: $CONFIG" ;;
esac
is_int "$GPUS" && ((GPUS >= 1)) || die "--gpus must be a positive integer, got '$GPUS'"
is_int "$PORT" && ((PORT >= 1 && PORT <= 65535)) || die "--port must be a port number, got '$PORT'"
is_int "$NNODES" && ((NNODES >= 1)) || die "--nnodes must be a positive integer, got '$NNODES'"
is_int "$NODE_RANK" && ((NODE_RANK < NNODES)) || die "--node-rank must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
if ((NNODES > 1)); then
    [[ -n "$MASTER_ADDR" ]] || die "--master-addr is required with --nnodes $NNODES (the address of node 0)"
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"

# Paths given by the caller are taken relative to where it was called from; the run itself starts at the repo root.
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
mkdir -p "$LOG_DIR"
LOG_DIR="$(cd "$LOG_DIR" && pwd)"
cd "$REPO"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${TORCHRUN:-}" ]]; then
    if [[ -x .venv/bin/torchrun ]]; then TORCHRUN=.venv/bin/torchrun; else TORCHRUN=torchrun; fi
fi
TRAIN_SCRIPT="${TRAIN_SCRIPT:-train_rm.py}"
command -v "$TORCHRUN" >/dev/null || die "torchrun not found ($TORCHRUN): run \`make setup\` or set TORCHRUN"
[[ -f "$TRAIN_SCRIPT" ]] || die "training script not found: $TRAIN_SCRIPT"

NUM_CUDA="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null)" ||
    die "could not import torch with $PYTHON: run \`make setup\` or set PYTHON"
is_int "$NUM_CUDA" || die "could not count the GPUs with $PYTHON (it printed '$NUM_CUDA')"
if ((NUM_CUDA == 0)); then
    # transformers reads ACCELERATE_USE_CPU like `use_cpu: true`: accelerate then starts gloo itself. Without it,
    # N CPU processes would each train alone (world size 1) on the same output_dir.
    export ACCELERATE_USE_CPU=true
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
    # One share of the cores per process, instead of every process using all of them.
    CORES="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((CORES / GPUS > 0 ? CORES / GPUS : 1))}"
    DEVICE="CPU processes (gloo)"
    # transformers sets DeepSpeed up only on GPUs; on CPU the Trainer would quietly fall back to DDP (ZeRO-3 then
    # crashes in the first forward). tests/distributed_driver.py shows how the CPU tests start it instead.
    if [[ "$TRAIN_SCRIPT" == train_rm.py ]] &&
        { printf '%s\n' "${EXTRA_ARGS[@]}" | grep -Eq '^--deepspeed(=|$)' || grep -Eq '^"?deepspeed"?:' "$CONFIG" ||
            grep -Eq '"deepspeed"[[:space:]]*:' "$CONFIG"; }; then
        die "DeepSpeed needs CUDA GPUs with train_rm.py and none is visible: drop \`deepspeed\` to train with DDP here"
    fi
elif ((NUM_CUDA < GPUS)); then
    die "--gpus $GPUS but only $NUM_CUDA CUDA device(s) are visible on this node"
else
    DEVICE="GPUs"
fi

LOG_FILE="$LOG_DIR/train_$(date +%Y%m%d_%H%M%S).log"
SUFFIX=1
while [[ -e "$LOG_FILE" ]]; do
    LOG_FILE="$LOG_DIR/train_$(date +%Y%m%d_%H%M%S)_$SUFFIX.log"
    SUFFIX=$((SUFFIX + 1))
done

COMMAND=(
    "$TORCHRUN"
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS"
    --master_addr "$MASTER_ADDR" --master_port "$PORT"
    "$TRAIN_SCRIPT" "$CONFIG" "${EXTRA_ARGS[@]}"
)
{
    echo "run_distributed.sh: $((NNODES * GPUS)) processes ($NNODES node(s) x $GPUS $DEVICE), node rank $NODE_RANK"
    echo "run_distributed.sh: ${COMMAND[*]}"
} | tee "$LOG_FILE"

set +e
"${COMMAND[@]}" 2>&1 | tee -a "$LOG_FILE"
STATUS=${PIPESTATUS[0]}
set -e

if ((STATUS == 0)); then
    echo "run_distributed.sh: training finished; log: $LOG_FILE" | tee -a "$LOG_FILE"
else
    echo "run_distributed.sh: training failed with exit code $STATUS; log: $LOG_FILE" | tee -a "$LOG_FILE" >&2
fi
exit "$STATUS"
