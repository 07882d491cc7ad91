"""Read a Kaggle-format TGS folder into arrays, with a cache keyed by the folder's files.

Layout (as unpacked from the competition archive)::

    train.csv              id,rle_mask
    depths.csv             id,z
    sample_submission.csv  id,rle_mask      (defines the test ids)
    train/images/<id>.png  8-bit, grey or 3 equal channels, 101x101
    train/masks/<id>.png   16-bit 0/65535, or 8-bit (all zero when empty)
    test/images/<id>.png
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tgs_salt import paths
from tgs_salt.errors import UserError
from tgs_salt.io_utils import atomic_path, remove_stale_temps
from tgs_salt.rle import SHAPE, rle_decode, rle_problems

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
CACHE_VERSION = 1
HOW_TO_GET = ("get the competition data with `python -m tgs_salt download --data-dir DIR` "
              "(needs Kaggle credentials), or make a synthetic set with `python -m tgs_salt synth DIR`")


@dataclass
class TrainSet:
    ids: np.ndarray        # (N,) str
    images: np.ndarray     # (N, 101, 101) uint8
    masks: np.ndarray      # (N, 101, 101) bool
    depths: np.ndarray     # (N,) float32

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TestSet:
    ids: np.ndarray
    images: np.ndarray
    depths: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


# ----------------------------------------------------------------------------- checks

def require_layout(data_dir: Path, parts: str = "train") -> None:
    """Raise a UserError naming every missing file or folder of the Kaggle layout."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data folder {data_dir} does not exist: {HOW_TO_GET}")
    need = ["depths.csv"]
    if parts in ("train", "all"):
        need += ["train.csv", "train/images", "train/masks"]
    if parts in ("test", "all"):
        need += ["sample_submission.csv", "test/images"]
    missing = [n for n in need if not (data_dir / n).exists()]
    if missing:
        raise UserError(f"data folder {data_dir} lacks {', '.join(missing)}: {HOW_TO_GET}")


def has_layout(data_dir: Path) -> bool:
    try:
        require_layout(Path(data_dir), "all")
        return True
    except UserError:
        return False


def read_csv_ids(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many kinds for a broken CSV
        raise UserError(f"{path}: cannot read CSV ({exc})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {list(df.columns)}")
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise UserError(f"{path}: id {dup.iloc[0]} appears more than once")
    return df


def read_depths(data_dir: Path) -> dict[str, float]:
    import pandas as pd

    df = read_csv_ids(Path(data_dir) / "depths.csv", ("id", "z"))
    text = df["z"].str.strip()
    number = text.str.fullmatch(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")
    z = pd.to_numeric(text.where(number), errors="coerce")
    bad = ~number | ~np.isfinite(z)  # nan, inf, 1.2.3, 1e999: a NaN depth would poison training quietly
    if bad.any():
        k = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{data_dir}/depths.csv: id {df['id'].iloc[k]} has depth {df['z'].iloc[k]!r}, "
                        "not a finite number")
    return dict(zip(df["id"], z.astype(float)))


def read_image(path: Path, kind: str, image_id: str) -> np.ndarray:
    import cv2

    if not path.exists():
        raise UserError(f"{kind} {image_id}: file {path} is missing")
    if not os.access(path, os.R_OK):
        raise UserError(f"{kind} {image_id}: {path} is not readable (permission denied)")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise UserError(f"{kind} {image_id}: {path} is not a readable PNG (corrupt or empty file)")
    if raw.ndim == 3:
        if raw.shape[2] == 4:
            raw = raw[..., :3]
        if kind == "image" and not (np.array_equal(raw[..., 0], raw[..., 1])
                                    and np.array_equal(raw[..., 0], raw[..., 2])):
            log.warning("image %s: channels differ; using the first", image_id)
        raw = raw[..., 0]
    if raw.shape != SHAPE:
        raise UserError(f"{kind} {image_id}: {path} is {raw.shape[1]}x{raw.shape[0]}, expected 101x101")
    return raw


def read_mask(path: Path, image_id: str) -> np.ndarray:
    raw = read_image(path, "mask", image_id)
    values = np.unique(raw)
    if values.size > 2 or (values.size == 2 and values[0] != 0):
        raise UserError(f"mask {image_id}: {path} has values {values[:6].tolist()}; "
                        "expected only 0 and one maximum (65535 or 255)")
    return raw > 0


# ----------------------------------------------------------------------------- cache

def _signature(files: list[Path], extra: list[Path]) -> str:
    """Cache key: the CSVs' contents (hashed: a few MB) and each PNG's name, size and mtime."""
    h = hashlib.sha1(f"v{CACHE_VERSION}".encode())
    for f in extra:
        h.update(f"{f.name}:".encode())
        h.update(hashlib.sha1(f.read_bytes()).digest())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _cache_file(data_dir: Path, part: str, signature: str) -> Path:
    key = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:10]
    return paths.cache_dir() / f"{part}-{key}-{signature}.npz"


def _load_cached(cache: Path) -> dict | None:
    if not cache.exists():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:
        log.warning("cache %s is unreadable; rebuilding", cache)
        return None


def _save_cache(cache: Path, arrays: dict) -> None:
    # Remove stale caches of the same folder and part (and temporaries of killed writers), then write atomically.
    remove_stale_temps(cache.parent)
    for old in cache.parent.glob(cache.name.rsplit("-", 1)[0] + "-*.npz") if cache.parent.exists() else []:
        if old != cache:
            old.unlink(missing_ok=True)
    try:
        with atomic_path(cache, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    except OSError as exc:
        log.warning("could not write cache %s (%s); continuing without it", cache, exc)


def _progress(iterable, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=None, leave=False)


# ----------------------------------------------------------------------------- loaders

def load_train(data_dir: str | os.PathLike | None = None, use_cache: bool = True) -> TrainSet:
    """Train images, masks (cross-checked with train.csv) and depths, ordered as train.csv."""
    data_dir = Path(data_dir) if data_dir else paths.data_dir()
    require_layout(data_dir, "train")
    img_dir, mask_dir = data_dir / "train" / "images", data_dir / "train" / "masks"
    img_files = sorted(img_dir.glob("*.png"))
    mask_files = sorted(mask_dir.glob("*.png"))
    csvs = [data_dir / "train.csv", data_dir / "depths.csv"]
    sig = _signature(img_files + mask_files, csvs)
    cache = _cache_file(data_dir, "train", sig)
    if use_cache and (z := _load_cached(cache)) is not None:
        return TrainSet(z["ids"], z["images"], z["masks"], z["depths"])

    df = read_csv_ids(data_dir / "train.csv", ("id", "rle_mask"))
    if df.empty:
        raise UserError(f"{data_dir}/train.csv has a header but no rows: no training images")
    depths = read_depths(data_dir)
    ids = df["id"].to_numpy()
    _require_files_and_depths(ids, "train.csv", "train", {"image": img_files, "mask": mask_files}, depths,
                              data_dir)
    n = len(ids)
    images = np.empty((n, *SHAPE), dtype=np.uint8)
    masks = np.empty((n, *SHAPE), dtype=bool)
    for k, (i, rle) in enumerate(_progress(zip(ids, df["rle_mask"]), n, "reading train")):
        images[k] = _as_uint8(read_image(img_dir / f"{i}.png", "image", i), i)
        masks[k] = read_mask(mask_dir / f"{i}.png", i)
        problems = rle_problems(rle)
        if problems:
            raise UserError(f"train.csv id {i}: bad RLE ({'; '.join(problems)})")
        if not np.array_equal(rle_decode(rle, check=False), masks[k]):
            diff = int((rle_decode(rle, check=False) != masks[k]).sum())
            raise UserError(f"train.csv id {i}: RLE disagrees with train/masks/{i}.png in {diff} pixels")
    z_arr = np.array([depths[i] for i in ids], dtype=np.float32)
    out = TrainSet(ids.astype(str), images, masks, z_arr)
    if use_cache:
        _save_cache(cache, {"ids": out.ids, "images": images, "masks": masks, "depths": z_arr})
    return out


def load_test(data_dir: str | os.PathLike | None = None, use_cache: bool = True) -> TestSet:
    """Test images and depths, in the order of sample_submission.csv."""
    data_dir = Path(data_dir) if data_dir else paths.data_dir()
    require_layout(data_dir, "test")
    img_dir = data_dir / "test" / "images"
    img_files = sorted(img_dir.glob("*.png"))
    csvs = [data_dir / "sample_submission.csv", data_dir / "depths.csv"]
    sig = _signature(img_files, csvs)
    cache = _cache_file(data_dir, "test", sig)
    if use_cache and (z := _load_cached(cache)) is not None:
        return TestSet(z["ids"], z["images"], z["depths"])
    df = read_csv_ids(data_dir / "sample_submission.csv", ("id",))
    depths = read_depths(data_dir)
    ids = df["id"].to_numpy()
    _require_files_and_depths(ids, "sample_submission.csv", "test", {"image": img_files}, depths, data_dir)
    images = np.empty((len(ids), *SHAPE), dtype=np.uint8)
    for k, i in enumerate(_progress(ids, len(ids), "reading test")):
        images[k] = _as_uint8(read_image(img_dir / f"{i}.png", "image", i), i)
    z_arr = np.array([depths[i] for i in ids], dtype=np.float32)
    out = TestSet(ids.astype(str), images, z_arr)
    if use_cache:
        _save_cache(cache, {"ids": out.ids, "images": images, "depths": z_arr})
    return out


def _require_files_and_depths(ids, csv_name: str, split: str, files: dict[str, list[Path]],
                              depths: dict[str, float], data_dir: Path) -> None:
    """Every id of ``csv_name`` has its PNG of each kind (image, mask) and a depth."""
    have = {kind: {f.stem for f in fs} for kind, fs in files.items()}
    for i in ids:
        for kind, stems in have.items():
            if i not in stems:
                raise UserError(f"{csv_name} id {i} has no {kind} {split}/{kind}s/{i}.png in {data_dir}")
        if i not in depths:
            raise UserError(f"{split} id {i} has no depth in {data_dir}/depths.csv")


def _as_uint8(img: np.ndarray, image_id: str) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)
    raise UserError(f"image {image_id}: unsupported pixel type {img.dtype}")
