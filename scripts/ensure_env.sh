# Sourced by run_all.sh and run_tests.sh: make sure a Python with requirements.txt is active.
# Uses the active python3 when it already satisfies the pins; otherwise creates .venv once
# (re-installing only when requirements.txt or TGS_TORCH changes) and activates it.
#
# TGS_TORCH picks the torch build (README, "GPUs"):
#   pypi    (default) torch 2.14.0 from PyPI: CUDA 13, GPUs sm_75+ (T4, A100, H100...), driver >= 580; runs on CPU
#   cu126   the same release built for CUDA 12.6 from download.pytorch.org: Pascal P100, Volta V100, T4, A100
#           (no Hopper kernels), driver >= 525
#   system  keep the torch and torchvision already installed (Kaggle and Colab images); the venv sees them
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_req="$_repo/requirements.txt"
_torch_build="${TGS_TORCH:-pypi}"
case "$_torch_build" in
  pypi|cu126|system) ;;
  *) echo "TGS_TORCH=$_torch_build: use pypi, cu126 or system" >&2; return 2 2>/dev/null || exit 2 ;;
esac

_satisfied() {
  "$1" - "$_req" <<'PY' 2>/dev/null
import os, sys, re
from importlib.metadata import version, PackageNotFoundError
build = os.environ.get("TGS_TORCH", "pypi")
bad = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, want = re.split(r"==", line)
    try:
        have = version(name)
        if name in ("torch", "torchvision"):
            if build == "system":
                continue  # any installed build
            local = have.partition("+")[2]
            if have.partition("+")[0] != want or (build == "cu126") != (local == "cu126"):
                bad.append(line)
        elif have != want:
            bad.append(line)
    except PackageNotFoundError:
        bad.append(line)
sys.exit(1 if bad or sys.version_info < (3, 10) else 0)
PY
}

# the pip commands that install requirements.txt for the chosen torch build (printed by the tests)
_install_cmds() {
  local py="$1"
  case "$_torch_build" in
    pypi)   echo "$py -m pip install -q -r $_req" ;;
    cu126)  echo "$py -m pip install -q $(grep -E '^(torch|torchvision)==' "$_req" | tr '\n' ' ')--index-url https://download.pytorch.org/whl/cu126"
            echo "$py -m pip install -q -r $_req --extra-index-url https://download.pytorch.org/whl/cu126" ;;
    system) echo "$py -m pip install -q $(grep -vE '^(torch|torchvision)==|^#|^$' "$_req" | sed 's/#.*//' | tr '\n' ' ')" ;;
  esac
}

if [ -n "${TGS_SKIP_ENV:-}" ]; then
  :
elif _satisfied python3; then
  :
else
  _venv="$_repo/.venv"
  _stamp="$_venv/.requirements.sha1"
  _want="$(cat "$_req" | sha1sum | cut -d' ' -f1)-$_torch_build"
  if [ -n "${TGS_ENV_DRY_RUN:-}" ]; then  # print what would be installed, install nothing
    _install_cmds "$_venv/bin/python"; return 0 2>/dev/null || exit 0
  fi
  if [ ! -x "$_venv/bin/python" ] || [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    echo "[setup] installing requirements into $_venv (torch build: $_torch_build; once; torch is large, a few minutes)" >&2
    if [ "$_torch_build" = system ]; then
      python3 -m venv --system-site-packages "$_venv"
    else
      python3 -m venv "$_venv"
    fi
    "$_venv/bin/python" -m pip install -q --upgrade pip >&2
    while read -r _cmd; do eval "$_cmd" >&2; done < <(_install_cmds "$_venv/bin/python")
    echo "$_want" > "$_stamp"
  fi
  # shellcheck disable=SC1091
  . "$_venv/bin/activate"
fi
export PYTHONPATH="$_repo/src${PYTHONPATH:+:$PYTHONPATH}"
export NO_ALBUMENTATIONS_UPDATE=1
