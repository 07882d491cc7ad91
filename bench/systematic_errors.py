"""Where the held-out score is lost, and how much of it every run loses alike: the per-image scores
that recorded runs kept (``bench/record_run.py``), on the same held-out images, split by the truth's
coverage.

    python bench/systematic_errors.py NAME RESULT.json RESULT.json ... --data-dir ../shared/tgs-salt [--score default]

Per run and on average: the score lost (1 - score, summed over images, divided by their number) on
empty masks (a false salt pixel costs the image), on masks with salt scored 0 (predicted empty, or an
IoU of at most 0.5) and on masks with salt partly right, each per coverage bin. Then the images
scored 0 by every run: what seeds and sessions share, which no averaging of such runs removes; and the
"vertical" stripe masks (data.folds.stripe_masks), a labelling artefact.
Reads stored results and the train masks only; writes bench/results/systematic_errors_NAME.json.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from common import save

from tgs_salt.compare import recorded_scores
from tgs_salt.data.folds import coverage_class, stripe_masks
from tgs_salt.data.kaggle_io import load_train
from tgs_salt.errors import UserError
from tgs_salt.report import COVERAGE_LABELS


def summarize(ids: list[str], scores: np.ndarray, masks: np.ndarray, files: list[str]) -> dict:
    """``scores``: runs x images (the competition metric per image); ``masks``: the images' true
    masks (boolean). The score lost per kind of image and coverage bin, and the images every run scores 0."""
    cov = coverage_class(masks)
    n = len(ids)
    lost = 1.0 - scores
    kinds = {"empty truth, salt predicted": np.broadcast_to(cov == 0, scores.shape),
             "salt, scored 0": (cov > 0) & (scores == 0),
             "salt, partly right": (cov > 0) & (scores > 0)}
    per_run = [{"file": f, "score": round(float(scores[k].mean()), 4),
                **{kind: round(float(lost[k][m[k]].sum() / n), 4) for kind, m in kinds.items()}}
               for k, f in enumerate(files)]
    by_bin = []
    for c, label in enumerate(COVERAGE_LABELS):
        sel = cov == c
        mean = round(float(scores[:, sel].mean()), 4) if sel.any() else None
        by_bin.append({"bin": label, "n": int(sel.sum()), "mean_score": mean,
                       "score_lost_of_all": round(float(lost[:, sel].sum(axis=1).mean() / n), 4),
                       "scored_0_per_run": round(float((scores[:, sel] == 0).sum(axis=1).mean()), 1),
                       "scored_0_by_every_run": int((scores[:, sel] == 0).all(axis=0).sum())})
    always = (scores == 0).all(axis=0)
    stripe = stripe_masks(masks)  # the "vertical" label artefact (train.drop_stripe_masks)
    return {
        "runs": len(scores), "images": n,
        "mean_score": round(float(scores.mean()), 4),
        "lost_per_run_mean": {kind: round(float(np.mean([r[kind] for r in per_run])), 4) for kind in kinds},
        "per_run": per_run, "by_coverage": by_bin,
        "stripe_masks": {"n": int(stripe.sum()),
                         "mean_score": round(float(scores[:, stripe].mean()), 4) if stripe.any() else None,
                         "score_lost_of_all": round(float(lost[:, stripe].sum(axis=1).mean() / n), 4),
                         "scored_0_per_run": round(float((scores[:, stripe] == 0).sum(axis=1).mean()), 1)},
        "scored_0_by_every_run": {"images": int(always.sum()),
                                  "score_they_cost": round(float(always.sum() / n), 4),
                                  "empty_truth": int((always & (cov == 0)).sum()),
                                  "with_salt": [{"id": ids[i], "coverage": round(float(masks[i].mean()), 3)}
                                                for i in np.flatnonzero(always & (cov > 0))]},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--score", default="default", choices=("default", "nested", "policy"),
                   help="which kept scores: at threshold 0.5, nested, or with the choice of post-processing held out")
    a = p.parse_args()
    try:
        runs = [recorded_scores(json.loads(r.read_text()), str(r), "record it with bench/record_run.py")
                for r in a.results]
    except (OSError, json.JSONDecodeError, UserError) as e:
        raise SystemExit(f"error: {e}") from None
    ids = runs[0]["ids"]
    for r, path in zip(runs, a.results, strict=True):
        if r["ids"] != ids:
            raise SystemExit(f"error: {path}: other held-out images than {a.results[0]}")
        if a.score not in r:  # results recorded before the choice's own held-out score was kept
            raise SystemExit(f"error: {path}: keeps no per-image '{a.score}' scores; use --score default or nested")
    train = load_train(a.data_dir)
    index = {i: k for k, i in enumerate(train.ids)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise SystemExit(f"error: {len(missing)} held-out ids are not train images of {a.data_dir}, e.g. {missing[0]}")
    masks = train.masks[[index[i] for i in ids]] > 0
    result = summarize(ids, np.array([r[a.score] for r in runs], dtype=float), masks, [str(r) for r in a.results])
    result["scores"] = a.score
    print(f"{result['runs']} runs, {result['images']} images, mean score {result['mean_score']:.4f} ({a.score})")
    for kind, v in result["lost_per_run_mean"].items():
        print(f"  lost on {kind}: {v:.4f}")
    for b in (b for b in result["by_coverage"] if b["n"]):
        print(f"  {b['bin']:>8}: n {b['n']:3d}, score {b['mean_score']:.3f}, lost {b['score_lost_of_all']:.4f}, "
              f"scored 0 {b['scored_0_per_run']:.1f} per run, by every run {b['scored_0_by_every_run']}")
    st = result["stripe_masks"]
    if st["n"]:
        print(f"  stripe masks (every column all salt or all empty): n {st['n']}, score {st['mean_score']:.3f}, "
              f"lost {st['score_lost_of_all']:.4f}, scored 0 {st['scored_0_per_run']:.1f} per run")
    s = result["scored_0_by_every_run"]
    print(f"  scored 0 by every run: {s['images']} images ({s['empty_truth']} empty), {s['score_they_cost']:.4f} of the score")
    save(f"systematic_errors_{a.name}", result, echo=False)


if __name__ == "__main__":
    main()
