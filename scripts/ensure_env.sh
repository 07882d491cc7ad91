# Sourced by run_all.sh and run_tests.sh: make sure a Python with requirements.txt is active.
# Uses the active python3 when it already satisfies the pins; otherwise creates .venv once
# (re-installing only when requirements.txt changes) and activates it.
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_req="$_repo/requirements.txt"

_satisfied() {
  "$1" - "$_req" <<'PY' 2>/dev/null
import sys, re
from importlib.metadata import version, PackageNotFoundError
bad = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, want = re.split(r"==", line)
    try:
        if version(name) != want:
            bad.append(line)
    except PackageNotFoundError:
        bad.append(line)
sys.exit(1 if bad or sys.version_info < (3, 10) else 0)
PY
}

if [ -n "${TGS_SKIP_ENV:-}" ]; then
  :
elif _satisfied python3; then
  :
else
  _venv="$_repo/.venv"
  _stamp="$_venv/.requirements.sha1"
  _want="$(sha1sum "$_req" | cut -d' ' -f1)"
  if [ ! -x "$_venv/bin/python" ] || [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    echo "[setup] installing requirements into $_venv (once; torch is large, a few minutes)" >&2
    python3 -m venv "$_venv"
    "$_venv/bin/python" -m pip install -q --upgrade pip >&2
    "$_venv/bin/python" -m pip install -q -r "$_req" >&2
    echo "$_want" > "$_stamp"
  fi
  # shellcheck disable=SC1091
  . "$_venv/bin/activate"
fi
export PYTHONPATH="$_repo/src${PYTHONPATH:+:$PYTHONPATH}"
export NO_ALBUMENTATIONS_UPDATE=1
