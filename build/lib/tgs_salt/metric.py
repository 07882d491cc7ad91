"""The competition metric: mean over IoU thresholds 0.50..0.95 of [IoU > t], averaged over images.

Rules (each has a known-answer test):
- empty truth scores 1 only for an empty prediction (0 otherwise);
- non-empty truth with an empty prediction scores 0, whatever the truth's size;
- the comparison is strict: IoU exactly 0.5 scores 0 at t = 0.5.

Comparisons are done in integers (100 * inter > T * union with T in 50, 55, ..., 95) so that
IoU values that land exactly on a threshold are never misjudged by floating point.
"""

from __future__ import annotations

import numpy as np

IOU_THRESHOLDS_PCT = np.arange(50, 100, 5, dtype=np.int64)  # 50, 55, ..., 95


def score_from_counts(inter: np.ndarray, pred_area: np.ndarray, true_area: np.ndarray) -> np.ndarray:
    """Per-image score from pixel counts (any broadcastable shapes)."""
    inter = np.asarray(inter, dtype=np.int64)
    pred_area = np.asarray(pred_area, dtype=np.int64)
    true_area = np.asarray(true_area, dtype=np.int64)
    union = pred_area + true_area - inter
    hits = (100 * inter[..., None]) > (IOU_THRESHOLDS_PCT * union[..., None])
    score = hits.mean(axis=-1)
    return np.where(union == 0, 1.0, score)


def per_image_scores(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Scores of binary predictions against binary truths, shape (N, H, W) or (H, W)."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    axes = (-2, -1)
    inter = np.logical_and(pred, truth).sum(axis=axes)
    return score_from_counts(inter, pred.sum(axis=axes), truth.sum(axis=axes))


def competition_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean competition score over images."""
    return float(np.mean(per_image_scores(pred, truth)))


def threshold_counts(probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray,
                     chunk: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each image and binarisation threshold (prediction = prob > threshold), return
    (inter, pred_area) of shape (N, K) and true_area of shape (N,).

    One pass over the pixels whatever K: each pixel gets the number of thresholds below its
    probability (through a 65,536-entry table on its float16 bit pattern, which is monotone
    for non-negative values), then a bincount per image gives all thresholds' counts at once.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.ndim != 1 or np.any(np.diff(thresholds) <= 0):
        raise ValueError("thresholds must be a 1-D strictly increasing array")
    probs = np.asarray(probs)
    truth = np.asarray(truth, dtype=bool)
    if probs.shape != truth.shape:
        raise ValueError(f"probability shape {probs.shape} != truth shape {truth.shape}")
    n = probs.shape[0]
    k = thresholds.size
    # Table: float16 bit pattern -> number of thresholds strictly below that value.
    all_halfs = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64)
    lut = np.searchsorted(thresholds, all_halfs, side="left").astype(np.int16)
    lut[np.isnan(all_halfs)] = 0
    inter = np.empty((n, k), dtype=np.int64)
    pred_area = np.empty((n, k), dtype=np.int64)
    true_area = truth.reshape(n, -1).sum(axis=1)
    for s in range(0, n, chunk):
        p = probs[s:s + chunk]
        m = p.shape[0]
        p16 = np.clip(p, 0, None).astype(np.float16, copy=False).reshape(m, -1)
        t = truth[s:s + chunk].reshape(m, -1)
        # One bincount for both counts: bin index = 2 * (image, threshold-bin) + is_true.
        bins = lut[p16.view(np.uint16)].astype(np.int32)
        bins += (np.arange(m, dtype=np.int32) * (k + 1))[:, None]
        bins <<= 1
        bins += t
        counts = np.bincount(bins.ravel(), minlength=2 * m * (k + 1)).reshape(m, k + 1, 2)
        true_counts = counts[..., 1]
        all_counts = counts[..., 0] + true_counts
        # pixel with bin b is above thresholds 0..b-1: count for threshold j = sum of bins > j.
        pred_area[s:s + m] = np.cumsum(all_counts[:, ::-1], axis=1)[:, ::-1][:, 1:]
        inter[s:s + m] = np.cumsum(true_counts[:, ::-1], axis=1)[:, ::-1][:, 1:]
    return inter, pred_area, true_area


def threshold_sweep(probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray,
                    min_areas: np.ndarray | None = None) -> np.ndarray:
    """Mean competition score for every binarisation threshold (and minimum-area rule).

    Returns shape (K,) or, with ``min_areas`` (A,), shape (A, K): a prediction whose area is
    below the minimum area is replaced by the empty mask.
    """
    inter, pred_area, true_area = threshold_counts(probs, truth, thresholds)
    if min_areas is None:
        return score_from_counts(inter, pred_area, true_area[:, None]).mean(axis=0)
    min_areas = np.asarray(min_areas, dtype=np.int64)
    out = np.empty((min_areas.size, np.asarray(thresholds).size))
    for i, a in enumerate(min_areas):
        keep = pred_area >= a
        out[i] = score_from_counts(np.where(keep, inter, 0), np.where(keep, pred_area, 0),
                                   true_area[:, None]).mean(axis=0)
    return out
