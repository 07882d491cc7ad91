#!/usr/bin/env bash
# The main job: set-up -> data -> folds -> train every fold -> CV report -> predict -> submission [-> submit].
#
#   ./run_all.sh [--config C] [--data-dir D] [--run-dir R] [--folds 0,1,...] [--force]
#                [--device auto|cpu|cuda] [--gpus-per-fold G] [--time-budget MINUTES]
#                [--submit -m MSG] [--synth-size N,M]
#
# With no Kaggle data in D (default data/, or $TGS_DATA_DIR) and no Kaggle credentials, it runs the
# synthetic demo. --time-budget (default: the config's train.time_budget_minutes) plans the epochs so
# that everything after set-up ends within MINUTES. The last line printed is the submission's path.
set -euo pipefail
cd "$(dirname "$0")"

CONFIG="" DATA_DIR="${TGS_DATA_DIR:-data}" RUN_DIR="" FOLDS="" FORCE="" DEVICE="auto" GPUS_PER_FOLD=1
SUBMIT="" MESSAGE="" SYNTH_SIZE="1000,500" BUDGET=""
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --data-dir) DATA_DIR="$2"; shift 2 ;;
    --run-dir) RUN_DIR="$2"; shift 2 ;;
    --folds) FOLDS="$2"; shift 2 ;;
    --force) FORCE="--force"; shift ;;
    --device) DEVICE="$2"; shift 2 ;;
    --gpus-per-fold) GPUS_PER_FOLD="$2"; shift 2 ;;
    --time-budget) BUDGET="$2"; shift 2 ;;
    --submit) SUBMIT=1; shift ;;
    -m|--message) MESSAGE="$2"; shift 2 ;;
    --synth-size) SYNTH_SIZE="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [ -n "$SUBMIT" ] && [ -z "$MESSAGE" ]; then
  echo "run_all: --submit needs a message: --submit -m \"my message\"" >&2; exit 2
fi

# 1. set-up: a Python with the pinned requirements (creates .venv once when needed)
. scripts/ensure_env.sh
PY=python
# the time budget counts from here (after set-up): every stage plans against this start
export TGS_JOB_START="${TGS_JOB_START:-$(date +%s)}"

LOG_DIR="${TGS_RUNS_DIR:-runs}/logs"   # until the run directory is known
mkdir -p "$LOG_DIR"
# stage NAME CMD...: run a stage, its output to the terminal and to <run dir>/logs/NAME.log
stage() {
  local name="$1"; shift
  local log="$LOG_DIR/$name.log"
  echo "== [$name] $*" >&2
  set +e
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "run_all: stage '$name' failed (exit $rc); see $log" >&2
    exit "$rc"
  fi
}

# 2. data: the Kaggle folder, else a download, else the synthetic demo
has_data() { [ -f "$1/train.csv" ] && [ -f "$1/depths.csv" ] && [ -f "$1/sample_submission.csv" ] \
             && [ -d "$1/train/images" ] && [ -d "$1/test/images" ]; }
has_credentials() { $PY -c "from tgs_salt.kaggle_api import has_credentials as h; raise SystemExit(0 if h() else 1)"; }
SYNTHETIC=""
if has_data "$DATA_DIR"; then
  echo "run_all: using the Kaggle data in $DATA_DIR" >&2
elif has_credentials; then
  stage download $PY -m tgs_salt download --data-dir "$DATA_DIR"
else
  SYNTHETIC=1
  DATA_DIR="$DATA_DIR/synthetic"
  cat >&2 <<BANNER
################################################################################
#  NO KAGGLE DATA FOUND: running the SYNTHETIC DEMO (made-up seismic images).   #
#  Its scores say nothing about the competition. For the real thing:            #
#    1. accept the rules at kaggle.com/c/tgs-salt-identification-challenge      #
#    2. put kaggle.json in ~/.kaggle/ (or set KAGGLE_USERNAME and KAGGLE_KEY)   #
#    3. run ./run_all.sh again (it downloads into data/), or --data-dir DIR     #
################################################################################
BANNER
  if ! has_data "$DATA_DIR"; then
    stage synth $PY -m tgs_salt synth "$DATA_DIR" --train "${SYNTH_SIZE%,*}" --test "${SYNTH_SIZE#*,}" --seed 0 --force
  fi
fi

# device_type: cuda or cpu for --device auto; stops (with what to install) when nvidia-smi lists GPUs
# that this torch cannot use, instead of quietly training on the CPU
device_type() {
  "$PY" -c "from tgs_salt.cli import device_type_command as d; raise SystemExit(d('$DEVICE'))" || exit 2
}
if [ -z "$CONFIG" ]; then
  if [ -n "$SYNTHETIC" ]; then CONFIG=demo
  elif [ "$DEVICE" = cuda ] || { [ "$DEVICE" != cpu ] && [ "$(device_type)" = cuda ]; }; then
    CONFIG=competition
  else
    CONFIG=cpu_budget
  fi
fi
# config_get ARGS...: one checked fact of the config; a bad config stops here, named
config_get() {
  "$PY" -m tgs_salt config "$CONFIG" "$@" 2>>"$LOG_DIR/config.log" || {
    echo "run_all: stage 'config' failed; see $LOG_DIR/config.log:" >&2; tail -n 3 "$LOG_DIR/config.log" >&2; exit 1; }
}
NAME="$(config_get --get name)"
RUN_DIR="${RUN_DIR:-${TGS_RUNS_DIR:-runs}/$NAME}"
mkdir -p "$RUN_DIR/logs"
mv "$LOG_DIR"/*.log "$RUN_DIR/logs/" 2>/dev/null || true
LOG_DIR="$RUN_DIR/logs"
echo "run_all: config $CONFIG, data $DATA_DIR, run directory $RUN_DIR" >&2

# 3. folds (a file, made once), then training: completed folds are skipped, interrupted ones resumed
stage folds $PY -m tgs_salt folds --config "$CONFIG" --data-dir "$DATA_DIR"
FOLD_LIST="$(config_get --get folds ${FOLDS:+--folds "$FOLDS"})"
TRAIN_ARGS=(--config "$CONFIG" --data-dir "$DATA_DIR" --run-dir "$RUN_DIR" --resume --device "$DEVICE" $FORCE
            ${BUDGET:+--time-budget "$BUDGET"})

# GPUs to use: all that torch sees, or $TGS_GPUS (fewer; the tests also use it to run the
# parallel-fold orchestration with CPU processes). An inherited CUDA_VISIBLE_DEVICES is respected:
# slot j gets the j-th of the devices it lists.
NGPU=0
if [ "$DEVICE" != cpu ]; then
  NGPU="${TGS_GPUS:-$($PY -c "import torch; print(torch.cuda.device_count())")}"
fi
if [ "$NGPU" -ge 2 ] || [ "$GPUS_PER_FOLD" -gt 1 ]; then
  # several GPUs: folds in parallel, one process (or a torchrun group of G) per slot; each slot
  # trains its share of the folds one after another
  SLOTS=$(( NGPU / GPUS_PER_FOLD )); [ "$SLOTS" -ge 1 ] || { echo "run_all: --gpus-per-fold $GPUS_PER_FOLD but $NGPU GPU(s)" >&2; exit 2; }
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then IFS=',' read -r -a VISIBLE <<< "$CUDA_VISIBLE_DEVICES"
  else VISIBLE=(); for (( g = 0; g < NGPU; g++ )); do VISIBLE+=("$g"); done; fi
  [ "${#VISIBLE[@]}" -ge "$NGPU" ] || { echo "run_all: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES lists fewer than $NGPU GPUs" >&2; exit 2; }
  IFS=',' read -r -a FOLD_ARR <<< "$FOLD_LIST"
  echo "run_all: $NGPU GPUs (${VISIBLE[*]:0:$NGPU}), $GPUS_PER_FOLD per fold, $SLOTS fold(s) at a time" >&2
  # the precision and the time plan are settled once, before the folds start
  stage plan $PY -m tgs_salt train "${TRAIN_ARGS[@]}" --folds "$FOLD_LIST" --plan-only --parallel-folds "$SLOTS"
  pids=()
  for (( j = 0; j < SLOTS && j < ${#FOLD_ARR[@]}; j++ )); do
    devs="$(IFS=,; echo "${VISIBLE[*]:$(( j * GPUS_PER_FOLD )):$GPUS_PER_FOLD}")"
    if [ "$GPUS_PER_FOLD" -gt 1 ]; then
      launcher=(torchrun --standalone --nproc-per-node="$GPUS_PER_FOLD" -m tgs_salt)
    else
      launcher=("$PY" -m tgs_salt)
    fi
    (
      for (( i = j; i < ${#FOLD_ARR[@]}; i += SLOTS )); do
        f="${FOLD_ARR[i]}"
        echo "== [train fold $f] GPUs $devs, log $LOG_DIR/train_fold$f.log" >&2
        CUDA_VISIBLE_DEVICES="$devs" "${launcher[@]}" train "${TRAIN_ARGS[@]}" --fold "$f" \
          > "$LOG_DIR/train_fold$f.log" 2>&1 || { echo "run_all: fold $f failed; see $LOG_DIR/train_fold$f.log" >&2; exit 1; }
        echo "== [train fold $f] done: $(grep -o 'fold [0-9]* done: .*' "$LOG_DIR/train_fold$f.log" | tail -n 1)" >&2
      done
    ) &
    pids+=($!)
  done
  failed=""
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  if [ -n "$failed" ]; then
    echo "run_all: stage 'train' failed; see $LOG_DIR/train_fold*.log" >&2; exit 1
  fi
else
  stage train $PY -m tgs_salt train "${TRAIN_ARGS[@]}" --folds "$FOLD_LIST"
fi

# 4. cross-validation report (tunes threshold and minimum area on OOF), prediction, submission
stage cv $PY -m tgs_salt cv --run-dir "$RUN_DIR" --data-dir "$DATA_DIR"
stage predict $PY -m tgs_salt predict --run-dir "$RUN_DIR" --data-dir "$DATA_DIR" --device "$DEVICE"
SUBMISSION="$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['submission'])" "$RUN_DIR/submission.json")"
if [ -n "$SUBMIT" ]; then
  stage submit $PY -m tgs_salt submit "$SUBMISSION" -m "$MESSAGE" --data-dir "$DATA_DIR"
fi
CV="$(grep '^CV score:' "$LOG_DIR/cv.log" | tail -n 1)"
[ -n "$SYNTHETIC" ] && echo "run_all: (synthetic demo data: scores are not competition scores)" >&2
echo "run_all: done in $(( ($(date +%s) - TGS_JOB_START) / 60 )) min $(( ($(date +%s) - TGS_JOB_START) % 60 )) s after set-up" >&2
echo "$CV"
echo "$SUBMISSION"
