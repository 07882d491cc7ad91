"""The hostile-input corpus: bad data folders, config values and flags, malformed submissions, killed
writers, concurrent trainers and full disks. Each case runs the CLI as a user would (in-process for
speed) and checks the exit code, that the message names the culprit, that no traceback escapes, and
that no partial or stale file is left. The case ids carry the corpus size (``NN-of-TOTAL``)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from helpers import tiny_config
from tgs_salt.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def files_in(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in Path(d).rglob("*")} if Path(d).exists() else set()


# ----------------------------------------------------------------------------- case builders

def _depth(value):
    def build(data: Path):
        lines = (data / "depths.csv").read_text().splitlines()
        first = lines[1].split(",")[0]
        lines[1] = f"{first},{value}"
        (data / "depths.csv").write_text("\n".join(lines) + "\n")
        return first
    return build


def _header_only_train(data: Path):
    (data / "train.csv").write_text("id,rle_mask\n")
    return "no rows"


DATA_CASES = {
    "depth-nan": (_depth("nan"), "not a finite number"),
    "depth-inf": (_depth("inf"), "not a finite number"),
    "depth-1.2.3": (_depth("1.2.3"), "not a finite number"),
    "depth-1e999": (_depth("1e999"), "not a finite number"),
    "depth-empty": (_depth(""), "not a finite number"),
    "train-csv-header-only": (_header_only_train, "no rows"),
}

CONFIG_CASES = [
    "train.weight_decay=abc", "train.warmup_epochs=abc", "train.grad_clip=abc", "train.max_train_batches=0",
    "train.max_train_batches=-1", "train.amp=maybe", "train.seed=abc", "augment.shift=abc",
    "predict.batch_size=0", "postprocess.min_areas=abc", "postprocess.default_threshold=7", "folds.seed=abc",
    "folds.train_folds=[9]", "train.lr=-1", "train.time_budget_minutes=0", "train.channels_last=sometimes",
    "train.batch_size=1.5", "train.compile=yes please", "postprocess.tune_params=[threshold, size]",
    "postprocess.tune_params=[]",
]

SUBMISSION_CASES = {  # (CSV body after the header, command, expected exit code, needle)
    "rle-underscore": ("a,1_0 5\nb,\n", "validate", 1, "'1_0'"),
    "rle-plus": ("a,+1 5\nb,\n", "validate", 1, "'+1'"),
    "rle-20-digits": ("a,12345678901234567890 5\nb,\n", "validate", 1, "far past"),
    "rle-20-digits-score": ("a,12345678901234567890 5\nb,\n", "score", 2, "far past"),
    "rle-20-digits-submit": ("a,12345678901234567890 5\nb,\n", "submit", 2, "far past"),
    "duplicate-id-score": ("a,1 5\na,\nb,\n", "score", 2, "id a appears more than once"),
    "duplicate-id-validate": ("a,1 5\na,\nb,\n", "validate", 1, "id a: appears more than once"),
}

N_CASES = len(DATA_CASES) + len(CONFIG_CASES) + len(SUBMISSION_CASES) + 9  # + the standalone cases below
_k = iter(range(1, N_CASES + 1))


def cid(name: str) -> str:
    return f"{next(_k):02d}-of-{N_CASES}-{name}"


DATA_IDS = [cid(n) for n in DATA_CASES]
CONFIG_IDS = [cid(c) for c in CONFIG_CASES]
SUB_IDS = [cid(n) for n in SUBMISSION_CASES]
STANDALONE = {n: cid(n) for n in ("header-only-truth", "duplicate-truth-id", "bom-accepted", "predict-batch-size",
                                  "two-trainers", "killed-writer-leftovers", "full-disk-submission",
                                  "full-disk-checkpoint", "cache-same-size-and-mtime")}


# ----------------------------------------------------------------------------- data and configs

@pytest.mark.parametrize("name", list(DATA_CASES), ids=DATA_IDS)
def test_bad_data_folder(name, synth_copy, tmp_path, capsys):
    build, needle = DATA_CASES[name]
    culprit = build(synth_copy)
    folds_dir = Path(os.environ["TGS_FOLDS_DIR"])
    before = files_in(folds_dir)
    code, out, err = run(capsys, "folds", "--data-dir", synth_copy, "--name", f"hostile-{name}")
    assert code == 2, err
    assert needle in err and culprit in err and "Traceback" not in err
    assert files_in(folds_dir) == before  # no fold file written


@pytest.mark.parametrize("kv", CONFIG_CASES, ids=CONFIG_IDS)
def test_bad_config_value(kv, synth_dir, tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    code, out, err = run(capsys, "config", cfg, "--set", kv)
    key = kv.split("=")[0]
    assert code == 2 and key in err and "Traceback" not in err, err
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--config", cfg, "--set", kv, "--data-dir", synth_dir, "--run-dir", run_dir)
    assert code == 2 and key in err
    assert not run_dir.exists()  # refused before config.yaml / run.json are written


# ----------------------------------------------------------------------------- submissions

@pytest.fixture
def sample(tmp_path):
    p = tmp_path / "sample.csv"
    p.write_text("id,rle_mask\na,1 1\nb,1 1\n")
    return p


@pytest.mark.parametrize("name", list(SUBMISSION_CASES), ids=SUB_IDS)
def test_malformed_submission(name, sample, tmp_path, capsys):
    body, command, want_code, needle = SUBMISSION_CASES[name]
    sub = tmp_path / "sub.csv"
    sub.write_text("id,rle_mask\n" + body)
    truth = tmp_path / "truth.csv"
    truth.write_text("id,rle_mask\na,1 5\nb,\n")
    args = {"validate": ["validate", sub, "--sample", sample], "score": ["score", sub, "--truth", truth],
            "submit": ["submit", sub, "-m", "x", "--sample", sample, "--dry-run"]}[command]
    code, out, err = run(capsys, *args)
    assert code == want_code, (code, out, err)
    assert needle in err and "Traceback" not in err


def test_header_only_truth(sample, tmp_path, capsys):
    sub, truth = tmp_path / "s.csv", tmp_path / "t.csv"
    sub.write_text("id,rle_mask\na,\n")
    truth.write_text("id,rle_mask\n")
    code, out, err = run(capsys, "score", sub, "--truth", truth)
    assert code == 2 and "no rows" in err and "nan" not in out


def test_duplicate_truth_id(tmp_path, capsys):
    sub, truth = tmp_path / "s.csv", tmp_path / "t.csv"
    sub.write_text("id,rle_mask\na,\n")
    truth.write_text("id,rle_mask\na,\na,1 5\n")
    code, out, err = run(capsys, "score", sub, "--truth", truth)
    assert code == 2 and "truth" in err and "id a appears more than once" in err


def test_bom_is_accepted_everywhere(sample, tmp_path, capsys):
    sub = tmp_path / "bom.csv"
    sub.write_bytes("\ufeffid,rle_mask\na,1 5\nb,\n".encode("utf-8"))
    code, out, err = run(capsys, "validate", sub, "--sample", sample)
    assert code == 0, err
    code, out, err = run(capsys, "score", sub, "--truth", sub)
    assert code == 0 and out.strip().splitlines()[-1] == "1.000000"


def test_predict_batch_size_checked_first(tmp_path, capsys):
    code, out, err = run(capsys, "predict", "--run-dir", tmp_path / "nope", "--batch-size", "-1")
    assert code == 2 and "--batch-size -1" in err
    assert not (tmp_path / "nope").exists()


# ----------------------------------------------------------------------------- processes and disks

def test_second_trainer_on_the_same_fold_is_refused(tmp_path, synth_dir, capsys):
    from tgs_salt.io_utils import exclusive_lock

    cfg = tiny_config(tmp_path)
    run_dir = tmp_path / "run"
    with exclusive_lock(run_dir / "fold0" / ".lock", "fold 0"):  # this process plays the first trainer
        code, out, err = run(capsys, "train", "--config", cfg, "--data-dir", synth_dir, "--run-dir", run_dir,
                             "--fold", "0", "--resume", "--device", "cpu")
    assert code == 2 and f"PID {os.getpid()}" in err and "fold 0" in err
    assert not (run_dir / "fold0" / "last.pt").exists() and not (run_dir / "fold0" / "log.csv").exists()


def test_killed_writers_leave_nothing_behind(tmp_path):
    """Temporaries of a writer killed with -9 (its PID gone) are removed by the next writer there."""
    from tgs_salt.io_utils import TMP_MARK, remove_stale_temps, write_text_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [tmp_path / f".best.pt{TMP_MARK}{dead}.x1.pt", tmp_path / f".sub.csv{TMP_MARK}{dead}.x2.csv",
             tmp_path / f".test_probs.npz{TMP_MARK}{dead}.x3.npz"]
    for f in stale:
        f.write_bytes(b"partial")
    live = tmp_path / f".other.csv{TMP_MARK}{os.getpid()}.x4.csv"  # a running writer's: kept
    live.write_bytes(b"in progress")
    write_text_atomic(tmp_path / "ok.txt", "done")
    remove_stale_temps(tmp_path)
    assert not any(f.exists() for f in stale) and live.exists()
    assert (tmp_path / "ok.txt").read_text() == "done"
    # a real kill -9 in the middle of a write: the next run's clean-up removes its temporary
    code = ("import os, signal; from tgs_salt.io_utils import atomic_path\n"
            f"with atomic_path(r'{tmp_path / 'big.bin'}') as t:\n"
            "    open(t, 'wb').write(b'x' * 1000); os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, "-c", code], env=env)
    left = [f for f in tmp_path.iterdir() if "big.bin" in f.name]
    assert left and not (tmp_path / "big.bin").exists()
    remove_stale_temps(tmp_path)
    assert not [f for f in tmp_path.iterdir() if "big.bin" in f.name]


def _with_file_size_limit(code: str, limit: int = 20000):
    script = ("import resource, signal\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n" + code)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)


def test_full_disk_submission(tmp_path):
    out = tmp_path / "sub.csv"
    r = _with_file_size_limit(
        "import numpy as np\nfrom tgs_salt.submission import write_submission\nfrom tgs_salt.errors import UserError\n"
        "m = np.random.default_rng(0).random((400, 101, 101)) > 0.5\n"
        f"try:\n    write_submission(r'{out}', [str(i) for i in range(400)], m)\n"
        "except UserError as e:\n    print('USERERROR', e)\n")
    assert "USERERROR no space left on" in r.stdout and str(tmp_path) in r.stdout, r.stdout + r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_full_disk_checkpoint(tmp_path):
    out = tmp_path / "best.pt"
    r = _with_file_size_limit(
        "import torch\nfrom tgs_salt.rundir import save_checkpoint\nfrom tgs_salt.errors import UserError\n"
        f"try:\n    save_checkpoint({{'model': {{'w': torch.zeros(1 << 20)}}}}, __import__('pathlib').Path(r'{out}'))\n"
        "except UserError as e:\n    print('USERERROR', e)\n")
    assert "USERERROR no space left on" in r.stdout and "need about 4 MB" in r.stdout, r.stdout + r.stderr[-2000:]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cache_sees_a_rewrite_with_the_same_size_and_mtime(synth_copy):
    from tgs_salt.data import load_train

    a = load_train(synth_copy)
    depths = synth_copy / "depths.csv"
    st = depths.stat()
    lines = depths.read_text().splitlines()
    first_id, z = lines[1].split(",")
    digit = next(i for i in range(len(z) - 1, -1, -1) if z[i].isdigit())
    z_new = z[:digit] + str((int(z[digit]) + 1) % 10) + z[digit + 1:]  # same length
    lines[1] = f"{first_id},{z_new}"
    depths.write_text("\n".join(lines) + "\n")
    os.utime(depths, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert depths.stat().st_size == st.st_size and depths.stat().st_mtime_ns == st.st_mtime_ns
    b = load_train(synth_copy)
    k = list(b.ids).index(first_id)
    assert b.depths[k] == pytest.approx(float(z_new)) and b.depths[k] != a.depths[k]


# give the standalone tests their corpus ids as names, so the summary shows "NN-of-TOTAL"
for _name, _fn in [("header-only-truth", test_header_only_truth), ("duplicate-truth-id", test_duplicate_truth_id), ("bom-accepted", test_bom_is_accepted_everywhere),
                   ("predict-batch-size", test_predict_batch_size_checked_first),
                   ("two-trainers", test_second_trainer_on_the_same_fold_is_refused),
                   ("killed-writer-leftovers", test_killed_writers_leave_nothing_behind),
                   ("full-disk-submission", test_full_disk_submission),
                   ("full-disk-checkpoint", test_full_disk_checkpoint),
                   ("cache-same-size-and-mtime", test_cache_sees_a_rewrite_with_the_same_size_and_mtime)]:
    del globals()[_fn.__name__]
    globals()["test_" + STANDALONE[_name].replace("-", "_")] = _fn
del shutil, np, _name, _fn
