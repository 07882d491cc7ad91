"""What does averaging models buy on the same held-out images, and is it worth its compute?

    python bench/ensemble_gain.py NAME --data-dir D --reference RUN \\
        --ensemble LABEL RUN RUN [...] [--ensemble LABEL RUN RUN ...]

Every run must hold out the same images (same folds file and fold). Each ensemble averages its
members' out-of-fold probabilities (and classifier outputs) with equal weights, as the fold
ensemble averages test predictions. Reported for each ensemble, at the default threshold and with
nested post-processing (tuned on the other groups of images, as ``compare`` does): its members'
scores, its own, its paired gain over the mean of its members (what averaging adds) and over the
reference run (e.g. one model trained with all the compute the ensemble's members shared), each
with a 95% bootstrap interval over images. Writes ``bench/results/NAME.json``.

The mission's "K folds at 1/K of the time each" cannot be scored out-of-fold as an ensemble (each
image is held out by one fold only); K models of the same fold at 1/K of the time each, differing
by seed, stand in for it: the same compute, the same number of models, members as diverse or less.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import save

from tgs_salt.compare import bootstrap_interval
from tgs_salt.data.folds import folds_for
from tgs_salt.metric import per_image_scores
from tgs_salt.postprocess import apply, nested_scores, split_groups, untuned
from tgs_salt.report import oof_with_truth, read_run


def scores(runs: list[Path], data_dir: Path) -> dict:
    """Per-image scores of the equal-weight average of ``runs`` (default threshold and nested)."""
    cfg, facts = read_run(runs[0])
    ids, probs, cls, data, rows = oof_with_truth(runs, np.full(len(runs), 1 / len(runs)), data_dir)
    truth = data.masks[rows]
    groups, how = split_groups(folds_for(data.ids, Path(facts["fold_file"]))[rows])
    nested, _ = nested_scores(probs, truth, cfg, groups, cls)
    return {"ids": ids, "default": per_image_scores(apply(probs, untuned(cfg, cls is not None), cls=cls), truth),
            "nested": np.asarray(nested, dtype=float), "how": how}


def gain(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.asarray(b, float) - np.asarray(a, float)
    lo, hi = bootstrap_interval(d)
    return {"mean": round(float(d.mean()), 6), "ci95": [round(lo, 6), round(hi, 6)]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--reference", required=True, type=Path)
    p.add_argument("--ensemble", nargs="+", action="append", required=True, metavar="LABEL RUN",
                   help="a label, then two or more run directories")
    a = p.parse_args()
    ref = scores([a.reference], a.data_dir)
    out = {"reference": {"run": a.reference.name, "default": round(float(ref["default"].mean()), 6),
                         "nested": round(float(ref["nested"].mean()), 6)},
           "n_images": len(ref["ids"]), "nested_groups": ref["how"], "ensembles": []}
    for label, *runs in a.ensemble:
        runs = [Path(r) for r in runs]
        members = [scores([r], a.data_dir) for r in runs]
        ens = scores(runs, a.data_dir)
        for s in [*members, ens]:
            if not np.array_equal(s["ids"], ref["ids"]):
                raise SystemExit(f"{label}: the runs do not hold out the same images as {a.reference}")
        row = {"label": label, "members": [r.name for r in runs]}
        for key in ("default", "nested"):
            mean_member = np.mean([m[key] for m in members], axis=0)
            row[key] = {"members": [round(float(m[key].mean()), 6) for m in members],
                        "ensemble": round(float(ens[key].mean()), 6),
                        "gain_over_mean_member": gain(mean_member, ens[key]),
                        "gain_over_reference": gain(ref[key], ens[key])}
        out["ensembles"].append(row)
        print(label, {k: (row[k]["ensemble"], row[k]["gain_over_mean_member"]["mean"],
                          row[k]["gain_over_reference"]["mean"]) for k in ("default", "nested")}, flush=True)
    save(a.name, out, echo=False)


if __name__ == "__main__":
    main()
