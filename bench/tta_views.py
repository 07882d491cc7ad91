"""Do more test-time views help? Finished runs' kept weights, re-scored on their held-out images.

    python bench/tta_views.py NAME RUN_DIR [RUN_DIR ...] --data-dir D [--shifts 3 5]

For each run and each of its trained folds, the kept weights (``fold<k>/best.pt``) predict the
fold's held-out images with the flip TTA alone (``predict.tta_shift: 0``) and with shift TTA at each
``--shifts`` value (6 views: the image moved n px diagonally down-right and up-left inside the
padding, each with its flip). Each is scored image by image at the untuned default (threshold 0.5,
classifier cut 0.5) and nested (post-processing tuned on the other half or folds), and the gain over
the flip alone is paired per image with a 95% bootstrap interval. The same weights under every
variant: only the views differ, so no training noise enters the comparison. Writes
``bench/results/NAME.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import save

from tgs_salt.compare import bootstrap_interval
from tgs_salt.data import load_train
from tgs_salt.data.folds import folds_for
from tgs_salt.inference import FoldModel, predict_arrays
from tgs_salt.metric import per_image_scores
from tgs_salt.postprocess import apply, nested_scores, split_groups, untuned
from tgs_salt.report import expected_folds, read_run, run_fold_file
from tgs_salt.rundir import RunDir


def held_out_probs(run: Path, cfg: dict, data, shifts: list[int], batch: int):
    """Rows of ``data`` the run's folds held out, and their probabilities / salt probabilities per shift."""
    index = {i: k for k, i in enumerate(data.ids)}
    rows, probs, cls = [], {s: [] for s in shifts}, {s: [] for s in shifts}
    for k in expected_folds(cfg):
        with np.load(RunDir(run).oof(k)) as z:
            r = np.array([index[i] for i in z["ids"]])
        m = FoldModel(RunDir(run).best(k), torch.device("cpu"))
        for s in shifts:
            p, c = predict_arrays(m.model, m.builder, data.images[r], data.depths[r], m.device, m.precision,
                                  cfg["predict"]["tta"], batch, s)
            probs[s].append(p)
            cls[s].append(c)
        rows.append(r)
    cat = {s: (np.concatenate(probs[s]), None if cls[s][0] is None else np.concatenate(cls[s])) for s in shifts}
    return np.concatenate(rows), cat


def main():
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("runs", nargs="+")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--shifts", type=int, nargs="+", default=[3])
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    data = load_train(Path(a.data_dir))
    shifts = [0] + [s for s in a.shifts if s]
    out = []
    for run in map(Path, a.runs):
        t0 = time.time()
        cfg, facts = read_run(run)
        rows, views = held_out_probs(run, cfg, data, shifts, a.batch)
        truth = data.masks[rows]
        groups, how = split_groups(folds_for(data.ids, run_fold_file(facts))[rows])
        scores = {}
        for s, (probs, cls) in views.items():
            default = per_image_scores(apply(probs, untuned(cfg, cls is not None), cls=cls), truth)
            nested, _ = nested_scores(probs, truth, cfg, groups, cls)
            scores[s] = (default, nested)
        row = {"run": run.name, "n_images": len(rows), "nested_method": how, "seconds": round(time.time() - t0, 1),
               "flip_only": {"default": round(float(scores[0][0].mean()), 6),
                             "nested": round(float(scores[0][1].mean()), 6)}, "shifts": {}}
        for s in shifts[1:]:
            entry = {}
            for name, j in (("default", 0), ("nested", 1)):
                d = scores[s][j] - scores[0][j]
                lo, hi = bootstrap_interval(d)
                entry[name] = {"score": round(float(scores[s][j].mean()), 6), "gain": round(float(d.mean()), 6),
                               "ci95": [round(lo, 6), round(hi, 6)]}
            row["shifts"][str(s)] = entry
            print(f"{run.name}: shift {s}: {entry['default']['score']:.4f} at 0.5, gain {entry['default']['gain']:+.4f} "
                  f"({entry['default']['ci95'][0]:+.4f} … {entry['default']['ci95'][1]:+.4f}); nested gain "
                  f"{entry['nested']['gain']:+.4f}", flush=True)
        out.append(row)
    mean = {str(s): {k: round(float(np.mean([r["shifts"][str(s)][k]["gain"] for r in out])), 6)
                     for k in ("default", "nested")} for s in shifts[1:]}
    save(a.name, {"how": "kept weights of each run re-scored on its held-out images: flip TTA alone against flip + "
                  "shift TTA (predict.tta_shift; 6 views), paired per image, 95% bootstrap interval over images",
                  "mean_gain_over_runs": mean, "runs": out}, echo=False)
    print("mean gain over runs:", mean)


if __name__ == "__main__":
    main()
