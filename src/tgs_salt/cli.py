"""TGS Salt Identification Challenge: data, folds, training, CV, prediction and submission.

Each command imports only what it needs; `python -m tgs_salt <command> --help` for its options."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from tgs_salt.errors import UserError, sticky_interrupt

log = logging.getLogger("tgs_salt")


def _data_dir(args) -> Path:
    from tgs_salt import paths

    return Path(args.data_dir) if getattr(args, "data_dir", None) else paths.data_dir()


# ----------------------------------------------------------------------------- commands

def cmd_download(args) -> int:
    from tgs_salt.data.download import download

    out = download(_data_dir(args), force=args.force)
    print(out)
    return 0


def cmd_synth(args) -> int:
    from tgs_salt.data.synth import write_synthetic

    out = write_synthetic(args.out, n_train=args.train, n_test=args.test, seed=args.seed, force=args.force)
    print(f"synthetic Kaggle-format data: {args.train} train, {args.test} test images in {out}")
    return 0


def cmd_validate(args) -> int:
    from tgs_salt.submission import validate_submission

    sample = Path(args.sample) if args.sample else _data_dir(args) / "sample_submission.csv"
    v = validate_submission(args.submission, sample)
    if v.ok:
        print(f"OK {args.submission}: {v.rows} rows, {v.non_empty} non-empty masks")
        return 0
    print(f"INVALID {args.submission}: {len(v.problems)} problem(s)", file=sys.stderr)
    for p in v.problems[:20]:
        print(f"  {p}", file=sys.stderr)
    if len(v.problems) > 20:
        print(f"  ... and {len(v.problems) - 20} more", file=sys.stderr)
    return 1


def cmd_score(args) -> int:
    from tgs_salt.submission import score_submission

    truth = Path(args.truth) if args.truth else _data_dir(args) / "train.csv"
    score, n = score_submission(args.submission, truth)
    print(f"competition score over {n} images of {truth}:")
    print(f"{score:.6f}")
    return 0


def cmd_folds(args) -> int:
    from tgs_salt.data.folds import make_folds

    k, seed, name = args.k, args.seed, args.name
    if args.config:  # the fold settings of an experiment config
        from tgs_salt.config import load_config

        f = load_config(args.config)["folds"]
        k, seed, name = f["k"], f["seed"], name or f["file"]
    path = make_folds(_data_dir(args), k=k or 5, seed=42 if seed is None else seed, name=name, force=args.force)
    print(path)
    return 0


def cmd_config(args) -> int:
    from tgs_salt.config import dump, load_config

    cfg = load_config(args.config, args.set)
    if args.get == "name":
        print(cfg["name"])
    elif args.get == "folds":
        from tgs_salt.train import parse_folds

        print(",".join(map(str, parse_folds(None, args.folds, cfg))))
    else:
        print(dump(cfg), end="")
    return 0


def cmd_train(args) -> int:
    from tgs_salt.train import train_command

    return train_command(args)


def cmd_cv(args) -> int:
    from tgs_salt.report import cv_command

    return cv_command(args)


def cmd_predict(args) -> int:
    from tgs_salt.predict import predict_command

    return predict_command(args)


def cmd_submit(args) -> int:
    from tgs_salt.submit import submit_command

    return submit_command(args)


def cmd_runs(args) -> int:
    from tgs_salt.runs import runs_command

    return runs_command(args)


def cmd_run(args) -> int:
    from tgs_salt.pipeline import run_command

    return run_command(args)


def cmd_compare(args) -> int:
    from tgs_salt.compare import compare_command

    return compare_command(args)


def device_type_command(name: str) -> int:
    """For run_all.sh: print cpu or cuda for ``--device name``; a clear error (exit 2) when GPUs are
    present that torch cannot use."""
    from tgs_salt.hardware import resolve_device

    try:
        print(resolve_device(name).type)
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tgs_salt", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    def data_arg(sp):
        sp.add_argument("--data-dir", help="Kaggle-format folder (default: $TGS_DATA_DIR or data/)")

    s = sub.add_parser("run", help="the whole job: data, folds, training, CV, prediction, submission [, submit]",
                       description="The whole job (what ./run_all.sh runs after setting up the environment). "
                       "Completed folds are skipped and interrupted ones resumed.",
                       epilog="examples: python -m tgs_salt run --data-dir ../shared/tgs-salt --time-budget 60\n"
                       "          python -m tgs_salt run --config competition --set train.lr=5e-4 --folds 0,1",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    from tgs_salt.pipeline import add_arguments

    add_arguments(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("download", help="download and unpack the competition data with the kaggle API")
    data_arg(s)
    s.add_argument("--force", action="store_true", help="download again even if the data is there")
    s.set_defaults(func=cmd_download)

    s = sub.add_parser("synth", help="write a synthetic Kaggle-format dataset")
    s.add_argument("out", help="output folder")
    s.add_argument("--train", type=int, default=1000, help="train images (default 1000)")
    s.add_argument("--test", type=int, default=500, help="test images (default 500)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("validate", help="check a submission CSV against sample_submission.csv")
    s.add_argument("submission")
    s.add_argument("--sample", help="sample_submission.csv (default: the data folder's)")
    data_arg(s)
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("score", help="competition score of a submission against a truth CSV")
    s.add_argument("submission")
    s.add_argument("--truth", help="truth CSV id,rle_mask (default: the data folder's train.csv)")
    data_arg(s)
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("folds", help="write a stratified K-fold assignment folds/<name>.csv")
    data_arg(s)
    s.add_argument("--config", help="take k, seed and file name from this config's folds section")
    s.add_argument("--k", type=int, help="number of folds (default 5)")
    s.add_argument("--seed", type=int, help="shuffle seed (default 42)")
    s.add_argument("--name", help="fold file name (default: k<K>-seed<S>)")
    s.add_argument("--force", action="store_true", help="rewrite an existing, different fold file")
    s.set_defaults(func=cmd_folds)

    s = sub.add_parser("config", help="print a resolved config (checked), or one fact of it")
    s.add_argument("config", help="YAML config (a path, or a name in configs/)")
    s.add_argument("--get", choices=["name", "folds"], help="print only the run name, or the folds to train")
    s.add_argument("--folds", help="with --get folds: the folds asked for (checked against the config)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("train", help="train one or more folds")
    s.add_argument("--config", required=True, help="YAML config (a path, or a name in configs/)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--fold", type=int, help="one fold")
    g.add_argument("--folds", help="comma-separated folds (default: all)")
    data_arg(s)
    s.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted fold from its last checkpoint")
    s.add_argument("--force", action="store_true", help="retrain completed folds")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--workers", type=int, help="data-loading worker processes (default: 0 on CPU, 6 on CUDA)")
    s.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    s.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="plan the epochs so that the whole job (these folds, OOF, CV, prediction) fits in MINUTES "
                        "(counted from $TGS_JOB_START when run_all.sh sets it); default: train.time_budget_minutes")
    s.add_argument("--plan-only", action="store_true",
                   help="choose the precision and make the time plan, then stop (run_all.sh before parallel folds)")
    s.add_argument("--parallel-folds", type=int, default=1, metavar="N",
                   help="folds the caller trains at the same time (for the time plan; default 1)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.0005 (repeatable)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("cv", help="cross-validation report from out-of-fold predictions")
    s.add_argument("--run-dir", action="append", required=True, help="run directory (repeat to ensemble)")
    s.add_argument("--weights", help="comma-separated weights, one per run directory")
    data_arg(s)
    s.add_argument("--no-plots", action="store_true")
    s.set_defaults(func=cmd_cv)

    s = sub.add_parser("predict", help="fold-ensemble test predictions with flip TTA and a submission CSV")
    s.add_argument("--run-dir", action="append", required=True, help="run directory (repeat to ensemble)")
    s.add_argument("--weights", help="comma-separated weights, one per run directory")
    data_arg(s)
    s.add_argument("--out", help="submission path (default: submissions/<name>.csv)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("runs", help="compare runs: one row per run directory (CV, changed keys, time, precision)")
    s.add_argument("dir", nargs="?", help="a directory of runs, or one run (default: $TGS_RUNS_DIR or runs/)")
    s.set_defaults(func=cmd_runs)

    s = sub.add_parser("compare", help="paired comparison of two runs (or of several pairs) on the same held-out "
                       "images, with a bootstrap interval", epilog="examples: python -m tgs_salt compare runs/cpu_budget "
                       "runs/mine; python -m tgs_salt compare runs/base_s42 runs/mine_s42 runs/base_s43 runs/mine_s43")
    s.add_argument("base", help="the reference run directory (or a result JSON with per-image scores, "
                   "as bench/record_run.py writes them)")
    s.add_argument("other", help="the run directory (or result JSON) compared against it")
    s.add_argument("more", nargs="*", metavar="BASE OTHER", help="further pairs (one per seed, say): the gain is "
                   "then also pooled over the pairs, with an interval counting the spread between runs")
    data_arg(s)
    s.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples (default 10000)")
    s.add_argument("--out", help="also write the result to this JSON file")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("submit", help="validate and submit a CSV to Kaggle")
    s.add_argument("submission")
    s.add_argument("-m", "--message", required=True)
    s.add_argument("--sample", help="sample_submission.csv (default: the data folder's)")
    data_arg(s)
    s.add_argument("--dry-run", action="store_true", help="validate and print what would be sent")
    s.set_defaults(func=cmd_submit)
    return p


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if hasattr(signal, "SIGXFSZ"):  # past a file-size limit: an EFBIG error we can name, not a silent kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        with sticky_interrupt():  # Ctrl-C stops the run even when a finalizer swallowed its KeyboardInterrupt
            return int(args.func(args) or 0)
    except UserError as exc:
        if args.verbose:  # -v: the traceback too, for a bug report
            import traceback

            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
