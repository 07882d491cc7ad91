"""``python -m tgs_salt compare BASE OTHER``: is OTHER better than BASE, beyond noise?

BASE and OTHER are run directories, or result files that kept their per-image scores
(``bench/record_run.py`` writes them to ``bench/results/``).

Both runs' out-of-fold predictions are scored image by image on the images they share, at the
default threshold and with nested post-processing (each group tuned on the others, the same
groups for both runs), and the mean per-image difference OTHER - BASE is reported with a 95%
bootstrap interval over images. 601 images give a standard error of about 0.016 on one score,
but paired differences cancel what the images have in common and resolve far smaller gains.

That interval is over images only: two training runs of the same recipe (another seed, or the same
seed on a host that fits fewer epochs) differ by more than it allows. ``compare B1 O1 B2 O2 ...``
pairs several runs (say, one pair per seed) and pools them: the mean of the pairs' gains, with an
interval counting both the spread between the pairs' gains and the images' sampling error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tgs_salt.data.folds import folds_for
from tgs_salt.errors import UserError
from tgs_salt.io_utils import write_json_atomic
from tgs_salt.metric import per_image_scores
from tgs_salt.postprocess import apply, nested_scores, policy_scores, score_table, split_groups, untuned
from tgs_salt.report import oof_with_truth, read_run, run_fold_file


def bootstrap_interval(diff: np.ndarray, n_boot: int = 10000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of the mean of ``diff`` (resampling images)."""
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for s in range(0, n_boot, 1000):  # in chunks: 1000 x n indices at a time
        k = min(1000, n_boot - s)
        means[s:s + k] = diff[rng.integers(0, len(diff), (k, len(diff)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# the per-image measures a comparison pairs: at the default threshold, with nested post-processing, and
# (when both sides kept it) with the post-processing the submission gets, chosen held out too
MEASURES = (("default_threshold", "default"), ("nested", "nested"), ("submitted", "policy"))


def measures(*scores: dict) -> list[tuple[str, str]]:
    return [(name, key) for name, key in MEASURES if all(key in s for s in scores)]


def per_image(run_dir: Path | list[Path], data_dir: Path | None, with_policy: bool = False):
    """ids, per-image scores at the default threshold and nested, and the nested method, of a run's
    OOF predictions (or, given a list of runs, of their equal-weight average: an ensemble); with
    ``with_policy``, also the per-image scores of the post-processing policy
    (:func:`tgs_salt.postprocess.policy_scores`)."""
    runs = [Path(r) for r in run_dir] if isinstance(run_dir, (list, tuple)) else [Path(run_dir)]
    cfg, facts = read_run(runs[0])
    ids, probs, cls, data, rows = oof_with_truth(runs, np.full(len(runs), 1 / len(runs)),
                                                 data_dir or Path(facts["data_dir"]))
    truth = data.masks[rows]
    at_default = per_image_scores(apply(probs, untuned(cfg, cls is not None), cls=cls), truth)
    groups, how = split_groups(folds_for(data.ids, run_fold_file(facts))[rows])
    table = score_table(probs, truth, cfg, cls)
    nested, _ = nested_scores(probs, truth, cfg, groups, cls, table)
    if with_policy:
        return ids, at_default, nested, how, policy_scores(probs, truth, cfg, groups, cls, table)[0]
    return ids, at_default, nested, how


def paired(a: dict, b: dict, n_boot: int = 10000) -> dict:
    """Paired gain of ``b`` over ``a``, each a dict of ``ids``, ``default`` and ``nested`` per-image
    scores and ``nested_method`` (as :func:`run_scores` returns them, or as an ablation table stores them)."""
    if not np.array_equal(np.asarray(a["ids"]), np.asarray(b["ids"])):
        raise UserError(f"the two runs hold out different images ({len(a['ids'])} and {len(b['ids'])}); a paired "
                        "comparison needs the same folds (same folds file and folds.train_folds)")
    if a.get("nested_method") != b.get("nested_method"):
        raise UserError(f"the two runs were tuned on different groups of images ({a.get('nested_method')} / "
                        f"{b.get('nested_method')}); a paired comparison needs the same folds")
    out = {"n_images": len(a["ids"]), "bootstrap_resamples": n_boot}
    for name, key in measures(a, b):
        x, y = np.asarray(a[key], dtype=float), np.asarray(b[key], dtype=float)
        d = y - x
        lo, hi = bootstrap_interval(d, n_boot)
        out[name] = {"base": round(float(x.mean()), 6), "other": round(float(y.mean()), 6),
                     "gain": round(float(d.mean()), 6), "ci95": [round(lo, 6), round(hi, 6)],
                     "images_better": int((d > 0).sum()), "images_worse": int((d < 0).sum())}
    return out


def t_interval(gain: float, v_runs: float, df_runs: int, v_images: float, df_images: int,
               level: float = 0.95) -> tuple[float, float, float]:
    """``gain`` +- Student's t times the standard error sqrt(v_runs + v_images), with Welch-Satterthwaite
    degrees of freedom from the two variances' own; returns (low, high, degrees of freedom)."""
    from scipy.stats import t as student_t

    se = (v_runs + v_images) ** 0.5
    if se == 0:
        return gain, gain, float("inf")
    df = se ** 4 / (v_runs ** 2 / df_runs + v_images ** 2 / df_images)
    half = float(student_t.ppf((1 + level) / 2, df)) * se
    return gain - half, gain + half, df


def pooled_t(d: np.ndarray):
    """Per-image gains ``d`` (runs x images) pooled: the mean gain, the runs' gains, the per-image
    gains averaged over the runs, the two variances of the mean (runs, images) and the t interval
    (:func:`t_interval`) that adds them. With one run the runs' variance is taken as 0."""
    m, n = d.shape
    gains, per_image_gain = d.mean(axis=1), d.mean(axis=0)
    gain = float(gains.mean())
    v_runs = float(gains.var(ddof=1)) / m if m > 1 else 0.0
    v_images = float(per_image_gain.var(ddof=1)) / n
    return gain, gains, per_image_gain, v_runs, v_images, t_interval(gain, v_runs, max(m - 1, 1), v_images, n - 1)


def pooled(pairs: list[tuple[dict, dict]], n_boot: int = 10000) -> dict:
    """Gain of OTHER over BASE pooled over several pairs of runs (a pair per seed, say), each pair as
    :func:`paired` takes it; every run must hold out the same images, tuned on the same groups.

    The pooled gain is the mean of the pairs' gains. Its interval counts the two sources of noise:
    which runs were drawn (the sample variance of the pairs' gains over their number) and which images
    (the variance of the per-image gains averaged over the pairs, over the number of images), added,
    with Welch-Satterthwaite degrees of freedom for Student's t. The sum counts the run-by-image
    interaction twice, so the interval errs on the wide side; with two or three pairs it is wide
    because the run-to-run spread is poorly known, which is what it should say. The bootstrap interval
    over images alone (the runs taken as fixed) is reported beside it."""
    if len(pairs) < 2:
        raise UserError("pooling needs at least two pairs of runs")
    first = pairs[0][0]
    for i, (a, b) in enumerate(pairs):
        for which, x in (("base", a), ("other", b)):
            if not np.array_equal(np.asarray(x["ids"]), np.asarray(first["ids"])) \
                    or x.get("nested_method") != first.get("nested_method"):
                raise UserError(f"pair {i + 1}'s {which} holds out other images (or was tuned on other groups) than "
                                "pair 1's base; pooling needs every run on the same folds")
    m, n = len(pairs), len(first["ids"])
    out = {"n_pairs": m, "n_images": n, "bootstrap_resamples": n_boot}
    for name, key in measures(*(x for pair in pairs for x in pair)):
        d = np.stack([np.asarray(b[key], dtype=float) - np.asarray(a[key], dtype=float) for a, b in pairs])
        gain, gains, per_image_gain, v_runs, v_images, (t_lo, t_hi, df) = pooled_t(d)
        lo, hi = bootstrap_interval(per_image_gain, n_boot)
        out[name] = {"gain": round(gain, 6), "pair_gains": [round(float(g), 6) for g in gains],
                     "se_runs": round(v_runs ** 0.5, 6), "se_images": round(v_images ** 0.5, 6),
                     "df": round(df, 2), "ci95": [round(t_lo, 6), round(t_hi, 6)],
                     "ci95_images_only": [round(lo, 6), round(hi, 6)]}
    return out


def run_scores(run_dir: Path, data_dir: Path | None = None) -> dict:
    ids, at_default, nested, how, policy = per_image(run_dir, data_dir, with_policy=True)
    return {"ids": [str(i) for i in ids], "default": np.round(at_default, 4).tolist(),
            "nested": np.round(nested, 4).tolist(), "policy": np.round(policy, 4).tolist(),
            "nested_method": how}


def stored_or_run_scores(path: Path, data_dir: Path | None = None) -> dict:
    """Per-image scores of a run directory (scored now) or of a recorded result: a JSON file
    holding them under ``per_image`` (``bench/record_run.py`` keeps them), so that an hour whose
    run directory is gone can still be paired against a new one."""
    path = Path(path)
    if not path.is_file():
        return run_scores(path, data_dir)
    try:
        rec = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a run directory nor a JSON result file ({e})") from None
    return recorded_scores(rec, str(path), "compare the run directories instead")


def recorded_scores(record, where: str, hint: str) -> dict:
    """The per-image scores a recorded result (a ``bench/results`` file, or a row of an ablation
    table) keeps under ``per_image``; a clear error naming ``where`` when it kept none."""
    scores = record.get("per_image") if isinstance(record, dict) else None
    if not isinstance(scores, dict) or not {"ids", "default", "nested", "nested_method"} <= scores.keys():
        raise UserError(f"{where}: holds no per-image scores (a result recorded before they were kept, or not "
                        f"a result file); {hint}")
    if not len(scores["ids"]) == len(scores["default"]) == len(scores["nested"]) == len(
            scores.get("policy", scores["ids"])):
        raise UserError(f"{where}: per_image has {len(scores['ids'])} ids but {len(scores['default'])} / "
                        f"{len(scores['nested'])} / {len(scores.get('policy', scores['ids']))} scores")
    return scores


def _named_pair(base: Path, other: Path, scores: dict, n_boot: int) -> dict:
    try:
        r = paired(scores[base], scores[other], n_boot)
    except UserError as e:
        raise UserError(f"{base} and {other}: {e}") from None
    return {"base": str(base), "other": str(other), "nested_method": scores[base]["nested_method"], **r}


def compare_pairs(paths: list[Path], data_dir: Path | None = None, n_boot: int = 10000) -> dict:
    """The paired comparison of each pair of ``paths`` (BASE1, OTHER1, BASE2, OTHER2, ...): given one
    pair, its result; given more, every pair's and :func:`pooled` over them."""
    if len(paths) % 2:
        raise UserError(f"compare takes runs in pairs (BASE OTHER [BASE OTHER ...]); got {len(paths)}: "
                        f"{' '.join(str(p) for p in paths)}")
    paths = [Path(p) for p in paths]
    pairs = list(zip(paths[::2], paths[1::2]))
    scores = {p: stored_or_run_scores(p, data_dir) for p in dict.fromkeys(paths)}
    results = [_named_pair(a, b, scores, n_boot) for a, b in pairs]
    if len(results) == 1:
        return results[0]
    return {"nested_method": scores[pairs[0][0]]["nested_method"],
            "pooled": pooled([(scores[a], scores[b]) for a, b in pairs], n_boot), "pairs": results}


def _verdict(ci) -> str:
    return "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "not resolved from noise"


def _print_pair(r: dict) -> None:
    print(f"{Path(r['other']).name} against {Path(r['base']).name}, paired on {r['n_images']} held-out images")
    for name in (n for n, _ in MEASURES if n in r):
        x = r[name]
        print(f"  {name:>17s}: {x['base']:.4f} -> {x['other']:.4f}  gain {x['gain']:+.4f} "
              f"(95% bootstrap {x['ci95'][0]:+.4f} .. {x['ci95'][1]:+.4f}; {x['images_better']} images better, "
              f"{x['images_worse']} worse): {_verdict(x['ci95'])}")


def compare_command(args) -> int:
    r = compare_pairs([Path(args.base), Path(args.other), *map(Path, args.more)],
                      Path(args.data_dir) if args.data_dir else None, args.bootstrap)
    if "pooled" not in r:
        _print_pair(r)
        print("  the interval is over images only: training runs of one recipe differ by more; pair one run per "
              "seed (compare B1 O1 B2 O2 ...) to count that too")
    else:
        for pair in r["pairs"]:
            _print_pair(pair)
        p = r["pooled"]
        print(f"pooled over {p['n_pairs']} pairs (the runs and the {p['n_images']} images both sampled)")
        for name in (n for n, _ in MEASURES if n in p):
            x = p[name]
            print(f"  {name:>17s}: gain {x['gain']:+.4f} (pairs {', '.join(f'{g:+.4f}' for g in x['pair_gains'])}; "
                  f"95% interval {x['ci95'][0]:+.4f} .. {x['ci95'][1]:+.4f}, t with {x['df']:.1f} df; "
                  f"images alone {x['ci95_images_only'][0]:+.4f} .. {x['ci95_images_only'][1]:+.4f}): "
                  f"{_verdict(x['ci95'])}")
    note = f"  nested: {r['nested_method']}"
    if "submitted" in r.get("pooled", r):
        note += "; submitted: the post-processing the submission gets, its choice (tuned or not) made held out too"
    print(note)
    if args.out:
        write_json_atomic(Path(args.out), r)
        print(args.out)
    else:
        print(json.dumps(r))
    return 0
