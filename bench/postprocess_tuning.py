"""Does tuning the post-processing on out-of-fold predictions help on images it was not tuned on?

    python bench/postprocess_tuning.py NAME RUN_DIR [RUN_DIR ...] --data-dir D [--splits 4]

For each finished run (its OOF predictions and classifier outputs), the held-out images are split
in two halves at random (``--splits`` different splits; the folds themselves when the run has
several): each half is scored with the post-processing tuned on the other half. Strategies tune
more or less of it — threshold, minimum area, classifier cut — against the untuned default
(threshold 0.5, no minimum area, the classifier's cut at 0.5). A strategy that loses held out
should not be applied to the test set (``postprocess.tune: auto`` applies the full tuning only
where it wins, run by run). Writes ``bench/results/NAME.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import save

from tgs_salt.metric import per_image_scores, threshold_sweep
from tgs_salt.postprocess import CLS_GRID, PostProcess, apply, threshold_grid
from tgs_salt.report import oof_with_truth, read_run

# name: (classifier cuts searched, minimum areas searched (None: the config's), thresholds searched)
STRATEGIES = {
    "threshold + min area + classifier cut (the full tuning)": ("all", None, "all"),
    "threshold + classifier cut": ("all", [0], "all"),
    "threshold only": ([0.5], [0], "all"),
    "classifier cut only": ("all", [0], [0.5]),
}


def best_of(grids: list[np.ndarray], th: np.ndarray, areas: np.ndarray, spec, cls) -> PostProcess:
    cuts, allowed_areas, allowed_th = spec
    ok_a = np.ones(len(areas), bool) if allowed_areas is None else np.isin(areas, allowed_areas)
    ok_t = np.ones(len(th), bool) if allowed_th == "all" else np.isin(th, allowed_th)
    best, best_score = None, -1.0
    for c, grid in zip(CLS_GRID if cls is not None else [None], grids):
        if cuts != "all" and c not in cuts:
            continue
        g = np.where(ok_a[:, None] & ok_t[None, :], grid, -1.0)
        a, k = np.unravel_index(int(np.argmax(g)), g.shape)
        if g[a, k] > best_score + 1e-12:
            best, best_score = PostProcess(float(th[k]), int(areas[a]), None if c is None else float(c)), g[a, k]
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("runs", nargs="+")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--splits", type=int, default=4)
    a = p.parse_args()
    rows = []
    for run in a.runs:
        cfg, _ = read_run(Path(run))
        th = threshold_grid(cfg)
        th = np.unique(np.append(th, 0.5))  # the default threshold is always a candidate
        areas = np.unique(np.append(np.asarray(cfg["postprocess"]["min_areas"], np.int64), 0))
        _, probs, cls, data, idx = oof_with_truth([Path(run)], np.ones(1), Path(a.data_dir))
        truth = data.masks[idx]
        default = PostProcess(0.5, 0, None if cls is None else 0.5)
        s_default = float(per_image_scores(apply(probs, default, cls=cls), truth).mean())
        per = {name: [] for name in STRATEGIES}
        for seed in range(a.splits):
            halves = np.random.default_rng(seed).permutation(len(probs)) % 2
            scores = {name: np.empty(len(probs)) for name in STRATEGIES}
            for g in (0, 1):
                out, fit = halves == g, halves != g
                grids = [threshold_sweep(probs[fit] if not c else np.where((cls[fit] < c)[:, None, None], 0,
                                                                            probs[fit]), truth[fit], th, areas)
                         for c in (CLS_GRID if cls is not None else [None])]
                for name, spec in STRATEGIES.items():
                    pp = best_of(grids, th, areas, spec, cls)
                    scores[name][out] = per_image_scores(apply(probs[out], pp, cls=None if cls is None else cls[out]),
                                                         truth[out])
            for name in STRATEGIES:
                per[name].append(round(float(scores[name].mean()), 6))
        rows.append({"run": Path(run).name, "n_images": len(probs), "untuned": round(s_default, 6),
                     "nested_by_split": per,
                     "gain_vs_untuned": {k: round(float(np.mean(v)) - s_default, 6) for k, v in per.items()}})
        print(Path(run).name, "untuned", round(s_default, 4),
              {k[:28]: round(float(np.mean(v)) - s_default, 4) for k, v in per.items()}, flush=True)
    summary = {k: round(float(np.mean([r["gain_vs_untuned"][k] for r in rows])), 6) for k in STRATEGIES}
    save(a.name, {"splits": a.splits, "how": "each half of the held-out images scored with the post-processing "
                  "tuned on the other half, against the untuned default (0.5, no min area, classifier cut 0.5)",
                  "mean_gain_vs_untuned": summary, "runs": rows}, echo=False)
    print("mean gain of tuning, held out:", summary)


if __name__ == "__main__":
    main()
