"""Threshold sweep of the competition metric: 4000 images x 100 thresholds, one core.

    python bench/bench_metric.py
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import time

import numpy as np
from common import save

from tgs_salt.metric import competition_score, threshold_sweep


def main():
    rng = np.random.default_rng(0)
    n = 4000
    truth = np.zeros((n, 101, 101), bool)
    for i in range(n):
        if rng.random() < 0.6:
            truth[i, rng.integers(0, 90):, : rng.integers(10, 101)] = True
    probs = np.clip(truth * 0.7 + rng.normal(0.15, 0.2, truth.shape), 0, 1).astype(np.float16)
    th = np.linspace(0.01, 0.99, 100)
    threshold_sweep(probs[:100], truth[:100], th)  # warm-up
    times = []
    for _ in range(3):
        t = time.perf_counter()
        threshold_sweep(probs, truth, th)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for x in th[:5]:
        competition_score(probs > x, truth)
    naive_per_threshold = (time.perf_counter() - t) / 5
    save("metric", {"images": n, "thresholds": 100, "sweep_seconds_best_of_3": round(min(times), 3),
                    "naive_seconds_per_threshold": round(naive_per_threshold, 3),
                    "speedup_vs_naive_100_thresholds": round(naive_per_threshold * 100 / min(times), 1)})


if __name__ == "__main__":
    main()
