"""Download and unpack the competition data into the Kaggle layout."""

from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path

from tgs_salt.data.kaggle_io import has_layout
from tgs_salt.errors import UserError
from tgs_salt.kaggle_api import COMPETITION, explain_api_error, get_api

log = logging.getLogger(__name__)


def unpack_all(folder: Path) -> None:
    """Extract every .zip in ``folder`` (the competition archive holds further archives)
    into the folder the archive names (train.zip -> train/, else in place), then remove it."""
    for _ in range(5):  # nested archives: a few rounds at most
        archives = sorted(folder.rglob("*.zip"))
        if not archives:
            return
        for arc in archives:
            try:
                with zipfile.ZipFile(arc) as zf:
                    names = zf.namelist()
                    target = arc.parent
                    # train.zip holds images/ and masks/ without a train/ prefix
                    stem = arc.stem
                    if stem in ("train", "test") and not any(n.startswith(stem + "/") for n in names):
                        target = arc.parent / stem
                    zf.extractall(target)
            except zipfile.BadZipFile:
                raise UserError(f"{arc} is not a valid zip archive; delete it and download again") from None
            arc.unlink()


def download(data_dir: Path, force: bool = False) -> Path:
    data_dir = Path(data_dir)
    if has_layout(data_dir) and not force:
        log.info("%s already holds the competition data (use --force to download again)", data_dir)
        return data_dir
    api = get_api()
    tmp = data_dir.with_name(data_dir.name + ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        api.competition_download_files(COMPETITION, path=str(tmp), quiet=False)
    except UserError:
        raise
    except (Exception, SystemExit) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise explain_api_error(exc, "download") from None
    unpack_all(tmp)
    if not has_layout(tmp):
        found = sorted(p.name for p in tmp.iterdir())
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"the downloaded archive did not unpack to the Kaggle layout (found {found})")
    data_dir.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        dest = data_dir / item.name
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        item.rename(dest)
    tmp.rmdir()
    return data_dir
