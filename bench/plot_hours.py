"""The real CPU hours, drawn: held-out score against the epochs each hour fitted, for every recorded
``./run_all.sh --data-dir ../shared/tgs-salt --time-budget 60`` of ``cpu_budget`` on the genuine
2-core AVX2-only EPYC (no native bf16). How fast the host ran decided the epochs; the epochs decided
the score.

    python bench/plot_hours.py [--out bench/results/cpu_hours_score_vs_epochs_avx2.png]

Reads only result files (``bench/record_run.py``); the lists below say which recipe each one ran.
"""

import argparse
import json
import re

from common import RESULTS

# the shipped recipe (train.empty_fraction 0.5: 1920 images per epoch), 1000 test images unless said
SHIPPED = ["cpu_budget_empty05_s42_real_avx2.json", "cpu_budget_empty05_s43_real_avx2.json",
           "cpu_budget_empty05_s44_real_avx2.json", "cpu_budget_h60_s42_slow18_real_avx2.json",
           "cpu_budget_h60_s43_slow17_real_avx2.json", "cpu_budget_h60_s42_slow11_real_avx2.json",
           "cpu_budget_h60_test18k_s42_slow_real_avx2.json", "cpu_budget_h60_s42_s54_slow_real_avx2.json"]
# the recipe before train.empty_fraction (every image, 2400 per epoch); shift TTA re-scored or run
EARLIER = ["cpu_budget_tta_shift3_s42_fast_real_avx2.json", "cpu_budget_tta_shift3_s43_real_avx2.json",
           "cpu_budget_tta_shift3_s44_fast_real_avx2.json", "cpu_budget_tta_shift3_s44_real_avx2.json",
           "cpu_budget_tta_shift3_real_avx2.json", "cpu_budget_val_every5_real_avx2.json",
           "cpu_budget_val_every5_s43_real_avx2.json", "cpu_budget_s43_session39_real_avx2.json",
           "cpu_budget_lovasz1_real_avx2.json"]
# one knob moved from the shipped recipe (label: what moved)
VARIANTS = {"cpu_budget_h60_depth3_p104_s42_slow_real_avx2.json": "encoder depth 3, 104 px",
            "cpu_budget_h60_plainunet16_s42_slow_real_avx2.json": "plain U-Net, width 16",
            "cpu_budget_h60_smallmask2_s42_slow18_real_avx2.json": "small-mask weight 2",
            "cpu_budget_h60_test18k_keep6_s42_slow_real_avx2.json": "18,000 test images, 6 views kept",
            "cpu_budget_cpu_processes2_s44_real_avx2.json": "2 processes (earlier recipe)"}


def point(name: str) -> tuple[int, float, str]:
    d = json.loads((RESULTS / name).read_text())
    fold = d["folds"]["fold0"]
    seed = re.search(r"_s(\d+)_", name)  # the files without one ran the default seed
    return fold["epochs_run"], d["cv_score_threshold_0.5"], seed.group(1) if seed else "42"


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(RESULTS / "cpu_hours_score_vs_epochs_avx2.png"))
    a = ap.parse_args()
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    for names, style, label in ((SHIPPED, {"marker": "o", "color": "C0"}, "cpu_budget as shipped (1920 images/epoch)"),
                                (EARLIER, {"marker": "s", "color": "C7", "alpha": 0.7},
                                 "before empty_fraction (2400 images/epoch)")):
        pts = [point(n) for n in names]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=46, label=label, **style)
        for (e, s, seed), n in zip(pts, names):
            ax.annotate(f"s{seed}" + (", 18k test" if "test18k" in n else ""), (e, s), fontsize=7,
                        xytext=(4, 4 if "test18k" in n else -9), textcoords="offset points", color=style["color"])
    for i, (n, label) in enumerate(VARIANTS.items()):
        e, s, seed = point(n)
        ax.scatter([e], [s], marker="x", s=60, color=f"C{i + 1}", label=f"{label} (s{seed})")
    ax.axhline(0.80, color="k", lw=0.8, ls="--")
    ax.text(17, 0.8006, "target 0.80", fontsize=8)
    ax.set_xlabel("epochs trained in the hour (planned from the host's measured speed)")
    ax.set_ylabel("held-out competition metric at threshold 0.5 (601 images)")
    ax.set_title("cpu_budget, ./run_all.sh --time-budget 60 on real data\n"
                 "genuine 2-core AVX2-only AMD EPYC (no native bf16), hosts of differing speed", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
