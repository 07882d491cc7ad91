"""Fold ensemble on the test set: flip TTA, mean over folds (and runs), OOF-tuned post-processing,
submission CSV written atomically and validated."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from tgs_salt import paths
from tgs_salt.budget import read_plan
from tgs_salt.config import n_views
from tgs_salt.data.folds import folds_for
from tgs_salt.errors import UserError
from tgs_salt.hardware import apply_cpu_malloc, resolve_device
from tgs_salt.inference import FoldModel
from tgs_salt.io_utils import atomic_path, exclusive_lock, remove_stale_temps, write_json_atomic
from tgs_salt.postprocess import apply, decide, split_groups
from tgs_salt.report import expected_folds, oof_with_truth, output_dir, parse_weights, read_run, run_fold_file
from tgs_salt.rundir import RunDir
from tgs_salt.submission import validate_submission, write_submission

log = logging.getLogger(__name__)


def load_fold_models(run_dirs: list[Path], device: torch.device) -> list[tuple[list[FoldModel], Path]]:
    out = []
    for r in run_dirs:
        cfg, _ = read_run(r)
        models = []
        for k in expected_folds(cfg):
            done, best = RunDir(r).done(k), RunDir(r).best(k)
            if not done.exists() or not best.exists():
                raise UserError(f"{r}: fold {k} is not trained (no {done.name}); train it with "
                                f"`python -m tgs_salt train --config {r}/config.yaml --run-dir {r} --fold {k}`")
            models.append(FoldModel(best, device))
        out.append((models, Path(r)))
    return out


def predict_test(ensemble, weights: np.ndarray, images: np.ndarray, depths: np.ndarray, device,
                 batch_size: int, tta: bool = True, shift: int = 0,
                 views: list[tuple[bool, int]] | None = None,
                 log_every: float = 30.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean probabilities (N, 101, 101) float16, streamed over batches (only the running batch
    of every model is ever in memory), and mean salt probabilities (N,) when every model has a
    classifier (else None). ``views``: each run's own (tta, shift), the views its out-of-fold
    predictions were made with (default: ``tta`` and ``shift`` for every run). A log line with the
    images done, images/s and the ETA every ``log_every`` seconds (besides tqdm's bar on a terminal):
    18,000 test images x 5 folds x 6 views take tens of minutes on a CPU."""
    from tqdm import tqdm

    views = views or [(tta, shift)] * len(ensemble)
    if len(views) != len(ensemble):
        raise ValueError(f"{len(views)} test-time view settings for {len(ensemble)} runs")

    out = np.empty((len(images), 101, 101), dtype=np.float16)
    with_cls = all(m.cfg["model"]["cls_head"] for models, _ in ensemble for m in models)
    cls_out = np.empty(len(images), dtype=np.float32) if with_cls else None
    t0 = last = time.time()
    for s in tqdm(range(0, len(images), batch_size), desc="predict", disable=None, leave=False):
        now = time.time()
        if s and now - last >= log_every:
            last, rate = now, s / (now - t0)
            log.info("predict: %d / %d test images, %.1f images/s, ETA %s", s, len(images), rate,
                     time.strftime("%H:%M:%S", time.localtime(now + (len(images) - s) / rate)))
        img = torch.from_numpy(images[s:s + batch_size]).to(device, non_blocking=True)
        dep = torch.from_numpy(depths[s:s + batch_size]).to(device, non_blocking=True)
        acc, acc_cls = 0.0, 0.0
        for (models, _), w, (run_tta, run_shift) in zip(ensemble, weights, views):
            for m in models:
                p, c = m.probs(img, dep, tta=run_tta, shift=run_shift)
                acc = acc + p * float(w / len(models))
                if with_cls:
                    acc_cls = acc_cls + c * float(w / len(models))
        out[s:s + batch_size] = acc.cpu().numpy().astype(np.float16)
        if with_cls:
            cls_out[s:s + batch_size] = acc_cls.cpu().numpy()
    return out, cls_out


def predict_command(args) -> int:
    run_dirs = [Path(p) for p in args.run_dir]
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: a positive number of images")
    for r in run_dirs:
        read_run(r)  # a clear error for a directory that is not a training run
    out_dir = output_dir(run_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out_dir / ".predict.lock", f"prediction for {out_dir}"):
        remove_stale_temps(out_dir)
        return _predict(args, run_dirs, out_dir)


def _predict(args, run_dirs: list[Path], out_dir: Path) -> int:
    from tgs_salt.data import load_test

    weights = parse_weights(args.weights, len(run_dirs))
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, facts = read_run(run_dirs[0])
    apply_cpu_malloc(cfg["train"], device)
    data_dir = Path(args.data_dir) if args.data_dir else Path(facts["data_dir"])
    sample = data_dir / "sample_submission.csv"
    test = load_test(data_dir)

    # post-processing tuned on the same ensemble's out-of-fold predictions
    _, oof, oof_cls, train, rows = oof_with_truth(run_dirs, weights, data_dir)
    groups, _ = split_groups(folds_for(train.ids, run_fold_file(facts))[rows])
    pp, how = decide(oof, train.masks[rows], cfg, groups, oof_cls)
    sweep = how["sweep"]
    del oof, train
    log.info("post-processing: %s, threshold %.3f, min area %d, empty below salt probability %s (%s; CV %.4f "
             "tuned on the same images, %.4f at threshold %.2f, %.4f nested)", how["applied"], pp.threshold,
             pp.min_area, pp.cls_threshold, how["why"], sweep["score_tuned"], sweep["score_default"],
             sweep["default"].threshold, float(how["nested"].mean()))

    ensemble = load_fold_models(run_dirs, device)
    n_models = sum(len(m) for m, _ in ensemble)
    batch = args.batch_size or cfg["predict"]["batch_size"]
    t0 = time.time()
    # every run's models get the views its out-of-fold predictions had (its time plan may have dropped the shift)
    views = [(c["predict"]["tta"], c["predict"]["tta_shift"]) for c in (read_run(r)[0] for r in run_dirs)]
    for r in run_dirs:
        dropped = (read_plan(r) or {}).get("tta_shift_dropped")
        if dropped:
            log.info("%sTTA without the shift views, as the time plan chose: predict.tta_shift %d would have taken "
                     "%.0f s (%.0f%% of the budget; predict.tta_shift_max_share %g)",
                     f"{r}: " if len(run_dirs) > 1 else "", dropped["config"], dropped["seconds"],
                     100 * dropped["share"], dropped["max_share"])
    probs, cls = predict_test(ensemble, weights, test.images, test.depths, device, batch, views=views)
    if pp.cls_threshold is not None and cls is None:
        raise UserError("post-processing was tuned with a classifier but the models give no salt probability")
    seconds = time.time() - t0
    log.info("precision: %s", ", ".join(sorted({m.precision.name for ms, _ in ensemble for m in ms})))
    n_view = sorted({n_views(*v) for v in views})
    log.info("predicted %d test images with %d models x %s TTA views in %.1fs (%.0f images/s)", len(test), n_models,
             "/".join(map(str, n_view)), seconds, len(test) / max(seconds, 1e-9))

    with atomic_path(RunDir(out_dir).test_probs, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, ids=test.ids, probs=probs, **({} if cls is None else {"cls": cls}))
    masks = apply(probs, pp, test.images, cls)
    name = out_dir.name
    sub_path = Path(args.out) if args.out else paths.submissions_dir() / f"{name}.csv"
    remove_stale_temps(sub_path.parent)
    # validated before it takes the final name; the old record goes first, so a record never
    # describes another file than the one at its path
    with atomic_path(sub_path, suffix=".csv") as tmp:
        write_submission(tmp, test.ids, masks)
        v = validate_submission(tmp, sample)
        if not v.ok:
            raise UserError(f"the submission for {sub_path} does not validate ({v.problems[0]}); nothing written")
        (out_dir / "submission.json").unlink(missing_ok=True)
    write_json_atomic(out_dir / "submission.json", {
        "submission": str(sub_path), "rows": v.rows, "non_empty": v.non_empty, "postprocess": pp.to_dict(),
        "postprocess_applied": how["applied"], "postprocess_why": how["why"],
        "cv_score_held_out": round(how["score_applied"], 6), "cv_score_policy": round(how["score_policy"], 6),
        "cv_score": round(sweep["score_tuned"], 6),
        "runs": [str(r) for r in run_dirs],
        "weights": weights.round(6).tolist(), "views": [n_views(*v) for v in views], "models": n_models,
        "seconds": round(seconds, 1),
        "images_per_s": round(len(test) / max(seconds, 1e-9), 1), "device": str(device)})
    print(f"{v.rows} rows, {v.non_empty} non-empty masks; {how['applied']} post-processing: threshold "
          f"{pp.threshold:.3f}, min area {pp.min_area}; OOF CV held out {how['score_applied']:.4f} "
          f"({how['score_policy']:.4f} with the tuned/untuned choice made held out too)")
    print(sub_path)
    return 0

