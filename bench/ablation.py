"""The ablation table of the CPU-hour levers (issue: the winners' tricks, measured).

    python bench/ablation.py NAME --data-dir D --row LABEL RUN_DIR MINUTES [--against REF_LABEL] [--kept yes|no] ...

Each row is a finished run over the same held-out images (same folds file, same fold, same
seed) at the same time budget. Its CV is reported at threshold 0.5 and with nested
post-processing; its gain is paired, image by image, against the row named by --against (the
current best when the variant was tried), with a 95% bootstrap interval. Writes
bench/results/NAME.json and prints the table in Markdown.
"""

import argparse
import json
from pathlib import Path

from common import save

from tgs_salt.compare import compare


def run_facts(run: Path) -> dict:
    cv = json.loads((run / "cv.json").read_text())
    done = [json.loads(f.read_text()) for f in sorted(run.glob("fold*/done.json"))]
    cfg_epochs = sum(d["epochs_run"] for d in done)
    return {"cv_default": cv["score_default_threshold"], "cv_nested": cv["score_nested"], "cv_tuned_same": cv["score"],
            "nested_method": cv["nested"], "epochs": cfg_epochs,
            "kept_epochs": [d.get("kept_epoch", d["best_epoch"]) + 1 for d in done],
            "select": [d.get("select", "best") for d in done], "cls_threshold": cv.get("cls_threshold"),
            "threshold": cv["threshold"], "min_area": cv["min_area"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--row", nargs=3, action="append", metavar=("LABEL", "RUN_DIR", "MINUTES"), required=True)
    p.add_argument("--against", action="append", default=[], help="per row after the first: the reference label")
    p.add_argument("--kept", action="append", default=[], help="per row: yes or no")
    p.add_argument("--note")
    a = p.parse_args()
    rows, by_label = [], {}
    for i, (label, run, minutes) in enumerate(a.row):
        r = {"variant": label, "run": run, "minutes": float(minutes), **run_facts(Path(run))}
        if i:
            ref = a.against[i - 1] if i - 1 < len(a.against) else a.row[0][0]
            c = compare(Path(by_label[ref]["run"]), Path(run), Path(a.data_dir))
            r["against"] = ref
            r["paired_gain_default"] = c["default_threshold"]
            r["paired_gain_nested"] = c["nested"]
            r["n_images"] = c["n_images"]
        r["kept"] = a.kept[i] if i < len(a.kept) else None
        rows.append(r)
        by_label[label] = r
    save(a.name, {"note": a.note, "rows": rows})
    print("| variant | minutes | epochs | CV at 0.5 / nested | paired gain at 0.5 (95% CI) | paired gain nested (95% CI) | kept |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        def g(x):
            return f"{x['gain']:+.4f} ({x['ci95'][0]:+.4f} .. {x['ci95'][1]:+.4f})" if x else "reference"
        vs = f" vs {r['against']}" if "against" in r else ""
        print(f"| {r['variant']} | {r['minutes']:.1f} | {r['epochs']} | {r['cv_default']:.4f} / {r['cv_nested']:.4f} | "
              f"{g(r.get('paired_gain_default'))}{vs} | {g(r.get('paired_gain_nested'))} | {r['kept'] or '-'} |")


if __name__ == "__main__":
    main()
