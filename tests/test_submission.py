import csv

import numpy as np
import pandas as pd

from conftest import run_cli
from tgs_salt.rle import rle_encode
from tgs_salt.submission import validate_submission, write_submission


def _sample(tmp_path, ids):
    p = tmp_path / "sample.csv"
    pd.DataFrame({"id": ids, "rle_mask": ["1 1"] * len(ids)}).to_csv(p, index=False)
    return p


def test_write_and_validate(tmp_path):
    ids = ["a1", "b2", "c3"]
    masks = np.zeros((3, 101, 101), bool)
    masks[1, 5:9, 5:9] = True
    out = write_submission(tmp_path / "sub.csv", ids, masks)
    v = validate_submission(out, _sample(tmp_path, ids))
    assert v.ok and v.rows == 3 and v.non_empty == 1
    rows = list(csv.reader(open(out)))
    assert rows[0] == ["id", "rle_mask"] and rows[2] == ["b2", rle_encode(masks[1])]


def test_validate_lists_problems_with_ids(tmp_path):
    sample = _sample(tmp_path, ["a", "b", "c", "d"])
    sub = tmp_path / "bad.csv"
    sub.write_text("id,rle_mask\na,1 2 3\nb,5 3 1 2\nb,\nz,1 1\n")
    r = run_cli("validate", sub, "--sample", sample)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    for needle in ("id a: odd number", "id b: runs are not sorted", "id b: appears more than once",
                   "id z: not in the sample", "missing", "c"):
        assert needle in r.stderr, r.stderr
    r = run_cli("validate", tmp_path / "nope.csv", "--sample", sample)
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_validate_ok_cli(tmp_path):
    sample = _sample(tmp_path, ["a", "b"])
    sub = tmp_path / "ok.csv"
    sub.write_text("id,rle_mask\nb,1 5\na,\n")
    r = run_cli("validate", sub, "--sample", sample)
    assert r.returncode == 0 and "2 rows, 1 non-empty" in r.stdout


def test_score_real_train_csv(shared_data, tmp_path):
    r = run_cli("score", shared_data / "train.csv", "--truth", shared_data / "train.csv")
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip().splitlines()[-1]) == 1.0
    df = pd.read_csv(shared_data / "train.csv", dtype=str, keep_default_na=False)
    df["rle_mask"] = ""
    empty = tmp_path / "empty.csv"
    df.to_csv(empty, index=False)
    r = run_cli("score", empty, "--truth", shared_data / "train.csv")
    assert r.returncode == 0, r.stderr
    assert abs(float(r.stdout.strip().splitlines()[-1]) - 0.3905) < 5e-5
