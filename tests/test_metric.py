import numpy as np
import pytest

from tgs_salt.metric import competition_score, per_image_scores, threshold_sweep


def masks_with_iou(inter, a_only, b_only):
    """Two masks with given intersection and exclusive pixel counts."""
    a = np.zeros(10201, bool)
    b = np.zeros(10201, bool)
    a[:inter] = b[:inter] = True
    a[inter:inter + a_only] = True
    b[inter + a_only:inter + a_only + b_only] = True
    return a.reshape(101, 101), b.reshape(101, 101)


def test_both_empty_scores_one():
    z = np.zeros((101, 101), bool)
    assert per_image_scores(z, z) == 1.0


def test_empty_truth_with_any_prediction_scores_zero():
    z = np.zeros((101, 101), bool)
    p = z.copy()
    p[3, 3] = True
    assert per_image_scores(p, z) == 0.0


def test_empty_prediction_on_large_truth_scores_zero():
    t = np.ones((101, 101), bool)
    t[:10] = False   # covers ~90% of the image
    assert per_image_scores(np.zeros_like(t), t) == 0.0


def test_iou_exactly_half_scores_zero_at_050():
    p, t = masks_with_iou(50, 25, 25)   # IoU = 50 / 100
    assert per_image_scores(p, t) == 0.0


def test_iou_exactly_on_every_threshold_is_strict():
    # IoU = 0.55, 0.60, ... 0.95 exactly: passes only the thresholds strictly below it
    for k, pct in enumerate(range(55, 100, 5), start=1):
        p, t = masks_with_iou(pct, 100 - pct, 0)
        assert per_image_scores(p, t) == pytest.approx(k / 10), pct


def test_iou_just_above_threshold():
    p, t = masks_with_iou(751, 249, 0)   # IoU 0.751 > 0.50..0.75 -> 6 of 10
    assert per_image_scores(p, t) == pytest.approx(0.6)


def test_perfect_and_mean_over_images():
    rng = np.random.default_rng(1)
    t = rng.random((4, 101, 101)) < 0.3
    p = t.copy()
    p[0] = False
    assert competition_score(p, t) == pytest.approx(0.75)


def test_inputs_not_modified():
    rng = np.random.default_rng(2)
    t = rng.random((3, 101, 101)) < 0.3
    p = rng.random((3, 101, 101)) < 0.3
    t0, p0 = t.copy(), p.copy()
    competition_score(p, t)
    assert np.array_equal(t, t0) and np.array_equal(p, p0)


def test_threshold_sweep_equals_direct_scoring():
    rng = np.random.default_rng(3)
    n = 60
    truth = np.zeros((n, 101, 101), bool)
    for i in range(n):
        if i % 3:
            truth[i, rng.integers(0, 60):, :rng.integers(20, 101)] = True
    noise = rng.normal(0, 0.25, truth.shape)
    probs = np.clip(truth * 0.8 + 0.1 + noise, 0, 1).astype(np.float16)
    thresholds = np.linspace(0.05, 0.95, 19)
    swept = threshold_sweep(probs, truth, thresholds)
    direct = [competition_score(probs > th, truth) for th in thresholds]
    np.testing.assert_allclose(swept, direct)
    assert swept.max() > 0.5  # not a degenerate comparison


def test_threshold_sweep_min_area():
    truth = np.zeros((2, 101, 101), bool)
    truth[1, 20:60, 20:60] = True
    probs = np.zeros((2, 101, 101), np.float32)
    probs[0, 0:3, 0:3] = 0.9           # a 9-pixel false positive on the empty image
    probs[1][truth[1]] = 0.9
    out = threshold_sweep(probs, truth, np.array([0.5]), min_areas=np.array([0, 10, 5000]))
    assert out[:, 0].tolist() == [0.5, 1.0, 0.5]
