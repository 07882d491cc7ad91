"""A synthetic TGS-like dataset in the Kaggle layout: the embedded default when no real data exists.

Images look seismic: layered reflectors (a random wavelet spectrum along a dipping,
undulating depth coordinate), occasional faults, noise and blur at a random zoom. Salt bodies
(domes rising from below, blobs, bodies cut by an image edge, thin vertical stocks) have a
chaotic, low-reflectivity interior and a boundary reflection whose strength varies, so some
are easy and some are hard. About 40% of the images have no salt, a few are constant (empty
masks), and depth z is related to salt presence.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np

from tgs_salt.errors import UserError
from tgs_salt.rle import SHAPE, rle_encode

H, W = SHAPE
_YY, _XX = np.mgrid[0:H, 0:W].astype(np.float32)


def _smooth_noise(rng: np.random.Generator, sigma: float) -> np.ndarray:
    import cv2

    n = rng.standard_normal(SHAPE).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), sigma)
    return n / (n.std() + 1e-6)


def _layers(rng: np.random.Generator) -> np.ndarray:
    """Reflector pattern along a dipping, undulating depth coordinate, possibly faulted."""
    dip = np.deg2rad(rng.normal(0, 18) if rng.random() < 0.8 else rng.uniform(-60, 60))
    depth = _YY * np.cos(dip) + _XX * np.sin(dip)
    depth = depth + rng.uniform(0, 8) * np.sin(2 * np.pi * _XX / rng.uniform(40, 250) + rng.uniform(0, 6.3))
    depth = depth + 2.5 * _smooth_noise(rng, rng.uniform(8, 20))
    if rng.random() < 0.3:  # a fault: shift one side of a steep line
        x0, slope = rng.uniform(10, 90), rng.uniform(-0.6, 0.6)
        side = _XX > x0 + slope * (_YY - 50)
        depth = depth + side * rng.uniform(-12, 12)
    wavelength = rng.uniform(3.5, 16)
    img = np.zeros(SHAPE, np.float32)
    for _ in range(rng.integers(3, 7)):
        f = 1.0 / (wavelength * rng.uniform(0.6, 1.8))
        img += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * f * depth + rng.uniform(0, 6.3))
    # amplitude varies along the layers (lateral continuity breaks)
    img *= 0.6 + 0.4 * np.tanh(_smooth_noise(rng, rng.uniform(4, 12)) + 1)
    return img / (img.std() + 1e-6)


def _salt_mask(rng: np.random.Generator) -> np.ndarray:
    kind = rng.choice(["dome", "blob", "edge", "thin", "big"], p=[0.3, 0.2, 0.25, 0.1, 0.15])
    if kind == "dome":  # top surface rising from below
        x0, top = rng.uniform(-20, 120), rng.uniform(5, 95)
        width = rng.uniform(15, 120)
        surface = top + ((_XX - x0) / width) ** 2 * rng.uniform(20, 80)
        surface = surface + rng.uniform(0, 5) * _smooth_noise(rng, 6)
        return _YY > surface
    if kind == "blob":
        cy, cx = rng.uniform(10, 90, 2)
        r0 = rng.uniform(8, 40)
        ang = np.arctan2(_YY - cy, _XX - cx)
        r = r0 * (1 + sum(rng.uniform(-0.25, 0.25) * np.cos(k * ang + rng.uniform(0, 6.3)) for k in range(2, 6)))
        return np.hypot(_YY - cy, _XX - cx) < r
    if kind == "edge":  # a flank: everything left/right of an irregular near-vertical line
        x0 = rng.uniform(5, 95)
        line = x0 + rng.uniform(-0.8, 0.8) * (_YY - 50) + rng.uniform(2, 10) * _smooth_noise(rng, 10)
        return (_XX < line) if rng.random() < 0.5 else (_XX > line)
    if kind == "thin":
        x0, w = rng.uniform(15, 85), rng.uniform(3, 10)
        centre = x0 + rng.uniform(-0.3, 0.3) * (_YY - 50) + 3 * _smooth_noise(rng, 12)
        top = rng.uniform(0, 60)
        return (np.abs(_XX - centre) < w) & (_YY > top)
    # big: most of the image, an irregular top
    surface = rng.uniform(-10, 30) + 10 * _smooth_noise(rng, 15) + rng.uniform(-0.3, 0.3) * (_XX - 50)
    return _YY > surface


def _render(rng: np.random.Generator, mask: np.ndarray, zoom: float) -> np.ndarray:
    """Image for ``mask`` seen before a zoom of ``zoom`` (the caller zooms the mask alike)."""
    import cv2

    img = _layers(rng)
    if mask.any():
        hardness = rng.uniform(0, 1)  # 0: very distinct salt, 1: subtle
        chaos = _smooth_noise(rng, rng.uniform(1.0, 3.0)) * rng.uniform(0.3, 0.8)
        inside = mask.astype(np.float32)
        soft = cv2.GaussianBlur(inside, (0, 0), 1.2)
        interior = (0.1 + 0.6 * hardness) * img + (1 - 0.4 * hardness) * chaos
        img = img * (1 - soft) + interior * soft
        # boundary reflection: a strong band of one polarity along the salt boundary
        m8 = mask.astype(np.uint8)
        dist_out = cv2.distanceTransform(1 - m8, cv2.DIST_L2, 3)
        dist_in = cv2.distanceTransform(m8, cv2.DIST_L2, 3)
        signed = np.clip(np.where(mask, -dist_in, dist_out), -50, 50)
        band = np.exp(-((signed - 0.5) ** 2) / (2 * rng.uniform(0.8, 2.0) ** 2))
        # the reflection fades in and out along the boundary
        strength = (1.8 - 1.4 * hardness) * (0.5 + 0.5 * np.tanh(2 * _smooth_noise(rng, 10) + 1))
        img = img + (1 if rng.random() < 0.7 else -1) * strength * band
    img = img + rng.uniform(0.05, 0.45) * rng.standard_normal(SHAPE).astype(np.float32)
    blur = rng.uniform(0, 1.4)
    if blur > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    # random zoom (real sections come at different scales)
    if zoom > 1.0:
        big = cv2.resize(img, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_LINEAR)
        img = big[:H, :W]
    gain, offset = rng.uniform(18, 45), rng.normal(128, 15)
    return np.clip(img * gain + offset, 0, 255).astype(np.uint8)


def _zoom_mask(mask: np.ndarray, zoom: float) -> np.ndarray:
    import cv2

    big = cv2.resize(mask.astype(np.uint8), None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    return big[:H, :W].astype(bool)


def make_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """One (image uint8, mask bool, depth z) triple."""
    if rng.random() < 0.015:  # constant image, empty mask
        value = int(rng.integers(0, 256))
        return np.full(SHAPE, value, np.uint8), np.zeros(SHAPE, bool), float(round(rng.uniform(51, 959)))
    mask = np.zeros(SHAPE, bool)
    if rng.random() < 0.66:
        mask = _salt_mask(rng)
    zoom = rng.uniform(1.0, 1.6) if rng.random() < 0.6 else 1.0
    img = _render(rng, mask, zoom)
    if zoom > 1.0:
        mask = _zoom_mask(mask, zoom)
    z = float(np.clip(rng.normal(560 if mask.any() else 400, 200), 51, 959))
    return img, mask, float(round(z))


def _ids(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        i = hashlib.sha1(rng.bytes(8)).hexdigest()[:10]
        if i not in taken:
            taken.add(i)
            out.append(i)
    return out


def write_synthetic(out_dir: str | Path, n_train: int = 1000, n_test: int = 500, seed: int = 0,
                    force: bool = False) -> Path:
    """Write a complete Kaggle-format folder. Deterministic for a given seed."""
    import cv2
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if n_train < 1 or n_test < 0:
        raise UserError(f"synth needs --train >= 1 and --test >= 0 (got {n_train}, {n_test})")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise UserError(f"{out_dir} is not empty; choose another folder or pass --force")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("train/images", "train/masks", "test/images"):
        (tmp / sub).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    taken: set[str] = set()
    train_ids, test_ids = _ids(rng, n_train, taken), _ids(rng, n_test, taken)
    depth_rows, train_rows = [], []
    for split, ids in (("train", train_ids), ("test", test_ids)):
        for i in tqdm(ids, desc=f"synth {split}", disable=None, leave=False):
            img, mask, z = make_sample(np.random.default_rng([seed, int(i, 16)]))
            cv2.imwrite(str(tmp / split / "images" / f"{i}.png"), np.repeat(img[..., None], 3, axis=2))
            depth_rows.append((i, int(z)))
            if split == "train":
                m = (mask.astype(np.uint16) * 65535) if mask.any() else np.zeros(SHAPE, np.uint8)
                cv2.imwrite(str(tmp / "train" / "masks" / f"{i}.png"), m)
                train_rows.append((i, rle_encode(mask)))
    order = np.random.default_rng(seed + 1).permutation(len(depth_rows))
    _write_csv(tmp / "depths.csv", ["id", "z"], [depth_rows[k] for k in order])
    _write_csv(tmp / "train.csv", ["id", "rle_mask"], train_rows)
    _write_csv(tmp / "sample_submission.csv", ["id", "rle_mask"], [(i, "1 1") for i in test_ids])
    (tmp / "SYNTHETIC.txt").write_text(
        f"Synthetic TGS-like data made by `python -m tgs_salt synth` (seed {seed}); not the Kaggle data.\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def is_synthetic(data_dir: str | Path) -> bool:
    return (Path(data_dir) / "SYNTHETIC.txt").exists()
