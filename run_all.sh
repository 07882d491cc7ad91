#!/usr/bin/env bash
# The main job: set-up, then `python -m tgs_salt run` (data -> folds -> train every fold -> CV
# report -> predict -> submission [-> submit]). Every option is passed through:
#
#   ./run_all.sh [--config C] [--data-dir D] [--run-dir R] [--folds 0,1,...] [--force]
#                [--device auto|cpu|cuda] [--gpus-per-fold G] [--time-budget MINUTES]
#                [--set KEY=VALUE ...] [--submit -m MSG] [--synth-size N,M]
#
# With no Kaggle data in D (default data/, or $TGS_DATA_DIR) and no Kaggle credentials, it runs the
# synthetic demo. --time-budget (default: the config's train.time_budget_minutes) plans the epochs so
# that everything after set-up ends within MINUTES. The last line printed is the submission's path.
set -euo pipefail
cd "$(dirname "$0")"

# 1. set-up: a Python with the pinned requirements (creates .venv once when needed)
. scripts/ensure_env.sh
# the time budget counts from here (after set-up)
export TGS_JOB_START="${TGS_JOB_START:-$(date +%s)}"
# 2. everything else, in Python
exec python -m tgs_salt run "$@"
