import os
import time

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from tgs_salt.data import load_test, load_train
from tgs_salt.data.synth import make_sample, write_synthetic
from tgs_salt.errors import UserError


def test_synthetic_layout_and_formats(synth_dir):
    for f in ("train.csv", "depths.csv", "sample_submission.csv"):
        assert (synth_dir / f).exists()
    df = pd.read_csv(synth_dir / "train.csv", dtype=str, keep_default_na=False)
    img = cv2.imread(str(next((synth_dir / "train" / "images").glob("*.png"))), cv2.IMREAD_UNCHANGED)
    assert img.shape == (101, 101, 3) and img.dtype == np.uint8
    for i, rle in zip(df["id"], df["rle_mask"]):
        m = cv2.imread(str(synth_dir / "train" / "masks" / f"{i}.png"), cv2.IMREAD_UNCHANGED)
        assert m.dtype == (np.uint16 if rle else np.uint8)
        assert set(np.unique(m)) <= ({0, 65535} if rle else {0})


def test_load_train_and_test(synth_dir):
    tr = load_train(synth_dir)
    te = load_test(synth_dir)
    assert tr.images.shape == (60, 101, 101) and tr.images.dtype == np.uint8
    assert tr.masks.dtype == bool and tr.depths.dtype == np.float32
    assert te.images.shape == (20, 101, 101)
    assert list(te.ids) == list(pd.read_csv(synth_dir / "sample_submission.csv")["id"])


def test_synthetic_statistics_and_determinism(tmp_path):
    rng = np.random.default_rng(0)
    samples = [make_sample(np.random.default_rng([7, k])) for k in range(400)]
    masks = np.stack([s[1] for s in samples])
    images = np.stack([s[0] for s in samples])
    empty = ~masks.any(axis=(1, 2))
    assert 0.3 < empty.mean() < 0.5
    constant = images.reshape(400, -1).std(axis=1) == 0
    assert constant.any() and not masks[constant].any()
    depths = np.array([s[2] for s in samples])
    assert depths[~empty].mean() > depths[empty].mean() + 50
    cov = masks[~empty].mean(axis=(1, 2))
    assert cov.min() < 0.05 and cov.max() > 0.9  # varied sizes
    a = write_synthetic(tmp_path / "a", 15, 5, seed=11)
    b = write_synthetic(tmp_path / "b", 15, 5, seed=11)
    for f in ("train.csv", "depths.csv", "sample_submission.csv"):
        assert (a / f).read_text() == (b / f).read_text()
    del rng


def test_cache_is_used_and_rebuilt_on_change(synth_copy):
    first = load_train(synth_copy)
    cached = load_train(synth_copy)
    assert np.array_equal(first.images, cached.images)
    # change one image: the cache must notice
    i = first.ids[0]
    p = synth_copy / "train" / "images" / f"{i}.png"
    img = np.full((101, 101, 3), 7, np.uint8)
    time.sleep(0.01)
    cv2.imwrite(str(p), img)
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
    again = load_train(synth_copy)
    assert (again.images[0] == 7).all()


def _expect_error(func, *needles):
    with pytest.raises(UserError) as e:
        func()
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_missing_folder_and_files(tmp_path, synth_copy):
    _expect_error(lambda: load_train(tmp_path / "nope"), "does not exist", "download")
    (synth_copy / "depths.csv").unlink()
    _expect_error(lambda: load_train(synth_copy), "depths.csv")


def _first_train_id(d):
    return pd.read_csv(d / "train.csv", dtype=str, keep_default_na=False)["id"].iloc[0]


def test_corrupt_png(synth_copy):
    i = _first_train_id(synth_copy)
    (synth_copy / "train" / "images" / f"{i}.png").write_bytes(b"not a png")
    _expect_error(lambda: load_train(synth_copy), i, "not a readable PNG")


def test_wrong_size(synth_copy):
    i = _first_train_id(synth_copy)
    cv2.imwrite(str(synth_copy / "train" / "images" / f"{i}.png"), np.zeros((100, 101, 3), np.uint8))
    _expect_error(lambda: load_train(synth_copy), i, "expected 101x101")


def test_bad_mask_values(synth_copy):
    i = _first_train_id(synth_copy)
    m = np.zeros((101, 101), np.uint16)
    m[0, 0], m[0, 1] = 100, 65535
    cv2.imwrite(str(synth_copy / "train" / "masks" / f"{i}.png"), m)
    _expect_error(lambda: load_train(synth_copy), f"mask {i}", "values")


def test_id_without_image_and_without_depth(synth_copy):
    i = _first_train_id(synth_copy)
    (synth_copy / "train" / "images" / f"{i}.png").unlink()
    _expect_error(lambda: load_train(synth_copy), i, "no image")


def test_image_without_depth(synth_copy):
    i = _first_train_id(synth_copy)
    d = pd.read_csv(synth_copy / "depths.csv", dtype=str)
    d[d["id"] != i].to_csv(synth_copy / "depths.csv", index=False)
    _expect_error(lambda: load_train(synth_copy), i, "no depth")


def test_rle_disagreeing_with_png(synth_copy):
    df = pd.read_csv(synth_copy / "train.csv", dtype=str, keep_default_na=False)
    k = int(np.flatnonzero(df["rle_mask"] != "")[0])
    i = df["id"].iloc[k]
    df.loc[k, "rle_mask"] = "1 5"
    df.to_csv(synth_copy / "train.csv", index=False)
    _expect_error(lambda: load_train(synth_copy), i, "disagrees")


def test_cli_error_has_no_traceback(synth_copy):
    i = _first_train_id(synth_copy)
    (synth_copy / "train" / "images" / f"{i}.png").write_bytes(b"")
    r = run_cli("folds", "--data-dir", synth_copy)
    assert r.returncode != 0
    assert i in r.stderr and "Traceback" not in r.stderr


def test_real_data_loads(shared_data):
    tr = load_train(shared_data)
    te = load_test(shared_data)
    assert len(tr) == 3001 and len(te) == 1000
    empty = ~tr.masks.any(axis=(1, 2))
    assert abs(empty.mean() - 0.3905) < 0.001
    # images with a single value have empty masks
    constant = tr.images.reshape(len(tr), -1).std(axis=1) == 0
    assert constant.sum() > 0 and not tr.masks[constant].any()
