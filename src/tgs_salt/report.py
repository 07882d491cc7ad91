"""Cross-validation report: OOF score overall, per fold and per coverage bin, tuned
post-processing, pixel IoU and Dice; cv.json and PNG plots."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import yaml

from tgs_salt import paths
from tgs_salt.data.folds import coverage_class, folds_for
from tgs_salt.errors import UserError
from tgs_salt.io_utils import atomic_path, write_json_atomic
from tgs_salt.metric import per_image_scores
from tgs_salt.postprocess import apply, tune

log = logging.getLogger(__name__)
COVERAGE_LABELS = ["empty"] + [f"{10 * i}-{10 * (i + 1)}%" for i in range(10)]


def read_run(run_dir: Path) -> tuple[dict, dict]:
    run_dir = Path(run_dir)
    cfg_path, facts_path = run_dir / "config.yaml", run_dir / "run.json"
    if not cfg_path.exists() or not facts_path.exists():
        raise UserError(f"{run_dir} is not a training run directory (no config.yaml/run.json); "
                        "train first with `python -m tgs_salt train --config ...`")
    return yaml.safe_load(cfg_path.read_text()), json.loads(facts_path.read_text())


def expected_folds(cfg: dict) -> list[int]:
    tf = cfg["folds"]["train_folds"]
    return list(tf) if tf is not None else list(range(cfg["folds"]["k"]))


def parse_weights(weights: str | None, n: int) -> np.ndarray:
    if not weights:
        return np.full(n, 1.0 / n)
    try:
        w = np.array([float(x) for x in weights.split(",")])
    except ValueError:
        raise UserError(f"--weights {weights!r}: expected comma-separated numbers") from None
    if len(w) != n or (w < 0).any() or w.sum() <= 0:
        raise UserError(f"--weights needs {n} non-negative numbers (one per --run-dir), got {weights!r}")
    return w / w.sum()


def load_oof(run_dirs: list[Path], weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of the runs' OOF probabilities, by id (ids sorted)."""
    ids_ref, acc = None, None
    for run_dir, w in zip(run_dirs, weights):
        cfg, _ = read_run(run_dir)
        parts_ids, parts_probs = [], []
        for k in expected_folds(cfg):
            f = Path(run_dir) / f"fold{k}" / "oof.npz"
            if not f.exists():
                raise UserError(f"{run_dir}: fold {k} has no out-of-fold predictions ({f}); train it with "
                                f"`python -m tgs_salt train --config {run_dir}/config.yaml --run-dir {run_dir} "
                                f"--fold {k}`")
            with np.load(f) as z:
                parts_ids.append(z["ids"])
                parts_probs.append(z["probs"])
        ids = np.concatenate(parts_ids)
        probs = np.concatenate(parts_probs)
        order = np.argsort(ids)
        ids, probs = ids[order], probs[order]
        if ids_ref is None:
            ids_ref, acc = ids, probs.astype(np.float32) * w
        else:
            if not np.array_equal(ids, ids_ref):
                raise UserError(f"{run_dir} has out-of-fold predictions for other images than {run_dirs[0]}; "
                                "runs to ensemble must cover the same folds")
            acc += probs.astype(np.float32) * w
    return ids_ref, acc


def oof_with_truth(run_dirs: list[Path], weights: np.ndarray, data_dir: Path):
    """The ensemble's OOF (ids, probs), the train set, and each OOF id's row in it."""
    from tgs_salt.data import load_train

    ids, probs = load_oof(run_dirs, weights)
    data = load_train(data_dir)
    index = {i: k for k, i in enumerate(data.ids)}
    unknown = [i for i in ids if i not in index]
    if unknown:
        raise UserError(f"out-of-fold id {unknown[0]} is not in {data_dir}; pass the data the runs were trained on")
    return ids, probs, data, np.array([index[i] for i in ids])


def output_dir(run_dirs: list[Path]) -> Path:
    if len(run_dirs) == 1:
        return Path(run_dirs[0])
    return paths.runs_dir() / ("ensemble-" + "+".join(Path(r).name for r in run_dirs))


def cv_report(run_dirs: list[Path], data_dir: Path | None = None, weights: str | None = None,
              plots: bool = True) -> dict:
    run_dirs = [Path(r) for r in run_dirs]
    w = parse_weights(weights, len(run_dirs))
    cfg, facts = read_run(run_dirs[0])
    data_dir = Path(data_dir) if data_dir else Path(facts["data_dir"])
    ids, probs, data, rows = oof_with_truth(run_dirs, w, data_dir)
    truth, images = data.masks[rows], data.images[rows]
    fold_file = Path(facts["fold_file"])
    folds = folds_for(data.ids, fold_file)[rows]
    best, sweep = tune(probs, truth, cfg)
    pred = apply(probs, best)
    scores = per_image_scores(pred, truth)
    cov = coverage_class(truth)
    inter = np.logical_and(pred, truth).sum()
    psum, tsum = pred.sum(), truth.sum()
    empty = ~truth.any(axis=(1, 2))
    result = {
        "runs": [str(r) for r in run_dirs], "weights": w.round(6).tolist(), "data_dir": str(data_dir),
        "n_images": len(ids), "folds": sorted(int(f) for f in np.unique(folds)),
        "score_default_threshold": round(sweep["score_default"], 6),
        "default_threshold": sweep["default"].threshold,
        "threshold": best.threshold, "min_area": best.min_area,
        "score": round(float(scores.mean()), 6),
        "all_empty_score": round(float(empty.mean()), 6),
        "per_fold": {int(f): round(float(scores[folds == f].mean()), 6) for f in np.unique(folds)},
        "per_coverage": [{"bin": COVERAGE_LABELS[c], "n": int((cov == c).sum()),
                          "score": round(float(scores[cov == c].mean()), 6) if (cov == c).any() else None}
                         for c in range(11)],
        "pixel_iou": round(float(inter / max(psum + tsum - inter, 1)), 6),
        "dice": round(float(2 * inter / max(psum + tsum, 1)), 6),
        "empty_accuracy": round(float((pred.any(axis=(1, 2)) == ~empty).mean()), 6),
    }
    out = output_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "cv.json", result)
    if plots:
        make_plots(out / "plots", run_dirs, sweep, result, probs, truth, images, pred, scores, ids)
    return result


def print_report(r: dict) -> None:
    print(f"CV over {r['n_images']} OOF images, folds {r['folds']} ({', '.join(Path(x).name for x in r['runs'])})")
    print(f"  threshold {r['default_threshold']:.2f}, no min area : {r['score_default_threshold']:.4f}")
    print(f"  tuned: threshold {r['threshold']:.3f}, min area {r['min_area']:>4d}: {r['score']:.4f}")
    print(f"  all-empty baseline: {r['all_empty_score']:.4f}   pixel IoU {r['pixel_iou']:.4f}   "
          f"Dice {r['dice']:.4f}   empty/non-empty accuracy {r['empty_accuracy']:.4f}")
    print("  per fold: " + "  ".join(f"{k}: {v:.4f}" for k, v in r["per_fold"].items()))
    print("  per coverage bin:")
    for b in r["per_coverage"]:
        s = "   -  " if b["score"] is None else f"{b['score']:.4f}"
        print(f"    {b['bin']:>8s}  n={b['n']:>5d}  {s}")
    print(f"CV score: {r['score']:.4f}")


def cv_command(args) -> int:
    r = cv_report([Path(p) for p in args.run_dir], Path(args.data_dir) if args.data_dir else None,
                  args.weights, plots=not args.no_plots)
    print_report(r)
    print(output_dir([Path(p) for p in args.run_dir]) / "cv.json")
    return 0


# ----------------------------------------------------------------------------- plots

def _savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def make_plots(out: Path, run_dirs, sweep, result, probs, truth, images, pred, scores, ids) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    # score against threshold
    fig, ax = plt.subplots(figsize=(6, 4))
    th, areas, grid = sweep["thresholds"], sweep["min_areas"], sweep["grid"]
    a_best = int(np.argmax(grid.max(axis=1)))
    ax.plot(th, grid[0], label=f"min area {areas[0]}")
    if a_best:
        ax.plot(th, grid[a_best], label=f"min area {areas[a_best]} (best)")
    ax.axvline(result["threshold"], color="k", ls="--", lw=0.8)
    ax.axhline(result["all_empty_score"], color="grey", ls=":", label="all empty")
    ax.set(xlabel="binarisation threshold", ylabel="competition score (OOF)",
           title=f"best {result['score']:.4f} at {result['threshold']:.2f}")
    ax.legend()
    _savefig(fig, out / "score_vs_threshold.png")
    # by coverage
    fig, ax = plt.subplots(figsize=(8, 4))
    bins = result["per_coverage"]
    ax.bar(range(len(bins)), [b["score"] or 0 for b in bins], color="tab:blue")
    for i, b in enumerate(bins):
        ax.text(i, (b["score"] or 0) + 0.01, f"n={b['n']}", ha="center", fontsize=7)
    ax.set_xticks(range(len(bins)), [b["bin"] for b in bins], rotation=45)
    ax.set(ylim=(0, 1.08), ylabel="competition score", title="OOF score by salt coverage")
    _savefig(fig, out / "score_by_coverage.png")
    # pixel precision-recall
    from sklearn.metrics import auc, precision_recall_curve

    rng = np.random.default_rng(0)
    flat_p, flat_t = probs.reshape(-1), truth.reshape(-1)
    take = rng.choice(flat_p.size, size=min(flat_p.size, 2_000_000), replace=False)
    prec, rec, _ = precision_recall_curve(flat_t[take], flat_p[take].astype(np.float32))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(rec, prec)
    ax.set(xlabel="recall", ylabel="precision", title=f"pixel PR curve (AUC {auc(rec, prec):.3f})",
           xlim=(0, 1), ylim=(0, 1.01))
    _savefig(fig, out / "pixel_pr_curve.png")
    # training curves
    logs = []
    for r in run_dirs:
        for f in sorted(Path(r).glob("fold*/log.csv")):
            with open(f, newline="") as fh:
                logs.append((f"{Path(r).name}/{f.parent.name}", list(csv.DictReader(fh))))
    if logs:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for name, rows in logs:
            e = [int(x["epoch"]) + 1 for x in rows]
            axes[0].plot(e, [float(x["train_loss"]) for x in rows], label=name)
            axes[1].plot(e, [float(x["val_loss"]) for x in rows], label=name)
            axes[2].plot(e, [float(x["val_metric"]) for x in rows], label=name)
        for ax, t in zip(axes, ["train loss", "validation loss", "validation metric (threshold 0.5)"]):
            ax.set(title=t, xlabel="epoch")
        axes[2].legend(fontsize=7)
        _savefig(fig, out / "training_curves.png")
    # worst predictions
    n = min(12, len(scores))
    area = truth.reshape(len(truth), -1).sum(1) + pred.reshape(len(pred), -1).sum(1)
    worst = np.lexsort((-area, scores))[:n]
    cols = 6
    rows_n = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(2.2 * cols, 2.4 * rows_n), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), worst):
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        if truth[i].any():
            ax.contour(truth[i], levels=[0.5], colors="lime", linewidths=1)
        if pred[i].any():
            ax.contour(pred[i], levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"{ids[i]}\nscore {scores[i]:.2f}", fontsize=7)
    fig.suptitle("worst OOF predictions (green: truth, red: prediction)", fontsize=9)
    _savefig(fig, out / "worst_predictions.png")
