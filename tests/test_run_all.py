"""./run_all.sh end to end on tiny synthetic data in a temporary directory."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from helpers import tiny_config
from tgs_salt.submission import validate_submission


def run_all(tmp_path, *args, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(extra_env or {})
    env["KAGGLE_CONFIG_DIR"] = str(tmp_path / "no-kaggle")
    for name in ("RUNS", "SUBMISSIONS", "FOLDS", "CACHE"):
        env[f"TGS_{name}_DIR"] = str(tmp_path / name.lower())
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return subprocess.run([str(REPO / "run_all.sh"), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runall")
    cfg = tiny_config(tmp, train={"stages": [{"loss": "bce_dice", "epochs": 1}], "max_train_batches": 3})
    r = run_all(tmp, "--config", cfg, "--data-dir", tmp / "data", "--synth-size", "40,12", "--device", "cpu")
    return tmp, cfg, r


def test_end_to_end_on_synthetic_demo(first_run):
    tmp, cfg, r = first_run
    assert r.returncode == 0, r.stderr[-4000:]
    assert "SYNTHETIC DEMO" in r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-2].startswith("CV score:")
    sub = Path(lines[-1])
    assert sub.parent == tmp / "submissions" and sub.exists()
    v = validate_submission(sub, tmp / "data" / "synthetic" / "sample_submission.csv")
    assert v.ok and v.rows == 12
    logs = tmp / "runs" / "tiny" / "logs"
    for stage in ("synth", "folds", "train", "cv", "predict"):
        assert (logs / f"{stage}.log").exists(), stage


def test_second_run_skips_completed_folds_and_retrains_one(first_run):
    tmp, cfg, _ = first_run
    run_dir = tmp / "runs" / "tiny"
    stamps = {k: (run_dir / f"fold{k}" / "best.pt").stat().st_mtime_ns for k in (0, 1)}
    r = run_all(tmp, "--config", cfg, "--data-dir", tmp / "data", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("skipped") + r.stderr.count("skipped") >= 2
    assert all((run_dir / f"fold{k}" / "best.pt").stat().st_mtime_ns == s for k, s in stamps.items())
    # fold-level retraining: fold 1 again, CV and submission rebuilt from both folds on disk
    r = run_all(tmp, "--config", cfg, "--data-dir", tmp / "data", "--device", "cpu", "--folds", "1", "--force")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "fold0" / "best.pt").stat().st_mtime_ns == stamps[0]
    assert (run_dir / "fold1" / "best.pt").stat().st_mtime_ns != stamps[1]
    assert "folds [0, 1]" in r.stdout


def test_broken_stage_is_named(first_run, tmp_path):
    tmp, _, _ = first_run
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntrain: {batch_sise: 3}\n")
    r = run_all(tmp, "--config", bad, "--data-dir", tmp / "data", "--device", "cpu")
    assert r.returncode != 0
    assert "stage 'config' failed" in r.stderr and "batch_sise" in r.stderr
    assert "see " in r.stderr and "Traceback" not in r.stderr
    r = run_all(tmp, "--config", tmp / "tiny.yaml", "--data-dir", tmp / "data", "--folds", "7")
    assert r.returncode != 0 and "stage 'config' failed" in r.stderr and "out of range" in r.stderr


def test_bad_option(tmp_path):
    r = run_all(tmp_path, "--bogus")
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr
    r = run_all(tmp_path, "--help")
    assert r.returncode == 0 and "--time-budget" in r.stdout and "--set" in r.stdout


@pytest.mark.parametrize("gpus_per_fold", [1, 2])
def test_parallel_folds_orchestration(first_run, tmp_path, gpus_per_fold):
    """Two 'GPUs' (TGS_GPUS; on this CPU machine each slot is a CPU process): with one GPU per fold,
    folds 0 and 1 train at the same time; with two per fold, each fold is a torchrun group of 2.
    The inherited CUDA_VISIBLE_DEVICES=4,5 is respected: the slots get devices 4 and 5, not 0 and 1."""
    tmp, cfg, _ = first_run
    r = run_all(tmp, "--config", cfg, "--data-dir", tmp / "data", "--run-dir", tmp_path / "run",
                "--gpus-per-fold", gpus_per_fold,
                extra_env={"TGS_GPUS": "2", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "4,5"})
    assert r.returncode == 0, r.stderr[-4000:]
    slots = 2 // gpus_per_fold
    assert f"{slots} fold(s) at a time" in r.stderr
    if gpus_per_fold == 1:
        assert "[train fold 0] GPUs 4," in r.stderr and "[train fold 1] GPUs 5," in r.stderr
    else:
        assert "[train fold 0] GPUs 4,5," in r.stderr and "[train fold 1] GPUs 4,5," in r.stderr
    assert "GPUs 0" not in r.stderr and "GPUs 1" not in r.stderr
    for k in (0, 1):
        log = (tmp_path / "run" / "logs" / f"train_fold{k}.log").read_text()
        assert "done" in log
    import json

    done = [json.loads((tmp_path / "run" / f"fold{k}" / "done.json").read_text()) for k in (0, 1)]
    assert all(d["world_size"] == gpus_per_fold for d in done)
    assert Path(r.stdout.strip().splitlines()[-1]).exists()


def test_cpu_data_parallel_training(first_run, tmp_path):
    """train.cpu_processes 2 on a CPU: the folds train in two gloo processes of one thread each (rank 0
    on the console and in train.log, rank 1 in train_rank1.log); CV and prediction follow as usual."""
    from tgs_salt.hardware import usable_cores

    if usable_cores() < 2:
        pytest.skip("needs 2 cores")
    tmp, cfg, _ = first_run
    r = run_all(tmp, "--config", cfg, "--data-dir", tmp / "data", "--run-dir", tmp_path / "run", "--device", "cpu",
                "--set", "train.cpu_processes=2", "--set", "train.sync_bn=true")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "in 2 processes of " in r.stderr and "fold 1 done" in r.stderr
    assert re.search(r"train.sync_bn: [1-9]\d* BatchNorm layers normalise over the 2 processes", r.stderr)
    import json

    done = [json.loads((tmp_path / "run" / f"fold{k}" / "done.json").read_text()) for k in (0, 1)]
    assert all(d["world_size"] == 2 and len(set(d["weights_sha1_per_rank"])) == 1 for d in done)  # in step
    logs = tmp_path / "run" / "logs"
    assert "fold 1 done" in (logs / "train.log").read_text() and (logs / "train_rank1.log").exists()
    assert Path(r.stdout.strip().splitlines()[-1]).exists()
    # a global batch the processes cannot share is refused before anything starts
    r = run_all(tmp, "--config", cfg, "--data-dir", tmp / "data", "--run-dir", tmp_path / "run2", "--device", "cpu",
                "--set", "train.cpu_processes=2", "--set", "train.batch_size=5")
    assert r.returncode != 0 and "not divisible by the 2 training processes" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run2" / "fold0").exists()


# ----------------------------------------------------------------------------- in process

def test_cpu_processes_choice(monkeypatch):
    import os

    from tgs_salt.config import load_config
    from tgs_salt.errors import UserError
    from tgs_salt.pipeline import cpu_processes

    cfg = load_config("cpu_budget", ["train.cpu_processes=2"])
    assert cpu_processes(cfg, "cpu", cores=2) == (2, 1)
    assert cpu_processes(cfg, "cpu", cores=8) == (2, 4)
    assert cpu_processes(cfg, "cpu", cores=1) == (1, 0)     # one core: the usual single process
    assert cpu_processes(cfg, "cuda", cores=8) == (1, 0)    # GPUs have their own slots
    cfg["train"]["cpu_processes"] = 3
    with pytest.raises(UserError, match="batch_size 32 is not divisible by the 3 training processes"):
        cpu_processes(cfg, "cpu", cores=4)
    # the cores counted are the ones this process may run on (a container's affinity), not the host's
    cfg["train"]["cpu_processes"] = 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert cpu_processes(cfg, "cpu") == (1, 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert cpu_processes(cfg, "cpu") == (2, 2)


class _FakeRank:
    """A training rank for pipeline.train_on_cpu_ranks without a process: a subclass sets ``code`` and ``poll``."""
    code = None

    def wait(self):
        import time

        deadline = time.time() + 20
        while self.poll() is None:  # runs until it exits or is stopped
            assert time.time() < deadline, "rank 0 was never stopped"
            time.sleep(0.05)
        return self.code

    def terminate(self):
        self.code = -15


@pytest.mark.parametrize("rank1_code", [1, -6])  # -6: a rank aborted by a signal of its own (seen at gloo's exit)
def test_a_failing_rank_stops_the_others(monkeypatch, tmp_path, capsys, rank1_code):
    """Rank 1 fails at once: rank 0, which would wait for it forever, is stopped, and the error names
    rank 1 and its log rather than the rank that was stopped."""
    import io

    from tgs_salt import pipeline

    started = []

    class FakeProc(_FakeRank):
        def __init__(self, cmd, stdout=None, stderr=None, env=None, **kw):
            self.rank = int(env["RANK"])
            assert env["WORLD_SIZE"] == "2" and env["OMP_NUM_THREADS"] == "1" and cmd[-2:] == ["--threads", "1"]
            self.code = rank1_code if self.rank == 1 else None
            self.stdout = io.StringIO("rank 0 says hello\n") if self.rank == 0 else None
            started.append(self)

        def poll(self):
            return self.code

    monkeypatch.setattr(pipeline.subprocess, "Popen", FakeProc)
    with pytest.raises(pipeline.UserError, match=rf"rank 1 exited with {rank1_code} \(see .*train_rank1.log\)"):
        pipeline.train_on_cpu_ranks(2, 1, ["--config", "x"], tmp_path / "train.log")
    assert started[0].code == -15
    assert "rank 0 says hello" in capsys.readouterr().err and "hello" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("rank0_exits", [True, False])
def test_a_rank_dying_in_teardown_after_its_work_is_not_a_failure(monkeypatch, tmp_path, caplog, rank0_exits):
    """Rank 1 marks its work done and dies by SIGABRT (gloo's teardown, seen once in CI): rank 0, past its
    last collective too, is not stopped at once but given the grace period to mark its own work done and
    exit (or is stopped after it); the training stands, with a warning naming rank 1. A rank that dies
    before marking its work done is still a failure (test_a_failing_rank_stops_the_others)."""
    import io
    import logging
    import time

    from tgs_salt import pipeline
    from tgs_salt.pipeline import FINISHED_DIR_ENV, finished_mark

    started = []

    class FakeProc(_FakeRank):
        def __init__(self, cmd, stdout=None, stderr=None, env=None, **kw):
            self.rank, self.marks, self.t0 = int(env["RANK"]), env[FINISHED_DIR_ENV], time.monotonic()
            self.code = None
            self.stdout = io.StringIO("rank 0 says hello\n") if self.rank == 0 else None
            if self.rank == 1:
                open(finished_mark(self.marks, 1), "w").close()
                self.code = -6
            started.append(self)

        def poll(self):
            if self.rank == 0 and self.code is None and time.monotonic() - self.t0 > 1.0:
                open(finished_mark(self.marks, 0), "w").close()  # marks its work done a second later
                if rank0_exits:
                    self.code = 0
            return self.code

    monkeypatch.setattr(pipeline.subprocess, "Popen", FakeProc)
    with caplog.at_level(logging.WARNING, logger="tgs_salt.run"):
        pipeline.train_on_cpu_ranks(2, 1, ["--config", "x"], tmp_path / "train.log", teardown_grace_s=2.0)
    assert started[0].code == (0 if rank0_exits else -15)
    assert "rank 1 exited with -6 after its work was done" in caplog.text and "train_rank1.log" in caplog.text
    assert ("rank 0 exited" in caplog.text) is (not rank0_exits)
    assert not os.path.exists(started[0].marks)  # the marks are cleaned up


def test_gpu_slots_respect_visible_devices(monkeypatch):
    from tgs_salt.errors import UserError
    from tgs_salt.pipeline import gpu_slots

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_slots(4, 1) == ["0", "1", "2", "3"] and gpu_slots(4, 2) == ["0,1", "2,3"] and gpu_slots(3, 2) == ["0,1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7,4")
    assert gpu_slots(3, 1) == ["6", "7", "4"]
    with pytest.raises(UserError, match="fewer than 4"):
        gpu_slots(4, 1)
    with pytest.raises(UserError, match="--gpus-per-fold 4 but 3"):
        gpu_slots(3, 4)


def test_queue_gives_the_next_fold_to_the_first_free_gpu(monkeypatch, tmp_path, capsys):
    """Fold 0 is slow: while slot 0 trains it, slot 1 takes folds 1, 2 and 3 one after another
    (waves would have made fold 2 wait for fold 0)."""
    import json
    import threading
    import time

    from tgs_salt import pipeline

    took = {0: 1.5, 1: 0.1, 2: 0.1, 3: 0.1}
    ran, lock = [], threading.Lock()

    def fake_call(cmd, stdout, stderr, env):
        fold = int(cmd[cmd.index("--fold") + 1])
        with lock:
            ran.append((env["CUDA_VISIBLE_DEVICES"], fold, time.time()))
        time.sleep(took[fold])
        d = tmp_path / f"fold{fold}"
        d.mkdir(exist_ok=True)
        (d / "done.json").write_text(json.dumps({"best_metric": 0.5, "best_epoch": 1, "oof_metric_tta": 0.5,
                                                 "epochs_run": 2, "seconds": 60}))
        return 0

    monkeypatch.setattr(pipeline.subprocess, "call", fake_call)
    pipeline.train_queue([0, 1, 2, 3], ["a", "b"], ["--config", "x"], tmp_path, tmp_path, 1)
    by_slot = {s: [f for s2, f, _ in ran if s2 == s] for s in ("a", "b")}
    assert by_slot == {"a": [0], "b": [1, 2, 3]}
    err = capsys.readouterr().err
    assert err.count("done: best metric 0.5000") == 4 and "[train fold 3] GPUs b" in err
    # a failing fold is named with its log, and no new fold starts after it
    monkeypatch.setattr(pipeline.subprocess, "call", lambda cmd, **kw: 3)
    with pytest.raises(pipeline.UserError, match=r"fold 0 \(exit 3; see .*train_fold0.log"):
        pipeline.train_queue([0, 1, 2], ["a"], [], tmp_path, tmp_path, 1)


def test_run_refuses_submit_without_message_in_process(tmp_path, capsys):
    from tgs_salt.cli import main

    assert main(["run", "--submit", "--data-dir", str(tmp_path)]) == 2
    assert "--submit needs a message" in capsys.readouterr().err


def test_stage_logs_move_to_the_run_directory_and_leave_no_empty_folder(tmp_path, monkeypatch):
    """Logs written before the run directory is known (in runs/logs/job-<pid>, one folder per job, so
    that two jobs started at once do not share a config.log) move into it; the provisional folder goes
    with them unless something else is in it (it used to stay behind, empty, whatever --run-dir was)."""
    import logging

    from tgs_salt.pipeline import Stages

    monkeypatch.setattr("os.getpid", lambda: 111)
    stages = Stages.provisional(tmp_path / "runs")
    monkeypatch.setattr("os.getpid", lambda: 222)
    other = Stages.provisional(tmp_path / "runs")  # another job started in this checkout meanwhile
    with stages("config"):
        logging.getLogger("tgs_salt.test").warning("written before the run directory was known")
    with other("config"):
        logging.getLogger("tgs_salt.test").warning("the other job's config")
    assert stages.log_dir != other.log_dir  # a shared folder would mix the two config.log files
    stages.move_to(tmp_path / "elsewhere" / "logs")
    moved = (tmp_path / "elsewhere" / "logs" / "config.log").read_text()
    assert "written before" in moved and "the other job's" not in moved
    assert (other.log_dir / "config.log").exists()  # the other job's log stays where it is
    other.move_to(tmp_path / "run1" / "logs")
    assert not (tmp_path / "runs" / "logs").exists()  # the last job out tidies the folder away
    kept = tmp_path / "kept"
    stages = Stages(kept)
    (kept / "notes.txt").write_text("not a log")
    stages.move_to(tmp_path / "run2" / "logs")
    assert (kept / "notes.txt").exists()
