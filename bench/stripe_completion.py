"""Column completion: can post-processing recover the "vertical" stripe masks (data.folds.stripe_masks:
some salt, every column all salt or all empty, a labelling artefact) that runs get wrong?

    python bench/stripe_completion.py NAME RUN_DIR [RUN_DIR ...] --data-dir D [--consistency 0.9 0.95 0.97]

For each finished run, its OOF predictions under the untuned default (threshold 0.5, no minimum area,
the classifier's cut at 0.5), then the same with every non-empty predicted mask whose column-completed
version (a column salt from top to bottom where at least half of it is predicted salt, else empty)
overlaps it with an IoU above the consistency level replaced by that version. The per-image gains are
pooled over the runs (runs and images both sampled, tgs_salt.compare.pooled_t) and split between the
stripe images and the others (each part divided by all the images, so the two add up to the gain).
Reads finished run directories and the train masks; writes bench/results/NAME.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import save

from tgs_salt.compare import pooled_t
from tgs_salt.data.folds import stripe_masks
from tgs_salt.errors import UserError
from tgs_salt.metric import per_image_scores
from tgs_salt.postprocess import PostProcess, apply
from tgs_salt.report import oof_with_truth


def column_completed(pred: np.ndarray) -> np.ndarray:
    """``pred`` (n, H, W) boolean: each column all salt where at least half of it is salt, else empty."""
    full = pred.mean(axis=1) >= 0.5                                # (n, W)
    return np.broadcast_to(full[:, None, :], pred.shape)


def complete(pred: np.ndarray, consistency: float) -> tuple[np.ndarray, np.ndarray]:
    """The masks with the near-vertical ones (IoU with their completion > ``consistency``) completed,
    and which were."""
    done = column_completed(pred)
    inter = (pred & done).sum(axis=(1, 2))
    union = (pred | done).sum(axis=(1, 2))
    hit = (union > 0) & (inter > consistency * union)
    return np.where(hit[:, None, None], done, pred), hit


def main():
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("runs", nargs="+")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--consistency", type=float, nargs="+", default=[0.9, 0.95, 0.97])
    a = p.parse_args()
    gains = {c: [] for c in a.consistency}
    first_ids, rows = None, []
    for run in a.runs:
        try:
            ids, probs, cls, data, idx = oof_with_truth([Path(run)], np.ones(1), Path(a.data_dir))
        except (OSError, UserError) as e:
            raise SystemExit(f"error: {e}") from None
        truth = data.masks[idx] > 0
        if first_ids is None:
            first_ids, stripe = ids, stripe_masks(truth)
        elif not np.array_equal(ids, first_ids):
            raise SystemExit(f"error: {run}: held-out images differ from the first run's; pass runs of the same fold")
        pred = apply(probs, PostProcess(0.5, 0, None if cls is None else 0.5), cls=cls)
        base = per_image_scores(pred, truth)
        row = {"run": Path(run).name, "default": round(float(base.mean()), 6),
               "stripe_images_predicted_empty": int((pred[stripe].sum(axis=(1, 2)) == 0).sum())}
        for c in a.consistency:
            new, hit = complete(pred, c)
            d = per_image_scores(new, truth) - base
            gains[c].append(d)
            row[f"consistency {c}"] = {"completed": int(hit.sum()), "completed_stripe": int(hit[stripe].sum()),
                                       "gain": round(float(d.mean()), 6)}
        rows.append(row)
        print(row["run"], "default", round(row["default"], 4), "stripe images predicted empty",
              row["stripe_images_predicted_empty"], "of", int(stripe.sum()),
              {c: (row[f"consistency {c}"]["completed"], round(row[f"consistency {c}"]["gain"], 4))
               for c in a.consistency}, flush=True)
    pooled = {}
    for c, ds in gains.items():
        d = np.stack(ds)
        gain, _, _, _, _, (lo, hi, _) = pooled_t(d)
        n = d.shape[1]
        pooled[str(c)] = {"gain": round(gain, 6), "ci95": [round(lo, 6), round(hi, 6)],
                          "stripe_part": round(float(d[:, stripe].sum(axis=1).mean() / n), 6),
                          "other_part": round(float(d[:, ~stripe].sum(axis=1).mean() / n), 6)}
        print(f"consistency > {c}: gain {gain:+.4f} ({lo:+.4f} .. {hi:+.4f}) over {len(ds)} runs; "
              f"stripe images {pooled[str(c)]['stripe_part']:+.4f}, the others {pooled[str(c)]['other_part']:+.4f}")
    save(a.name, {"runs": rows, "pooled": pooled, "n_stripe_images": int(stripe.sum()),
                  "note": "column completion of near-vertical predictions on OOF at the untuned default"}, echo=False)


if __name__ == "__main__":
    main()
