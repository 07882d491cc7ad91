import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Keep tests from touching the repository's caches, folds, runs and submissions: each pytest process
# (the xdist controller and every worker) makes its own folders. A process that a test starts with
# multiprocessing (test_ddp's ranks) imports this file too: it keeps the folders of the pytest process
# it came from, inherited through the environment, and makes none (it would never remove them).
_TMP = None
_ME = os.environ.get("PYTEST_XDIST_WORKER", "main")
if os.environ.get("TGS_TESTS_TMP_OF") != _ME:
    _TMP = Path(tempfile.mkdtemp(prefix="tgs-tests-"))
    os.environ["TGS_TESTS_TMP_OF"] = _ME
    for _name in ("CACHE", "FOLDS", "RUNS", "SUBMISSIONS"):
        os.environ[f"TGS_{_name}_DIR"] = str(_TMP / _name.lower())
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # run_tests.sh runs one pytest worker per core (pytest-xdist): one torch thread each, or the
    # in-process trainings of two workers would fight over the same cores (the whole suite on a 2-core
    # AVX2 host: 610 s with two threads per worker, 519 s with one)
    import torch

    torch.set_num_threads(1)
    # ... and one OpenMP thread in every process a worker starts (CLI runs, run_all.sh, spawned ranks),
    # unless a test asks for more (--threads): two tiny CLI trainings side by side on 2 AVX2 cores took
    # 44-57 s at torch's default of 2 threads each against 19-23 s at 1 (three alternating rounds; GOMP
    # threads spin waiting for a partner the other process has taken the core from)
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_unconfigure(config):
    if _TMP is not None:
        shutil.rmtree(_TMP, ignore_errors=True)  # each pytest process (and xdist worker) removes its own


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


def interrupt_when(cmd: list, ready: Path, env: dict | None = None, sig=None, timeout: float = 600):
    """Run ``cmd`` and send it ``sig`` (default SIGINT, what Ctrl-C sends) as soon as ``ready``
    exists: a real interruption of a real process. Returns (returncode, stderr); fails the test
    when the process ends before ``ready`` appears (it could not be interrupted)."""
    import signal
    import time

    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    err = tempfile.TemporaryFile()
    # SIGINT back to its default in the child: a shell's background job (`nohup ./run_tests.sh &`)
    # ignores SIGINT, Python then installs no KeyboardInterrupt handler, and Ctrl-C could not be tested
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=err, env=full_env, cwd=REPO,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t_end = time.time() + timeout
    while not Path(ready).exists():
        if proc.poll() is not None:
            err.seek(0)
            pytest.fail(f"{cmd[:4]} ended (exit {proc.returncode}) before {ready} appeared: "
                        f"{err.read().decode()[-2000:]}")
        if time.time() > t_end:
            proc.kill()
            pytest.fail(f"{ready} did not appear within {timeout} s")
        time.sleep(0.02)
    os.killpg(proc.pid, sig or signal.SIGINT)  # the whole process group, as a terminal's Ctrl-C does
    rc = proc.wait(timeout=120)
    err.seek(0)
    return rc, err.read().decode()


def cli_cmd(*args) -> list:
    return [sys.executable, "-m", "tgs_salt", *map(str, args)]


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
