"""Does tuning the post-processing on out-of-fold predictions help on images it was not tuned on?

    python bench/postprocess_tuning.py NAME RUN_DIR [RUN_DIR ...] --data-dir D [--splits 4]

For each finished run (its OOF predictions and classifier outputs), the held-out images are split
in two halves at random (``--splits`` different splits; the folds themselves when the run has
several): each half is scored with the post-processing tuned on the other half. Strategies tune
more or less of it — threshold, minimum area, classifier cut — against the untuned default
(threshold 0.5, no minimum area, the classifier's cut at 0.5). A strategy that loses held out
should not be applied to the test set (``postprocess.tune: auto`` applies the full tuning only
where it wins, run by run).

The "smoothed" strategies pick the maximum of the mean score after averaging it over neighbouring
grid points (a box of 3 classifier cuts x 3 minimum areas x 11 thresholds, edges repeated): on 300
images the unsmoothed maximum is often one of many exact ties, and a lone peak is more likely
noise than a plateau is. Writes ``bench/results/NAME.json``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
from common import save
from scipy.ndimage import uniform_filter

from tgs_salt.compare import pooled_t
from tgs_salt.metric import per_image_scores
from tgs_salt.postprocess import (
    TUNE_PARAMS,
    PostProcess,
    ScoreTable,
    apply,
    best_on,
    nested_scores,
    policy_scores,
    score_table,
)
from tgs_salt.report import oof_with_truth, read_run

# name: (classifier cuts searched, minimum areas searched (None: the config's), thresholds searched,
#        smoothing box over (classifier cut, minimum area, threshold) or None)
FULL = "threshold + min area + classifier cut (the full tuning)"
STRATEGIES = {
    FULL: ("all", None, "all", None),
    "threshold + classifier cut": ("all", [0], "all", None),
    "threshold only": ([0.5], [0], "all", None),
    "classifier cut only": ("all", [0], [0.5], None),
    "the full tuning, smoothed": ("all", None, "all", (3, 3, 11)),
    "threshold only, smoothed": ([0.5], [0], "all", (1, 1, 11)),
}

# postprocess.tune_params values whose shipped policy (tune: auto, choice held out) is compared
# (named as in STRATEGIES, whose nested choices they must repeat)
POLICIES = {FULL: list(TUNE_PARAMS), "classifier cut only": ["cls_cut"]}


def policy_of(cfg: dict, params: list, probs, truth, cls, splits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image scores, averaged over ``splits`` random halvings, of the shipped ``tune: auto`` policy
    (postprocess.policy_scores) and of the nested tuning, with ``postprocess.tune_params`` = ``params``."""
    c = copy.deepcopy(cfg)
    c["postprocess"].update(tune="auto", tune_params=params)
    table = score_table(probs, truth, c, cls)
    pol, nest = np.zeros(len(probs)), np.zeros(len(probs))
    for seed in range(splits):
        halves = np.random.default_rng(seed).permutation(len(probs)) % 2
        pol += policy_scores(probs, truth, c, halves, cls, table)[0] / splits
        nest += nested_scores(probs, truth, c, halves, cls, table)[0] / splits
    return pol, nest


def pooled_gain(d: np.ndarray) -> dict:
    """Mean of per-run, per-image gains ``d`` (runs x images) with a t interval counting runs and images."""
    gain, per_run, _, _, _, (lo, hi, _) = pooled_t(d)
    return {"gain": round(gain, 6), "ci95": [round(lo, 6), round(hi, 6)],
            "per_run": [round(float(g), 6) for g in per_run]}


def best_of(table: ScoreTable, grids: np.ndarray, spec) -> PostProcess:
    """The best post-processing a strategy allows, on ``grids`` (:meth:`ScoreTable.grids`)."""
    cuts, allowed_areas, allowed_th, box = spec
    cut_values = table.cuts()
    ok_c = np.array([cuts == "all" or c is None or c in cuts for c in cut_values])
    ok_a = np.ones(len(table.areas), bool) if allowed_areas is None else np.isin(table.areas, allowed_areas)
    ok_t = np.ones(len(table.th), bool) if allowed_th == "all" else np.isin(table.th, allowed_th)
    # the box averages over the allowed points only (a strategy that fixes an axis does not smooth along it)
    g = grids[np.ix_(ok_c, ok_a, ok_t)]
    if box is not None:
        g = uniform_filter(g, size=[min(b, n) for b, n in zip(box, g.shape)], mode="nearest")
    c, a, k = best_on(g)
    cut = [x for x, ok in zip(cut_values, ok_c) if ok][c]
    return PostProcess(float(table.th[ok_t][k]), int(table.areas[ok_a][a]), None if cut is None else float(cut))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("runs", nargs="+")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--splits", type=int, default=4)
    a = p.parse_args()
    rows, gains = [], []  # gains: per run, each strategy's per-image gain over the untuned default
    policies = {name: [] for name in POLICIES}  # per run, the policy's per-image gain over the untuned default
    for run in a.runs:
        cfg, _ = read_run(Path(run))
        _, probs, cls, data, idx = oof_with_truth([Path(run)], np.ones(1), Path(a.data_dir))
        truth = data.masks[idx]
        table = score_table(probs, truth, cfg, cls)
        assert 0.5 in table.th and 0 in table.areas, "the default (0.5, no minimum area) must be on the grid"
        default = PostProcess(0.5, 0, None if cls is None else 0.5)
        at_default = per_image_scores(apply(probs, default, cls=cls), truth)
        per = {name: [] for name in STRATEGIES}
        per_image = {name: np.zeros(len(probs)) for name in STRATEGIES}
        for seed in range(a.splits):
            halves = np.random.default_rng(seed).permutation(len(probs)) % 2
            scores = {name: np.empty(len(probs)) for name in STRATEGIES}
            for g in (0, 1):
                out, fit = halves == g, halves != g
                grids = table.grids(fit)
                for name, spec in STRATEGIES.items():
                    pp = best_of(table, grids, spec)
                    scores[name][out] = per_image_scores(apply(probs[out], pp, cls=None if cls is None else cls[out]),
                                                         truth[out])
            for name in STRATEGIES:
                per[name].append(round(float(scores[name].mean()), 6))
                per_image[name] += scores[name] / a.splits
        s_default = float(at_default.mean())
        for name, params in POLICIES.items():
            pol, nest = policy_of(cfg, params, probs, truth, cls, a.splits)
            # the shipped search restricted by tune_params makes the bench strategy's choices
            assert np.allclose(nest, per_image[name]), name
            policies[name].append(pol - at_default)
        rows.append({"run": Path(run).name, "n_images": len(probs), "untuned": round(s_default, 6),
                     "nested_by_split": per,
                     "gain_vs_untuned": {k: round(float(np.mean(v)) - s_default, 6) for k, v in per.items()}})
        gains.append({k: v - at_default for k, v in per_image.items()})
        print(Path(run).name, "untuned", round(s_default, 4),
              {k[:28]: round(float(np.mean(v)) - s_default, 4) for k, v in per.items()}, flush=True)
    summary = {k: round(float(np.mean([r["gain_vs_untuned"][k] for r in rows])), 6) for k in STRATEGIES}
    against_full = {}
    for k in list(STRATEGIES)[1:]:  # each strategy against the full tuning, the runs as a sample (t_interval)
        against_full[k] = pooled_gain(np.stack([g[k] - g[FULL] for g in gains]))
        r = against_full[k]
        print(f"{k}: {r['gain']:+.4f} ({r['ci95'][0]:+.4f} … {r['ci95'][1]:+.4f}) against the full tuning", flush=True)
    policy = {f"{k}: policy against untuned": pooled_gain(np.stack(v)) for k, v in policies.items()}
    base, *others = POLICIES
    for k in others:
        policy[f"{k}: policy against the full tuning's policy"] = pooled_gain(
            np.stack([o - b for o, b in zip(policies[k], policies[base])]))
    for k, r in policy.items():
        print(f"{k}: {r['gain']:+.4f} ({r['ci95'][0]:+.4f} … {r['ci95'][1]:+.4f})", flush=True)
    save(a.name, {"splits": a.splits, "how": "each half of the held-out images scored with the post-processing "
                  "tuned on the other half, against the untuned default (0.5, no min area, classifier cut 0.5)",
                  "mean_gain_vs_untuned": summary,
                  "gain_vs_full_tuning": against_full,
                  "policy": {"how": "postprocess.tune auto (the tuned post-processing applied where its nested score "
                             "beats the untuned one on the other half) with postprocess.tune_params restricted, each "
                             "half scored with what the other half chose (policy_scores), averaged over the splits",
                             **policy},
                  "runs": rows}, echo=False)
    print("mean gain of tuning, held out:", summary)


if __name__ == "__main__":
    main()
