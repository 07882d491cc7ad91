"""Write, validate and score Kaggle submission files (id,rle_mask)."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tgs_salt.errors import UserError
from tgs_salt.io_utils import atomic_path
from tgs_salt.metric import per_image_scores
from tgs_salt.rle import SHAPE, rle_decode, rle_encode, rle_problems

HEADER = ["id", "rle_mask"]


def write_submission(path: str | os.PathLike, ids: Iterable[str], masks: np.ndarray) -> Path:
    """Encode ``masks`` (N, 101, 101) and write the CSV atomically."""
    ids = list(ids)
    if len(ids) != len(masks):
        raise ValueError(f"{len(ids)} ids but {len(masks)} masks")
    return write_rles(path, ids, [rle_encode(m) for m in masks])


def write_rles(path: str | os.PathLike, ids: list[str], rles: list[str]) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(HEADER)
        w.writerows(zip(ids, rles))
    return path


def read_rle_csv(path: str | os.PathLike, what: str = "submission") -> tuple[list[str], list[str], list[str]]:
    """Return (ids, rles, problems) of an id,rle_mask CSV; structural problems are listed, not raised."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    problems: list[str] = []
    ids: list[str] = []
    rles: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # a UTF-8 BOM is accepted, as by the data reader
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise UserError(f"{what} file {path} is empty")
            if [h.strip() for h in header] != HEADER:
                problems.append(f"header is {','.join(header)!r}, expected 'id,rle_mask'")
            for line_no, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != 2:
                    problems.append(f"line {line_no}: {len(row)} fields, expected 2")
                    continue
                ids.append(row[0].strip())
                rles.append(row[1].strip())
    except UnicodeDecodeError:
        raise UserError(f"{what} file {path} is not a text CSV") from None
    return ids, rles, problems


@dataclass
class Validation:
    rows: int
    non_empty: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_submission(path: str | os.PathLike, sample: str | os.PathLike) -> Validation:
    """Check header, ids (each sample id exactly once, no other) and every RLE's form."""
    ids, rles, problems = read_rle_csv(path)
    sample_ids, _, sample_problems = read_rle_csv(sample, "sample submission")
    if sample_problems:
        raise UserError(f"sample submission {sample}: {sample_problems[0]}")
    expected = set(sample_ids)
    seen: set[str] = set()
    for i, rle in zip(ids, rles):
        if i in seen:
            problems.append(f"id {i}: appears more than once")
        seen.add(i)
        if i not in expected:
            problems.append(f"id {i}: not in the sample submission")
        for p in rle_problems(rle, SHAPE):
            problems.append(f"id {i}: {p}")
    missing = [i for i in sample_ids if i not in seen]
    if missing:
        problems.append(f"{len(missing)} sample id(s) missing, e.g. {', '.join(missing[:5])}")
    return Validation(rows=len(ids), non_empty=sum(bool(r) for r in rles), problems=problems)


def _first_duplicate(items: list[str]) -> str | None:
    seen: set[str] = set()
    for i in items:
        if i in seen:
            return i
        seen.add(i)
    return None


def score_submission(path: str | os.PathLike, truth: str | os.PathLike) -> tuple[float, int]:
    """Competition score of a submission against a truth CSV (such as train.csv)."""
    ids, rles, problems = read_rle_csv(path)
    t_ids, t_rles, t_problems = read_rle_csv(truth, "truth")
    if problems:
        raise UserError(f"submission {path}: {problems[0]}")
    if t_problems:
        raise UserError(f"truth {truth}: {t_problems[0]}")
    if not t_ids:
        raise UserError(f"truth {truth} has a header but no rows: nothing to score")
    for what, src, lst in (("submission", path, ids), ("truth", truth, t_ids)):
        dup = _first_duplicate(lst)
        if dup is not None:
            raise UserError(f"{what} {src}: id {dup} appears more than once")
    pred_by_id = dict(zip(ids, rles))
    missing = [i for i in t_ids if i not in pred_by_id]
    if missing:
        raise UserError(f"submission {path} lacks {len(missing)} truth id(s), e.g. {missing[0]}")
    pred = np.empty((len(t_ids), *SHAPE), dtype=bool)
    true = np.empty_like(pred)
    for k, (i, rle) in enumerate(zip(t_ids, t_rles)):
        for arr, r, src in ((pred, pred_by_id[i], path), (true, rle, truth)):
            try:
                arr[k] = rle_decode(r)
            except ValueError as exc:
                raise UserError(f"{src}: id {i}: {exc}") from None
    return float(per_image_scores(pred, true).mean()), len(t_ids)
