"""Record a finished run's CV and timings under bench/results/ (with the hardware).

    python bench/record_run.py RUN_DIR NAME [--wall-seconds S] [--note TEXT] [--data-dir DIR]

The result keeps the run's per-image scores (at the default threshold and nested), so a later run
can be paired against it after its run directory is gone:
``python -m tgs_salt compare bench/results/NAME.json runs/NEW``.
"""

import argparse
import json
from pathlib import Path

from common import hardware, save

from tgs_salt.compare import run_scores
from tgs_salt.errors import UserError
from tgs_salt.hardware import kind_limit


def run_hardware(hw: dict, precision: dict | None) -> dict:
    """The hardware block of a run's result: the recording machine's (``hw``), with the CPU kind the
    run itself trained under (its ``precision.json``) when that differs, e.g. a run made under
    ``ONEDNN_MAX_CPU_ISA=AVX2`` and recorded without it; ``recorded_under`` keeps the recorder's kind."""
    kind = (precision or {}).get("cpu_kind")
    if not kind or kind == hw.get("cpu_kind"):
        return hw
    out = {**hw, "cpu_kind": kind, "recorded_under": hw.get("cpu_kind"),
           "native_bf16": "bf16" in kind.split(" (")[0]}
    out.pop("isa_limit", None)
    limit = kind_limit(kind)
    if limit:
        out["isa_limit"] = limit
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("name")
    p.add_argument("--wall-seconds", type=float)
    p.add_argument("--note")
    p.add_argument("--data-dir", help="the data the run was trained on (default: the one it recorded)")
    a = p.parse_args()
    run = Path(a.run_dir)
    cv = json.loads((run / "cv.json").read_text())
    folds = {d.name: json.loads((d / "done.json").read_text()) for d in sorted(run.glob("fold*"))
             if (d / "done.json").exists()}
    result = {
        "run": run.name, "note": a.note, "cv_score": cv["score"],
        "cv_score_threshold_0.5": cv["score_default_threshold"], "threshold": cv["threshold"],
        "min_area": cv["min_area"], "all_empty_score": cv["all_empty_score"], "n_oof_images": cv["n_images"],
        "pixel_iou": cv["pixel_iou"], "per_coverage": cv["per_coverage"],
        "folds": {k: {x: v[x] for x in ("best_metric", "oof_metric_tta", "best_epoch", "epochs_run", "seconds",
                                        "n_train", "n_val")} for k, v in folds.items()},
        "train_seconds": round(sum(v["seconds"] for v in folds.values()), 1),
        "wall_seconds": a.wall_seconds,
    }
    for extra in ("precision", "plan"):  # the measured precision choice and the time plan, when present
        f = run / f"{extra}.json"
        if f.exists():
            result[extra] = json.loads(f.read_text())
    sub = run / "submission.json"
    if sub.exists():
        result["submission"] = json.loads(sub.read_text())
    try:  # the ground truth is needed to score each image
        result["per_image"] = run_scores(run, Path(a.data_dir) if a.data_dir else None)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    result["hardware"] = run_hardware(hardware(), result.get("precision"))
    save(a.name, result)


if __name__ == "__main__":
    main()
