"""Stratified K-fold assignment persisted as folds/<name>.csv (id, fold).

Strata: empty masks, then ten salt-coverage bins, so every fold holds the same share of
empty, small and large masks. The file, not the seed, is what training and CV read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tgs_salt import paths
from tgs_salt.errors import UserError
from tgs_salt.io_utils import atomic_path

log = logging.getLogger(__name__)


def coverage_class(masks: np.ndarray) -> np.ndarray:
    """0 for an empty mask, else 1 + coverage decile (1..10)."""
    cov = masks.reshape(len(masks), -1).mean(axis=1)
    cls = 1 + np.minimum((cov * 10).astype(int), 9)
    return np.where(cov == 0, 0, cls)


def stripe_masks(masks: np.ndarray) -> np.ndarray:
    """Per mask: the labelling artefact of this competition's "vertical" masks: some salt, not all of
    it, and every column either all salt or all empty, top to bottom (84 of the 3001 real training
    masks here; the images rarely show why)."""
    m = np.asarray(masks).astype(bool)
    m = m.reshape(len(m), *m.shape[-2:])
    full_cols, empty_cols = m.all(axis=1), ~m.any(axis=1)
    some = full_cols.any(axis=1) & ~full_cols.all(axis=1)
    return some & (full_cols | empty_cols).all(axis=1)


def assign_folds(ids: np.ndarray, masks: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold

    if k < 2:
        raise UserError(f"--k must be at least 2 (got {k})")
    strata = coverage_class(masks)
    # merge strata too small for k splits into their neighbour so StratifiedKFold can split them
    counts = np.bincount(strata, minlength=11)
    for c in range(11):
        if 0 < counts[c] < k:
            target = c - 1 if c > 1 else c + 1
            strata[strata == c] = target
            counts[target] += counts[c]
            counts[c] = 0
    if len(ids) < k:
        raise UserError(f"{len(ids)} images cannot be split into {k} folds")
    folds = np.empty(len(ids), dtype=np.int64)
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, val) in enumerate(skf.split(np.zeros(len(ids)), strata)):
        folds[val] = f
    return folds


def default_name(data_dir: Path, k: int, seed: int) -> str:
    return f"{Path(data_dir).resolve().name}-k{k}-seed{seed}"


def fold_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".csv" or p.parent != Path("."):
        return p
    return paths.folds_dir() / f"{name}.csv"


def make_folds(data_dir: Path, k: int = 5, seed: int = 42, name: str | None = None,
               force: bool = False) -> Path:
    """Write the fold file; an existing file with a different assignment needs ``force``."""
    import pandas as pd

    from tgs_salt.data.kaggle_io import load_train

    data = load_train(data_dir)
    folds = assign_folds(data.ids, data.masks, k, seed)
    path = fold_path(name or default_name(data_dir, k, seed))
    new = pd.DataFrame({"id": data.ids, "fold": folds})
    if path.exists():
        old = read_folds(path)
        if old.equals(new):
            log.info("%s is up to date", path)
            return path
        if not force:
            raise UserError(f"{path} exists with a different assignment; trained models may depend on it. "
                            "Pass --force to rewrite it (then retrain every fold)")
    with atomic_path(path, suffix=".csv") as tmp:
        new.to_csv(tmp, index=False)
    log.info("wrote %s: %d ids in %d folds", path, len(new), k)
    return path


def read_folds(path: Path) -> object:
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"fold file {path} does not exist; make it with `python -m tgs_salt folds`")
    try:
        df = pd.read_csv(path, dtype={"id": str})
    except Exception as exc:
        raise UserError(f"fold file {path}: cannot read ({exc})") from None
    if list(df.columns) != ["id", "fold"] or not np.issubdtype(df["fold"].dtype, np.integer):
        raise UserError(f"fold file {path}: expected integer columns id,fold; found {list(df.columns)}")
    return df.reset_index(drop=True)


def folds_for(ids: np.ndarray, path: Path) -> np.ndarray:
    """Fold of every id, in the order of ``ids``; the fold file must cover exactly these ids."""
    df = read_folds(path)
    by_id = dict(zip(df["id"], df["fold"]))
    missing = [i for i in ids if i not in by_id]
    extra = set(by_id) - set(ids)
    if missing or extra:
        raise UserError(f"fold file {path} does not match the data: {len(missing)} data id(s) not in it"
                        f"{' (e.g. ' + missing[0] + ')' if missing else ''}, {len(extra)} id(s) not in the data"
                        f"{' (e.g. ' + sorted(extra)[0] + ')' if extra else ''}; "
                        "make folds for this data with `python -m tgs_salt folds`")
    return np.array([by_id[i] for i in ids], dtype=np.int64)
