#!/usr/bin/env bash
# The test command: sets up the environment when needed, then runs pytest (extra args pass through).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/ensure_env.sh
exec python -m pytest -q "$@"
