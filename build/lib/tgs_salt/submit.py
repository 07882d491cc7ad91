"""Validate a submission and send it to the competition through the kaggle API."""

from __future__ import annotations

import sys
from pathlib import Path

from tgs_salt import paths
from tgs_salt.errors import UserError
from tgs_salt.kaggle_api import COMPETITION, explain_api_error, get_api
from tgs_salt.submission import validate_submission


def submit(submission: Path, message: str, sample: Path, dry_run: bool = False) -> str:
    if not sample.exists():
        raise UserError(f"{sample} not found: pass --sample or --data-dir with the competition's sample_submission.csv")
    v = validate_submission(submission, sample)
    if not v.ok:
        listed = "\n  ".join(v.problems[:20])
        raise UserError(f"{submission} does not validate ({len(v.problems)} problem(s)); not submitted:\n  {listed}")
    if dry_run:
        return (f"dry run: would submit {submission} ({v.rows} rows, {v.non_empty} non-empty masks) to {COMPETITION} "
                f"with message {message!r}")
    api = get_api()
    try:
        answer = api.competition_submit(str(submission), message, COMPETITION)
    except (Exception, SystemExit) as exc:
        raise explain_api_error(exc, "submission") from None
    text = getattr(answer, "message", None) or str(answer)
    return f"submitted {submission} to {COMPETITION}: {text}"


def submit_command(args) -> int:
    data_dir = Path(args.data_dir) if args.data_dir else paths.data_dir()
    sample = Path(args.sample) if args.sample else data_dir / "sample_submission.csv"
    print(submit(Path(args.submission), args.message, sample, dry_run=args.dry_run))
    sys.stdout.flush()
    return 0
