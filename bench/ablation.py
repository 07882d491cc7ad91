"""The ablation table of the CPU-hour levers (issue: the winners' tricks, measured).

    python bench/ablation.py NAME --data-dir D [--keep-rows] --row LABEL RUN_DIR MINUTES [--against REF_LABEL] [--kept TEXT] ...

Each row is a finished run over the same held-out images (same folds file, same fold, same
seed) at the same time budget. Its CV is reported at threshold 0.5 and with nested
post-processing; its gain is paired, image by image, against the row named by --against (the
current best when the variant was tried; default: the first row), with a 95% bootstrap interval.
Every row keeps its per-image scores, so with --keep-rows the rows already in
bench/results/NAME.json stay and later runs are paired against them without their run
directories (which are not kept in the repository). Writes bench/results/NAME.json and prints
the table in Markdown.
"""

import argparse
import json
from pathlib import Path

from common import RESULTS, save

from tgs_salt.compare import paired, recorded_scores, run_scores
from tgs_salt.errors import UserError


def run_facts(run: Path) -> dict:
    cv = json.loads((run / "cv.json").read_text())
    done = [json.loads(f.read_text()) for f in sorted(run.glob("fold*/done.json"))]
    cfg_epochs = sum(d["epochs_run"] for d in done)
    return {"cv_default": cv["score_default_threshold"], "cv_nested": cv["score_nested"], "cv_tuned_same": cv["score"],
            "nested_method": cv["nested"], "epochs": cfg_epochs,
            "kept_epochs": [d.get("kept_epoch", d["best_epoch"]) + 1 for d in done],
            "select": [d.get("select", "best") for d in done], "cls_threshold": cv.get("cls_threshold"),
            "threshold": cv["threshold"], "min_area": cv["min_area"]}


def table(rows: list[dict]) -> str:
    def g(x):
        return f"{x['gain']:+.4f} ({x['ci95'][0]:+.4f} .. {x['ci95'][1]:+.4f})" if x else "reference"
    header = ("| variant | minutes | epochs | CV at 0.5 / nested | paired gain at 0.5 (95% CI) | "
              "paired gain nested (95% CI) | kept |")
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        vs = f" vs {r['against']}" if r.get("against") else ""
        lines.append(f"| {r['variant']} | {r['minutes']:.1f} | {r['epochs']} | {r['cv_default']:.4f} / "
                     f"{r['cv_nested']:.4f} | {g(r.get('paired_gain_default'))}{vs} | "
                     f"{g(r.get('paired_gain_nested'))} | {r.get('kept') or '-'} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--keep-rows", action="store_true", help="keep the rows already in bench/results/NAME.json")
    p.add_argument("--row", nargs=3, action="append", metavar=("LABEL", "RUN_DIR", "MINUTES"), default=[])
    p.add_argument("--against", action="append", default=[], help="per new row: the reference label")
    p.add_argument("--kept", action="append", default=[], help="per new row: yes, no, or a short reason")
    p.add_argument("--note")
    a = p.parse_args()
    old = json.loads((RESULTS / f"{a.name}.json").read_text()) if a.keep_rows else {}
    rows = list(old.get("rows", []))
    by_label = {r["variant"]: r for r in rows}
    for i, (label, run, minutes) in enumerate(a.row):
        r = {"variant": label, "run": run, "minutes": float(minutes), **run_facts(Path(run)),
             "per_image": run_scores(Path(run), Path(a.data_dir))}
        ref_label = a.against[i] if i < len(a.against) else (rows[0]["variant"] if rows else None)
        if ref_label is not None:
            ref = by_label.get(ref_label)
            if ref is None:
                raise SystemExit(f"--against {ref_label!r}: no such row (rows: {list(by_label)})")
            try:
                c = paired(recorded_scores(ref, f"row {ref_label!r}", "pair against a row that has them"),
                           r["per_image"])
            except UserError as e:
                raise SystemExit(f"error: {e}") from None
            r["against"] = ref_label
            r["paired_gain_default"] = c["default_threshold"]
            r["paired_gain_nested"] = c["nested"]
            r["n_images"] = c["n_images"]
        r["kept"] = a.kept[i] if i < len(a.kept) else None
        rows.append(r)
        by_label[label] = r
    save(a.name, {"note": a.note or old.get("note"), "rows": rows}, echo=False)
    print(table(rows))


if __name__ == "__main__":
    main()
