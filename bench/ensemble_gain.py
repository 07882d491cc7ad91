"""What does averaging models buy on the same held-out images, and is it worth its compute?

    python bench/ensemble_gain.py NAME --data-dir D --reference RUN \\
        --ensemble LABEL RUN RUN [...] [--ensemble LABEL RUN RUN ...]

Every run must hold out the same images (same folds file and fold). Each ensemble averages its
members' out-of-fold probabilities (and classifier outputs) with equal weights, as the fold
ensemble averages test predictions. Reported for each ensemble, at the default threshold and with
nested post-processing (tuned on the other groups of images, as ``compare`` does): its members'
scores, and its paired gain over the mean of its members (what averaging adds) and over the
reference run (e.g. one model trained with all the compute the ensemble's members shared), each
with a 95% bootstrap interval over images (``tgs_salt.compare.paired``). Writes
``bench/results/NAME.json``.

The mission's "K folds at 1/K of the time each" cannot be scored out-of-fold as an ensemble (each
image is held out by one fold only); K models of the same fold at 1/K of the time each, differing
by seed, stand in for it: the same compute, the same number of models, members as diverse or less.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import save

from tgs_salt.compare import paired, per_image


def scores(runs: list[Path], data_dir: Path) -> dict:
    """Per-image scores of the equal-weight average of ``runs``, as :func:`paired` takes them."""
    ids, default, nested, how = per_image(runs, data_dir)
    return {"ids": ids, "default": default, "nested": np.asarray(nested, dtype=float), "nested_method": how}


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
           "n_images": len(ref["ids"]), "nested_groups": ref["nested_method"], "ensembles": []}
    for label, *runs in a.ensemble:
        runs = [Path(r) for r in runs]
        members = [scores([r], a.data_dir) for r in runs]
        ens = scores(runs, a.data_dir)
        mean_member = {**ens, **{k: np.mean([m[k] for m in members], axis=0) for k in ("default", "nested")}}
        row = {"label": label, "members": [r.name for r in runs],
               "member_scores": {k: [round(float(m[k].mean()), 6) for m in members] for k in ("default", "nested")},
               "gain_over_mean_member": paired(mean_member, ens), "gain_over_reference": paired(ref, ens)}
        out["ensembles"].append(row)
        print(label, {k: (row["gain_over_reference"][k]["other"], row["gain_over_mean_member"][k]["gain"],
                          row["gain_over_reference"][k]["gain"]) for k in ("default_threshold", "nested")}, flush=True)
    save(a.name, out, echo=False)


if __name__ == "__main__":
    main()
