"""Cross-validation report: OOF score overall, per fold and per coverage bin, tuned
post-processing, pixel IoU and Dice; cv.json and PNG plots."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import yaml

from tgs_salt import budget as B
from tgs_salt import config as C
from tgs_salt import paths
from tgs_salt.data.folds import coverage_class, folds_for
from tgs_salt.errors import UserError
from tgs_salt.io_utils import atomic_path, sha1_of, write_json_atomic
from tgs_salt.metric import per_image_scores
from tgs_salt.postprocess import apply, decide, split_groups
from tgs_salt.rundir import RunDir

log = logging.getLogger(__name__)
COVERAGE_LABELS = ["empty"] + [f"{10 * i}-{10 * (i + 1)}%" for i in range(10)]


def read_run(run_dir: Path) -> tuple[dict, dict]:
    run_dir = Path(run_dir)
    cfg_path, facts_path = run_dir / "config.yaml", run_dir / "run.json"
    if not cfg_path.exists() or not facts_path.exists():
        raise UserError(f"{run_dir} is not a training run directory (no config.yaml/run.json); "
                        "train first with `python -m tgs_salt train --config ...`")
    # the encoder and the views its OOF passes used and its prediction uses: a time plan may have chosen
    # model.larger_encoder and dropped the shift views
    cfg = B.planned(C.for_reading(yaml.safe_load(cfg_path.read_text())), B.read_plan(run_dir))
    return cfg, json.loads(facts_path.read_text())


def run_fold_file(facts: dict) -> Path:
    """The fold file a run was trained on: the path it recorded, or, when that is gone (a run directory
    moved from another checkout or machine), the file of the same name in this checkout's folds/ if it
    is the same file (its SHA-1 recorded at training)."""
    recorded = Path(facts["fold_file"])
    if recorded.exists():
        return recorded
    here = paths.folds_dir() / recorded.name
    if here.exists() and sha1_of(here) == facts.get("folds_sha1"):
        return here
    found = f"; {here} differs from it" if here.exists() else ""
    raise UserError(f"fold file {recorded}, on which the run was trained, does not exist{found}; put that file at "
                    f"{here} (or at its old path) so its folds can be scored")


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


def load_oof(run_dirs: list[Path], weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Weighted mean of the runs' OOF probabilities by id (ids sorted), and of their salt
    probabilities when every run has a classifier (else None)."""
    ids_ref, acc, acc_cls = None, None, 0.0
    for run_dir, w in zip(run_dirs, weights):
        cfg, _ = read_run(run_dir)
        parts_ids, parts_probs, parts_cls = [], [], []
        for k in expected_folds(cfg):
            f = RunDir(run_dir).oof(k)
            if not f.exists():
                raise UserError(f"{run_dir}: fold {k} has no out-of-fold predictions ({f}); train it with "
                                f"`python -m tgs_salt train --config {run_dir}/config.yaml --run-dir {run_dir} "
                                f"--fold {k}`")
            with np.load(f) as z:
                parts_ids.append(z["ids"])
                parts_probs.append(z["probs"])
                parts_cls.append(z["cls"] if "cls" in z.files else None)
        ids = np.concatenate(parts_ids)
        probs = np.concatenate(parts_probs)
        order = np.argsort(ids)
        ids, probs = ids[order], probs[order]
        if acc_cls is not None and all(c is not None for c in parts_cls):
            acc_cls = acc_cls + np.concatenate(parts_cls)[order].astype(np.float32) * w
        else:
            acc_cls = None
        if ids_ref is None:
            ids_ref, acc = ids, probs.astype(np.float32) * w
        else:
            if not np.array_equal(ids, ids_ref):
                raise UserError(f"{run_dir} has out-of-fold predictions for other images than {run_dirs[0]}; "
                                "runs to ensemble must cover the same folds")
            acc += probs.astype(np.float32) * w
    return ids_ref, acc, acc_cls


def oof_with_truth(run_dirs: list[Path], weights: np.ndarray, data_dir: Path):
    """The ensemble's OOF (ids, probs, salt probabilities or None), the train set, and each OOF
    id's row in it."""
    from tgs_salt.data import load_train

    ids, probs, cls = load_oof(run_dirs, weights)
    data = load_train(data_dir)
    index = {i: k for k, i in enumerate(data.ids)}
    unknown = [i for i in ids if i not in index]
    if unknown:
        raise UserError(f"out-of-fold id {unknown[0]} is not in {data_dir}; pass the data the runs were trained on")
    return ids, probs, cls, data, np.array([index[i] for i in ids])


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
    ids, probs, cls, data, rows = oof_with_truth(run_dirs, w, data_dir)
    truth, images = data.masks[rows], data.images[rows]
    fold_file = run_fold_file(facts)
    folds = folds_for(data.ids, fold_file)[rows]
    groups, nested_how = split_groups(folds)
    applied, how = decide(probs, truth, cfg, groups, cls)
    best, sweep, nested, nested_pp = how["tuned"], how["sweep"], how["nested"], how["nested_postprocess"]
    pred = apply(probs, applied, cls=cls)  # the breakdowns below describe what the test set gets
    scores = per_image_scores(pred, truth)
    cov = coverage_class(truth)
    inter = np.logical_and(pred, truth).sum()
    psum, tsum = pred.sum(), truth.sum()
    empty = ~truth.any(axis=(1, 2))
    pred_empty = ~pred.any(axis=(1, 2))  # right in the empty bin; a score of 0 in every other
    result = {
        "runs": [str(r) for r in run_dirs], "weights": w.round(6).tolist(), "data_dir": str(data_dir),
        "n_images": len(ids), "folds": sorted(int(f) for f in np.unique(folds)),
        "score_default_threshold": round(sweep["score_default"], 6),
        "default_threshold": sweep["default"].threshold,
        "threshold": best.threshold, "min_area": best.min_area, "cls_threshold": best.cls_threshold,
        "score": round(float(sweep["score_tuned"]), 6),
        "score_nested": round(float(nested.mean()), 6), "nested": nested_how, "nested_postprocess": nested_pp,
        # what predict applies, and its held-out score (nested when tuned, no choice made when untuned)
        "applied": how["applied"], "applied_postprocess": applied.to_dict(), "applied_why": how["why"],
        "score_applied": round(how["score_applied"], 6),
        # the choice itself made held out (postprocess.policy_scores): score_applied is the larger of two
        # scores measured on the same images, so it overstates; this does not
        "score_policy": round(how["score_policy"], 6), "policy_postprocess": how["policy_postprocess"],
        "all_empty_score": round(float(empty.mean()), 6),
        "per_fold": {int(f): round(float(scores[folds == f].mean()), 6) for f in np.unique(folds)},
        "per_coverage": [{"bin": COVERAGE_LABELS[c], "n": int((cov == c).sum()),
                          "score": round(float(scores[cov == c].mean()), 6) if (cov == c).any() else None,
                          "predicted_empty": int((pred_empty & (cov == c)).sum())}
                         for c in range(11)],
        "pixel_iou": round(float(inter / max(psum + tsum - inter, 1)), 6),
        "dice": round(float(2 * inter / max(psum + tsum, 1)), 6),
        "empty_accuracy": round(float((pred_empty == empty).mean()), 6),
    }
    leaky = sorted(f"{Path(r).name}/{d.parent.name}" for r in run_dirs for d in Path(r).glob("fold*/done.json")
                   if json.loads(d.read_text()).get("pseudo_labels", {}).get("leaks_held_out"))
    if leaky:  # see pseudo.py: those folds' held-out images taught the models behind their pseudo-labels
        result["optimistic_pseudo_labels"] = leaky
    out = output_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "cv.json", result)
    if plots:
        make_plots(out / "plots", run_dirs, sweep, result, probs, truth, images, pred, scores, ids)
    return result


def print_report(r: dict) -> None:
    print(f"CV over {r['n_images']} OOF images, folds {r['folds']} ({', '.join(Path(x).name for x in r['runs'])})")
    print(f"  threshold {r['default_threshold']:.2f}, no min area : {r['score_default_threshold']:.4f}")
    cls = "" if r.get("cls_threshold") is None else f", empty below salt prob {r['cls_threshold']:.2f}"
    print(f"  tuned: threshold {r['threshold']:.3f}, min area {r['min_area']:>4d}{cls}: {r['score']:.4f} "
          "(tuned and scored on the same images)")
    print(f"  nested: {r['score_nested']:.4f} ({r['nested']})")
    if "applied" in r:
        print(f"  applied to the test set: {r['applied']} post-processing ({r['applied_why']}); "
              f"held-out score {r['score_applied']:.4f}")
    if "score_policy" in r:
        print(f"  the choice made held out too (each group gets what the other groups pick): {r['score_policy']:.4f}")
    print(f"  all-empty baseline: {r['all_empty_score']:.4f}   pixel IoU {r['pixel_iou']:.4f}   "
          f"Dice {r['dice']:.4f}   empty/non-empty accuracy {r['empty_accuracy']:.4f}")
    what = f" ({r['applied']} post-processing)" if "applied" in r else ""
    print(f"  per fold{what}: " + "  ".join(f"{k}: {v:.4f}" for k, v in r["per_fold"].items()))
    print(f"  per coverage bin{what}; an empty prediction is right in the empty bin, scores 0 in the others:")
    for b in r["per_coverage"]:
        s = "   -  " if b["score"] is None else f"{b['score']:.4f}"
        e = f"  predicted empty {b['predicted_empty']:>4d}" if "predicted_empty" in b else ""  # older cv.json: absent
        print(f"    {b['bin']:>8s}  n={b['n']:>5d}  {s}{e}")
    if r.get("optimistic_pseudo_labels"):
        print(f"  OPTIMISTIC: {', '.join(r['optimistic_pseudo_labels'])} trained on pseudo-labels from models that "
              "had seen their held-out images")
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


def machine_label(run_dir: Path) -> str:
    """Which machine a run's figures came from (CPU kind or GPU, and the precision used)."""
    try:
        p = json.loads((Path(run_dir) / "precision.json").read_text())
    except (OSError, ValueError):
        return "machine not recorded"
    from tgs_salt.hardware import Precision

    where = p.get("gpu") or f"{p.get('cpu', 'CPU')} ({p.get('cpu_kind', '?')}, {p.get('threads', '?')} threads)"
    return f"{where}, {Precision.from_dict(p['precision']).name}"


def make_plots(out: Path, run_dirs, sweep, result, probs, truth, images, pred, scores, ids) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    machine = machine_label(run_dirs[0])
    # score against threshold, the chosen point marked
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    th, areas, grid = sweep["thresholds"], sweep["min_areas"], sweep["grid"]
    a_best = int(np.argmax(grid.max(axis=1)))
    ax.plot(th, grid[0], label=f"min area {areas[0]}")
    if a_best:
        ax.plot(th, grid[a_best], label=f"min area {areas[a_best]} (chosen)")
    ax.plot([result["threshold"]], [result["score"]], "o", color="k", ms=7,
            label=f"chosen: {result['threshold']:.2f}, min area {result['min_area']} -> {result['score']:.4f}")
    ax.plot([result["default_threshold"]], [result["score_default_threshold"]], "s", color="tab:orange", ms=6,
            label=f"default {result['default_threshold']:.2f} -> {result['score_default_threshold']:.4f}")
    ax.axhline(result["all_empty_score"], color="grey", ls=":", label="all empty")
    ax.set(xlabel="binarisation threshold", ylabel="competition score (OOF)", title="OOF score against threshold")
    ax.legend(fontsize=7)
    fig.text(0.01, -0.02, machine, fontsize=6, color="grey")
    _savefig(fig, out / "score_vs_threshold.png")
    # by coverage
    fig, ax = plt.subplots(figsize=(8, 4))
    bins = result["per_coverage"]
    ax.bar(range(len(bins)), [b["score"] or 0 for b in bins], color="tab:blue")
    for i, b in enumerate(bins):
        ax.text(i, (b["score"] or 0) + 0.01, f"n={b['n']}", ha="center", fontsize=7)
    ax.set_xticks(range(len(bins)), [b["bin"] for b in bins], rotation=45)
    ax.set(ylim=(0, 1.08), ylabel="competition score", title="OOF score by salt coverage")
    fig.text(0.01, -0.08, machine, fontsize=6, color="grey")
    _savefig(fig, out / "score_by_coverage.png")
    # the empty / non-empty decision, which the metric weighs as much as the outlines
    empty = ~truth.any(axis=(1, 2))
    said_empty = ~pred.any(axis=(1, 2))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    groups = [("empty images", empty, [("predicted empty: score 1", said_empty, "tab:green"),
                                        ("wrong decision: score 0", ~said_empty, "tab:red")]),
              ("salt images", ~empty, [("wrong decision: score 0", said_empty, "tab:red"),
                                       ("salt detected: scored by IoU", ~said_empty, "tab:blue")])]
    labelled = set()
    for y, (label, rows, parts) in enumerate(groups):
        left = 0
        for name, sel, color in parts:
            n = int((rows & sel).sum())
            ax.barh(y, n, left=left, color=color, label=None if name in labelled else name)
            labelled.add(name)
            if n:
                extra = f" (mean score {scores[rows & sel].mean():.2f})" if "detected" in name else ""
                ax.text(left + n / 2, y, f"{n}{extra}", ha="center", va="center", fontsize=7, color="white")
            left += n
    ax.set_yticks([0, 1], [g[0] for g in groups])
    ax.set(xlabel="images", title="empty / non-empty decision on OOF images")
    ax.legend(fontsize=7, loc="lower right")
    fig.text(0.01, -0.04, machine, fontsize=6, color="grey")
    _savefig(fig, out / "empty_decision.png")
    logs = []
    for r in run_dirs:
        for f in sorted(Path(r).glob("fold*/log.csv")):
            with open(f, newline="") as fh:
                logs.append((f"{Path(r).name}/{f.parent.name}", list(csv.DictReader(fh))))
    training_curves(out, logs, machine)
    _worst_predictions(out, images, truth, pred, scores, ids, machine)


def training_curves(out: Path, logs: list[tuple[str, list[dict]]], machine: str) -> None:
    """training_curves.png from the folds' log.csv rows (name, rows): losses, validation metric with
    the best epoch, learning rate, loss-stage switches. Epochs that were not validated (blank
    validation fields: low-resolution ones, ``train.low_res_validate``) get no point."""
    if not logs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for name, rows in logs:
        if not rows:
            continue
        e = [int(x["epoch"]) + 1 for x in rows]
        axes[0].plot(e, [float(x["train_loss"]) for x in rows], label=name)
        v = [(k, float(x["val_loss"]), float(x["val_metric"])) for k, x in zip(e, rows) if x["val_metric"]]
        ev, m = [k for k, _, _ in v], [x for _, _, x in v]
        style = ".-" if len(v) < len(rows) else "-"  # points where epochs were skipped
        axes[1].plot(ev, [x for _, x, _ in v], style, label=name)
        line, = axes[2].plot(ev, m, style, label=name)
        if m:
            b = int(np.argmax(m))
            axes[2].plot([ev[b]], [m[b]], "*", color=line.get_color(), ms=12)
            axes[2].annotate(f"best {m[b]:.3f} (epoch {ev[b]})", (ev[b], m[b]), fontsize=7,
                             textcoords="offset points", xytext=(-40, 8))
        axes[3].plot(e, [float(x["lr"]) for x in rows], label=name)
        # stage switches (e.g. to Lovasz, whose loss is on another scale: a jump, not divergence)
        for k in range(1, len(rows)):
            if rows[k]["stage"] != rows[k - 1]["stage"]:
                for ax in axes:
                    ax.axvline(e[k] - 0.5, color="grey", ls="--", lw=0.8)
                axes[0].text(e[k] - 0.4, axes[0].get_ylim()[1], f" {rows[k]['loss_name']}", fontsize=7,
                             va="top", color="grey")
    for ax, t in zip(axes, ["train loss (dashed: loss stage switch)", "validation loss",
                            "validation metric (threshold 0.5; * best epoch)", "learning rate"]):
        ax.set(title=t, xlabel="epoch")
    axes[3].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.text(0.01, -0.04, machine, fontsize=7, color="grey")
    _savefig(fig, out / "training_curves.png")


def _overlay(ax, image, truth, pred, title):
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    rgba = np.zeros((*truth.shape, 4))
    rgba[truth & ~pred] = (0.1, 0.9, 0.1, 0.45)   # missed salt: green
    rgba[pred & ~truth] = (0.95, 0.1, 0.1, 0.45)  # false salt: red
    rgba[pred & truth] = (1.0, 0.85, 0.0, 0.40)   # agreed: yellow
    ax.imshow(rgba)
    ax.set_title(title, fontsize=6.5)
    ax.axis("off")


def _worst_predictions(out, images, truth, pred, scores, ids, machine, per_row: int = 6) -> None:
    """Two rows of the worst OOF images: false positives on empty images (largest first) and the
    lowest-scoring salt images; filled overlays with pixel counts."""
    import matplotlib.pyplot as plt

    t_px = truth.reshape(len(truth), -1).sum(1)
    p_px = pred.reshape(len(pred), -1).sum(1)
    fp = np.flatnonzero((t_px == 0) & (p_px > 0))
    fp = fp[np.argsort(-p_px[fp], kind="stable")][:per_row]
    salt = np.flatnonzero(t_px > 0)
    salt = salt[np.lexsort((-t_px[salt], scores[salt]))][:per_row]
    fig, axes = plt.subplots(2, per_row, figsize=(2.2 * per_row, 5.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes[0], fp):
        _overlay(ax, images[i], truth[i], pred[i], f"{ids[i]}\nempty truth, {p_px[i]} px predicted")
    for ax, i in zip(axes[1], salt):
        _overlay(ax, images[i], truth[i], pred[i],
                 f"{ids[i]}  score {scores[i]:.2f}\ntruth {t_px[i]} px, predicted {p_px[i]} px")
    axes[0][0].text(-0.15, 0.5, f"false positives on\nempty images ({len(np.flatnonzero((t_px == 0) & (p_px > 0)))})",
                    transform=axes[0][0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
    axes[1][0].text(-0.15, 0.5, "worst salt images", transform=axes[1][0].transAxes, rotation=90,
                    va="center", ha="right", fontsize=8)
    fig.suptitle("worst OOF predictions — yellow: agreed salt, green: missed salt, red: false salt", fontsize=9)
    fig.text(0.01, 0.0, machine, fontsize=7, color="grey")
    _savefig(fig, out / "worst_predictions.png")
