#!/usr/bin/env bash
# The test command: sets up the environment when needed, then runs pytest (extra args pass through).
# One pytest worker per usable core, at most 4 (pytest-xdist; each worker uses one torch thread): most
# of the suite's time is single-threaded (process start-up, small subprocess trainings). TGS_TEST_WORKERS
# overrides the count (0: everything in this one process); so does a -n in the arguments.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/ensure_env.sh
default_workers() {
  python -c 'import importlib.util, os
n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
print(min(n, 4) if n > 1 and importlib.util.find_spec("xdist") else 0)'
}
workers="${TGS_TEST_WORKERS:-$(default_workers)}"
if [ "$workers" = 0 ]; then
  exec python -m pytest -q "$@"
fi
exec python -m pytest -q -n "$workers" --dist worksteal "$@"
