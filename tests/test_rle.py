import numpy as np
import pandas as pd
import pytest

from tgs_salt.rle import rle_decode, rle_encode, rle_problems


def test_known_encoding_is_column_major_and_one_indexed():
    m = np.zeros((101, 101), bool)
    m[0, 0] = True          # pixel 1
    m[1, 0] = True          # pixel 2 (down the first column)
    m[0, 1] = True          # pixel 102 (top of second column)
    assert rle_encode(m) == "1 2 102 1"


@pytest.mark.parametrize("setup,expected", [
    (lambda m: None, ""),
    (lambda m: m.__setitem__((slice(None), slice(None)), True), "1 10201"),
    (lambda m: m.__setitem__((50, 50), True), f"{50 * 101 + 50 + 1} 1"),
    (lambda m: m.__setitem__((100, 100), True), "10201 1"),
    (lambda m: m.__setitem__((0, 0), True), "1 1"),
])
def test_edge_cases_round_trip(setup, expected):
    m = np.zeros((101, 101), bool)
    setup(m)
    assert rle_encode(m) == expected
    assert np.array_equal(rle_decode(expected), m)


def test_run_crossing_a_column_boundary():
    m = np.zeros((101, 101), bool)
    m[95:, 3] = True
    m[:4, 4] = True
    assert rle_encode(m) == f"{3 * 101 + 96} 10"
    assert np.array_equal(rle_decode(rle_encode(m)), m)


def test_random_round_trips():
    rng = np.random.default_rng(0)
    for density in (0.01, 0.3, 0.5, 0.9, 0.999):
        for _ in range(20):
            m = rng.random((101, 101)) < density
            s = rle_encode(m)
            assert rle_problems(s) == []
            assert np.array_equal(rle_decode(s), m)


@pytest.mark.parametrize("rle,needle", [
    ("1 2 3", "odd number"),
    ("0 5", "1-indexed"),
    ("5 0", "length"),
    ("10 5 3 2", "sorted"),
    ("10 5 12 2", "overlap"),
    ("10200 5", "past"),
    ("1 x", "not a non-negative integer"),
    ("1_0 5", "not a non-negative integer"),   # int() takes it, Kaggle does not
    ("+1 5", "not a non-negative integer"),
    ("-1 5", "not a non-negative integer"),
    ("1 \u0662", "not a non-negative integer"),  # an Arabic-Indic digit: str.isdigit() says yes
    ("12345678901234567890 1", "far past"),     # overflowed int64 before
])
def test_problems_are_named(rle, needle):
    problems = rle_problems(rle)
    assert any(needle in p for p in problems), problems
    with pytest.raises(ValueError):
        rle_decode(rle)


def test_real_train_csv_matches_masks_and_reencodes(shared_data):
    import cv2

    df = pd.read_csv(shared_data / "train.csv", dtype=str, keep_default_na=False)
    assert len(df) == 3001
    for i, rle in zip(df["id"], df["rle_mask"]):
        png = cv2.imread(str(shared_data / "train" / "masks" / f"{i}.png"), cv2.IMREAD_UNCHANGED) > 0
        decoded = rle_decode(rle)
        assert np.array_equal(decoded, png), i
        assert rle_encode(decoded) == rle, i
