import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Keep tests from touching the repository's caches, folds, runs and submissions.
_TMP = Path(tempfile.mkdtemp(prefix="tgs-tests-"))
for _name in ("CACHE", "FOLDS", "RUNS", "SUBMISSIONS"):
    os.environ[f"TGS_{_name}_DIR"] = str(_TMP / _name.lower())
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TGS_SHARED_DATA", REPO.parent / "shared" / "tgs-salt"))


def run_cli(*args, env=None, cwd=None):
    """Run ``python -m tgs_salt`` as a user would; return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "tgs_salt", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd or REPO)


@pytest.fixture(scope="session")
def shared_data():
    if not (SHARED / "train.csv").exists():
        pytest.skip(f"real data subset not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic Kaggle-format folder shared by the session (do not modify)."""
    from tgs_salt.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic(out, n_train=60, n_test=20, seed=3)
    return out


@pytest.fixture
def synth_copy(synth_dir, tmp_path):
    """A private copy of the synthetic folder that a test may break."""
    dst = tmp_path / "data"
    shutil.copytree(synth_dir, dst)
    return dst
