"""The one place that resolves paths. Every default can be moved by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2]
# a checkout (or `pip install -e .`) keeps data/, runs/, folds/... beside run_all.sh; an installed
# package uses the working directory instead
REPO_ROOT = _CHECKOUT if (_CHECKOUT / "run_all.sh").exists() else Path.cwd()


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else default


def data_dir() -> Path:
    """Kaggle-format data folder (train.csv, depths.csv, train/, test/...)."""
    return _env_path("TGS_DATA_DIR", REPO_ROOT / "data")


def cache_dir() -> Path:
    """Decoded-array caches (.npz), keyed by the data folder's contents."""
    return _env_path("TGS_CACHE_DIR", REPO_ROOT / "cache")


def folds_dir() -> Path:
    return _env_path("TGS_FOLDS_DIR", REPO_ROOT / "folds")


def runs_dir() -> Path:
    return _env_path("TGS_RUNS_DIR", REPO_ROOT / "runs")


def submissions_dir() -> Path:
    return _env_path("TGS_SUBMISSIONS_DIR", REPO_ROOT / "submissions")


def configs_dir() -> Path:
    """The shipped configs: package data (``configs/`` at the repository root links here)."""
    return Path(__file__).resolve().parent / "configs"


def shared_data_dir() -> Path:
    """The real-data subset beside a developer's checkout (absent on a fresh clone)."""
    return _env_path("TGS_SHARED_DATA", REPO_ROOT.parent / "shared" / "tgs-salt")
