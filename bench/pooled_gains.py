"""Every lever measured at more than one seed, its gain pooled over the seeds with the run-to-run
spread counted (issue: the winners' tricks, measured).

    python bench/pooled_gains.py [--bootstrap N]

A lever's pairs are rows of the ablation tables (each paired against the row it names) or pairs of
recorded results (``bench/record_run.py``), all on the same 601 held-out images. Each pair's gain
is the mean per-image difference; the pooled gain is their mean, with the interval of
``tgs_salt.compare.pooled``: the spread between the pairs' gains and the images' sampling error
both counted (Student's t, Welch-Satterthwaite degrees of freedom), beside the bootstrap interval
over images alone that the tables report. A last group pairs the recipe against itself (another
seed, or the same seed run again): what a pair's gain looks like when nothing changed.

Two or three pairs know their own spread poorly (one or two degrees of freedom; two pairs that
agree by chance look precise). Assuming the run-to-run spread of a pair's gain is the same for
every lever (the same recipe, one knob moved), its estimate is also pooled over all the groups
(the within-group variances weighted by their degrees of freedom), and a second interval uses it.

Reads only stored results (no run directories, no training); writes
bench/results/pooled_gains.json and prints the table in Markdown.
"""

import argparse
import json

import numpy as np
from common import RESULTS

from tgs_salt.compare import pooled, recorded_scores, t_interval
from tgs_salt.io_utils import write_json_atomic

AMX = "cpu_budget_ablation_avx2_epochs_amx.json"      # AVX2-hour emulation, fixed 35 / 47 epochs
F48 = "cpu_budget_ablation_fixed48_avx2.json"         # genuine AVX2 EPYC, fixed 48 epochs


def row(table, prefix):
    return ("row", table, prefix)


def files(base, other):
    return ("files", base, other)


# (lever, what `cpu_budget` did with it, its pairs). A row is named by the start of its variant text;
# every row starting so is taken (one per seed), each against the row it was paired against.
LEVERS = [
    ("progressive resizing: the first half of the epochs at 64 px (AMX, AVX2-hour compute)", "kept",
     [row(AMX, "+ progressive resizing (train.low_res_size 64"), row(AMX, "+ progressive resizing, seed 43")]),
    ("BCE + 1.0 symmetric Lovász instead of 0.5 (AMX, 47 epochs)", "kept",
     [row(AMX, "BCE + 1.0 symmetric Lovasz instead of 0.5")]),
    ("half the empty-mask images per epoch (empty_fraction 0.5 vs 1): fixed 48 epochs (AVX2 EPYC), a real AVX2 hour",
     "kept",
     [row(F48, "half the empty-mask images per epoch"),
      files("cpu_budget_s43_session39_real_avx2.json", "cpu_budget_empty05_s43_real_avx2.json")]),
    ("a third of the empty-mask images (empty_fraction 0.3 vs 0.5): 26- and 30-min budgets, AVX2-limited EPYC",
     "not adopted",
     [files(f"cpu_budget_tb26_empty05_s{s}_fast_avx2isa.json", f"cpu_budget_tb26_empty03_s{s}_fast_avx2isa.json")
      for s in (42, 43, 44, 45, 46, 47, 48)]
     + [files("cpu_budget_tb30_empty05_s42_again_fast_avx2isa.json", "cpu_budget_tb30_empty03_s42_fast_avx2isa.json"),
        files("cpu_budget_tb30_empty05_s44_fast_avx2isa.json", "cpu_budget_tb30_empty03_s44_fast_avx2isa.json")]),
    ("three resolutions (64 -> 96 -> 112 px): fixed 48 epochs (AVX2 EPYC) and 30-min budgets (AVX2-limited EPYC)",
     "not adopted",
     [row(F48, "three resolutions at the same compute")]
     + [files(f"cpu_budget_tb30_empty05_s{s}_fast_avx2isa.json", f"cpu_budget_tb30_3ph_empty05_s{s}_fast_avx2isa.json")
        for s in (42, 44)]),
    ("the image channel alone (AMX, 47 epochs)", "not adopted", [row(AMX, "the image channel alone")]),
    ("augment.scale 0.2 instead of 0.1 (AMX, 47 epochs)", "not adopted",
     [row(AMX, "stronger scale augmentation"), row(AMX, "+ stronger scale augmentation")]),
    ("pseudo-labels, 547 test images (AMX)", "not adopted",
     [row(AMX, "pseudo-labels (train.pseudo_labels)"), row(AMX, "+ pseudo-labels, seed 43")]),
    ("learning rate 4e-3 instead of 2e-3 (AMX 47 epochs; AVX2 EPYC 48)", "not adopted",
     [row(AMX, "learning rate 4e-3 instead of 2e-3"), row(F48, "learning rate 4e-3 (seed 43)")]),
    ("low_res_fraction 0.65 instead of 0.5 (AVX2 EPYC, fixed 48)", "not adopted",
     [row(F48, "low_res_fraction 0.65")]),
    ("classifier loss weight 0.5 instead of 0.1 (AVX2 EPYC, fixed 48)", "not adopted",
     [row(F48, "classifier loss weight 0.5")]),
    ("90 px in a 96 px canvas (AVX2 EPYC, fixed 48 compute)", "not adopted", [row(F48, "image scaled to 90 px")]),
    ("2 data-parallel processes, batch 64 (AVX2 EPYC, fixed 48 compute)", "not adopted",
     [row(F48, "2 data-parallel processes of one thread with 32 images each")]),
    ("linear decay to zero instead of cosine to 0.02 (AVX2-limited EPYC, 20-min budgets: 35-39 epochs, the slowest hosts')",
     "adopted (free)",
     [files(f"cpu_budget_tb20_s{s}_avx2isa.json", f"cpu_budget_tb20_d2z_s{s}_avx2isa.json") for s in (42, 43, 44)]),
    ("light decoder: no stem skip, head at half size (AVX2-limited EPYC, 20-min budgets; against the recipe of the session before)",
     "adopted",
     [files(f"cpu_budget_tb20_d2z_s{s}_avx2isa.json", f"cpu_budget_tb20_ld_s{s}_avx2isa.json") for s in (42, 43, 44)]),
    ("light decoder at a slow AVX2 hour's compute (AVX2-limited EPYC, 26-min budgets: 54-63 epochs against 48-53; same session)",
     "kept (rule: dropped only if < -0.003 at 0.5 and < 0 nested)",
     [files(f"cpu_budget_tb26_full_s{s}_avx2isa.json", f"cpu_budget_tb26_{ld}_s{s}_avx2isa.json")
      for s, ld in ((42, "ld"), (43, "ld"), (44, "ld2"), (45, "ld"))]),
    ("timm's resnet10t instead of ResNet18 (AVX2-limited EPYC, 20-min budgets: 44-51 epochs against 40-41; same session)",
     "not adopted alone (with low_res_fraction 0.65: below)",
     [files(f"cpu_budget_tb20_ship2_s{s}_avx2isa.json", f"cpu_budget_tb20_r10t_s{s}_avx2isa.json") for s in (42, 43, 44)]),
    (("training without the 70 stripe (\"vertical\") masks of fold 0 (AVX2-limited EPYC, 20-min budgets: 44 / 38 epochs "
      "against 40 / 42; same session)"), "not adopted",
     [files(f"cpu_budget_tb20_ship3_s{s}_avx2isa.json", f"cpu_budget_tb20_strip_s{s}_avx2isa.json") for s in (42, 43)]),
    (("low_res_fraction 0.65 instead of 0.5 under a 20-min budget (AVX2-limited EPYC: 46 / 49 / 35 epochs against 40 / 42 / 34; "
      "same session)"), "not adopted alone (with resnet10t: below)",
     [files(f"cpu_budget_tb20_ship3_s{s}_avx2isa.json", f"cpu_budget_tb20_lrf65_s{s}_avx2isa.json") for s in (42, 43)]
     + [files("cpu_budget_tb20_ship4_s44_avx2isa.json", "cpu_budget_tb20_lrf65_s44_avx2isa.json")]),
    (("resnet10t and low_res_fraction 0.65 together (AVX2-limited EPYC, 20-min budgets: 63 / 68 / 63 epochs against "
      "41 / 38 / 41; same session)"), "adopted",
     [files(f"cpu_budget_tb20_ship5_s{s}_avx2isa.json", f"cpu_budget_tb20_combo_s{s}_avx2isa.json") for s in (42, 43, 44)]),
    (("resnet10t's deep stem at width 16 instead of 32 (model.stem_width; AVX2-limited EPYC, 20-min budgets: 79 / 81 / 74 "
      "epochs against 66 / 66 / 57; same session)"), "adopted",
     [files(f"cpu_budget_tb20_ship69_s{s}_avx2isa.json", f"cpu_budget_tb20_sw16_s{s}_avx2isa.json") for s in (42, 43, 44)]),
    (("resnet10t's stem at width 16 instead of 32 at a slow AVX2 hour's compute (AVX2-limited EPYC, 26-min budgets: 95 / 98 "
      "epochs against 81 / 69; same session)"), "kept (a check of the adopted width)",
     [files(f"cpu_budget_tb26_sw32_s{s}_avx2isa.json", f"cpu_budget_tb26_sw16_s{s}_avx2isa.json") for s in (42, 43)]),
    (("the decoder at 32 / 16 / 16 channels instead of 64 / 32 / 16 (model.decoder_channels; AVX2-limited faster EPYC, "
      "16-min budgets: 102 / 103 / 101 epochs against 84 / 85 / 78; same session)"), "adopted",
     [files(f"cpu_budget_tb16_ship71_s{s}_avx2isa.json", f"cpu_budget_tb16_dc32_s{s}_avx2isa.json") for s in (42, 43, 44)]),
    (("the first 75% of the epochs at 64 px instead of 65% (train.low_res_fraction 0.75; AVX2-limited faster EPYC, "
      "16-min budgets: 113 / 113 / 111 epochs against 101 / 97 / 98; same session)"), "not adopted",
     [files(f"cpu_budget_tb16_ship72_s{s}_avx2isa.json", f"cpu_budget_tb16_lrf75_s{s}_avx2isa.json") for s in (42, 43, 44)]),
    (("learning rate 3e-3 instead of 2e-3 (train.lr; AVX2-limited faster EPYC, 16-min budgets: 102 / 95 / 90 epochs "
      "against 103 / 93 / 93; same session)"), "adopted",
     [files("cpu_budget_tb16_ship73_s42_avx2isa.json", "cpu_budget_tb16_lr3_s42_avx2isa.json"),
      *[files(f"cpu_budget_tb16_ship74_s{s}_avx2isa.json", f"cpu_budget_tb16_lr3_s{s}_avx2isa.json") for s in (43, 44)]]),
    (("ResNet34 instead of ResNet18 where the plan gives ResNet18 >= 150 epochs (native-bf16 EPYC hours: 126-131 "
      "epochs against 193-208)"), "adopted (model.larger_encoder)",
     [files("cpu_budget_h60_s42_real_bf16.json", "cpu_budget_h60_r34_s42_real_bf16.json"),
      files("cpu_budget_h60_s43_real_bf16.json", "cpu_budget_h60_r34_s43_real_bf16.json"),
      files("cpu_budget_h60_s44_real_bf16.json", "cpu_budget_h60_ship_s44_real_bf16.json")]),
    ("nothing: the recipe against itself at another seed (AMX, AVX2 EPYC) or the same seed again (AVX2-limited EPYC)",
     "-",
     [row(AMX, "cpu_budget, 35 epochs, seed 43"), row(AMX, "+ progressive resizing, seed 44"),
      row(F48, "reference at seed 44"),
      files("cpu_budget_tb30_empty05_s42_fast_avx2isa.json", "cpu_budget_tb30_empty05_s42_again_fast_avx2isa.json"),
      *[files(f"cpu_budget_tb20_d2z_s{s}_avx2isa.json", f"cpu_budget_tb20_ship_s{s}_avx2isa.json") for s in (42, 43, 44)],
      files("cpu_budget_tb26_ld_s44_avx2isa.json", "cpu_budget_tb26_ld2_s44_avx2isa.json"),
      *[files(f"cpu_budget_tb20_ld_s{s}_avx2isa.json", f"cpu_budget_tb20_ship2_s{s}_avx2isa.json") for s in (42, 43, 44)],
      *[files(f"cpu_budget_tb20_ship2_s{s}_avx2isa.json", f"cpu_budget_tb20_ship3_s{s}_avx2isa.json") for s in (42, 43)],
      files("cpu_budget_tb20_ship2_s44_avx2isa.json", "cpu_budget_tb20_ship4_s44_avx2isa.json"),
      *[files(f"cpu_budget_tb20_ship3_s{s}_avx2isa.json", f"cpu_budget_tb20_ship5_s{s}_avx2isa.json") for s in (42, 43)],
      files("cpu_budget_tb20_ship4_s44_avx2isa.json", "cpu_budget_tb20_ship5_s44_avx2isa.json"),
      *[files(f"cpu_budget_tb20_combo_s{s}_avx2isa.json", f"cpu_budget_tb20_ship69_s{s}_avx2isa.json") for s in (42, 43, 44)],
      *[files(f"cpu_budget_tb26_combo_s{s}_avx2isa.json", f"cpu_budget_tb26_sw32_s{s}_avx2isa.json") for s in (42, 43)],
      *[files(f"cpu_budget_tb20_sw16_s{s}_avx2isa.json", f"cpu_budget_tb16_ship71_s{s}_avx2isa.json") for s in (42, 43, 44)],
      *[files(f"cpu_budget_tb16_dc32_s{s}_avx2isa.json", f"cpu_budget_tb16_ship72_s{s}_avx2isa.json") for s in (42, 43, 44)],
      files("cpu_budget_tb16_ship72_s42_avx2isa.json", "cpu_budget_tb16_ship73_s42_avx2isa.json"),
      *[files(f"cpu_budget_tb16_ship72_s{s}_avx2isa.json", f"cpu_budget_tb16_ship74_s{s}_avx2isa.json") for s in (43, 44)]]),
]


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def expand(source) -> list[dict]:
    """The pairs a source names: [{base, other, base_scores, other_scores}]."""
    if source[0] == "files":
        _, base, other = source
        if not (RESULTS / base).is_file() or not (RESULTS / other).is_file():
            return []                                         # a pair still to be run or recorded
        return [{"base": base, "other": other, "a": recorded_scores(load(base), base, "re-record it"),
                 "b": recorded_scores(load(other), other, "re-record it")}]
    _, table, prefix = source
    rows = load(table)["rows"]
    by_variant = {r["variant"]: r for r in rows}
    found = [r for r in rows if r["variant"].startswith(prefix)]
    if not found:
        raise SystemExit(f"{table}: no row starts with {prefix!r}")
    out = []
    for r in found:
        base = by_variant[r["against"]]
        out.append({"base": f"{table}: {base['variant'][:70]}", "other": f"{table}: {r['variant'][:70]}",
                    "a": recorded_scores(base, table, "re-run bench/ablation.py"),
                    "b": recorded_scores(r, table, "re-run bench/ablation.py")})
    return out


def with_shared_spread(levers: list[dict]) -> None:
    """Add ``ci95_shared_spread`` to each lever's measures: the interval with the variance of a pair's
    gain between runs pooled over every group (degrees of freedom: the sum of the groups' m - 1)."""
    for key in ("default_threshold", "nested", "submitted"):
        having = [r for r in levers if key in r]
        if not having:
            continue
        dfs = [len(r[key]["pair_gains"]) - 1 for r in having]
        var = sum(np.var(r[key]["pair_gains"], ddof=1) * d for r, d in zip(having, dfs)) / sum(dfs)
        for r in having:
            x = r[key]
            lo, hi, _ = t_interval(x["gain"], var / r["n_pairs"], sum(dfs), x["se_images"] ** 2, r["n_images"] - 1)
            x["shared_run_sd"] = round(float(var) ** 0.5, 6)
            x["ci95_shared_spread"] = [round(lo, 6), round(hi, 6)]


def fmt(x: dict, key: str) -> str:
    lo, hi = x[key]
    return f"{lo:+.4f} … {hi:+.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", type=int, default=10000)
    a = ap.parse_args()
    out = []
    for lever, kept, sources in LEVERS:
        pairs = [p for s in sources for p in expand(s)]
        if len(pairs) < 2:
            continue
        r = pooled([(p["a"], p["b"]) for p in pairs], a.bootstrap)
        out.append({"lever": lever, "cpu_budget": kept, "pairs": [{"base": p["base"], "other": p["other"]} for p in pairs],
                    **r})
    with_shared_spread(out)
    write_json_atomic(RESULTS / "pooled_gains.json", {
        "note": "levers measured at two or more seeds (or budgets), pooled: mean of the pairs' per-image gains on "
                "fold 0's 601 held-out real images, 95% interval counting the spread between pairs and the images "
                "(tgs_salt.compare.pooled), the same with the run spread pooled over every group (ci95_shared_spread), "
                "and the bootstrap interval over images alone; computed from the stored results named per pair, "
                "whose own files say which machine each came from",
        "levers": out})
    sd = {k: out[0][k]["shared_run_sd"] for k in ("default_threshold", "nested")} if out else {}
    print(f"a pair's gain varies between runs by sd {sd.get('default_threshold', 0):.4f} at 0.5 and "
          f"{sd.get('nested', 0):.4f} nested (pooled over the {len(out)} groups)\n")
    print("| lever | pairs | gain at 0.5, per pair | pooled | 95%: its own spread | 95%: shared spread | "
          "nested, per pair | pooled | 95%: its own spread | 95%: shared spread | `cpu_budget` |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in out:
        cells = []
        for x in (r["default_threshold"], r["nested"]):
            cells += [", ".join(f"{g:+.4f}" for g in x["pair_gains"]), f"**{x['gain']:+.4f}**", fmt(x, "ci95"),
                      fmt(x, "ci95_shared_spread")]
        print(f"| {r['lever']} | {r['n_pairs']} | {' | '.join(cells)} | {r['cpu_budget']} |")
    sub = [r for r in out if "submitted" in r]
    if sub:
        print(f"\nas submitted, the choice between tuned and untuned post-processing made held out too (sd between "
              f"runs {sub[0]['submitted']['shared_run_sd']:.4f}, pooled over these {len(sub)} groups)\n")
        print("| lever | pairs | per pair | pooled | 95%: its own spread | 95%: shared spread |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in sub:
            x = r["submitted"]
            print(f"| {r['lever']} | {r['n_pairs']} | {', '.join(f'{g:+.4f}' for g in x['pair_gains'])} | "
                  f"**{x['gain']:+.4f}** | {fmt(x, 'ci95')} | {fmt(x, 'ci95_shared_spread')} |")

if __name__ == "__main__":
    main()
