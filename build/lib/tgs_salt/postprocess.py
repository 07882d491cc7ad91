"""Post-processing tuned on out-of-fold predictions: binarisation threshold and minimum area."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tgs_salt.metric import per_image_scores, threshold_sweep


@dataclass
class PostProcess:
    threshold: float = 0.5
    min_area: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def is_blank(images: np.ndarray) -> np.ndarray:
    """Images of a single value (their masks are empty in the train set)."""
    flat = images.reshape(len(images), -1)
    return (flat == flat[:, :1]).all(axis=1)


def apply(probs: np.ndarray, pp: PostProcess, images: np.ndarray | None = None) -> np.ndarray:
    """Binary masks: prob > threshold, emptied when smaller than min_area or the image is blank."""
    masks = probs > pp.threshold
    area = masks.reshape(len(masks), -1).sum(axis=1)
    drop = area < pp.min_area
    if images is not None:
        drop |= is_blank(images)
    masks[drop] = False
    return masks


def threshold_grid(cfg: dict) -> np.ndarray:
    start, stop, count = cfg["postprocess"]["thresholds"]
    return np.round(np.linspace(float(start), float(stop), int(count)), 6)


def tune(probs: np.ndarray, truth: np.ndarray, cfg: dict) -> tuple[PostProcess, dict]:
    """Best (threshold, min_area) on OOF; returns it with the sweep for reporting."""
    th = threshold_grid(cfg)
    areas = np.asarray(cfg["postprocess"]["min_areas"], dtype=np.int64)
    grid = threshold_sweep(probs, truth, th, areas)
    a, k = np.unravel_index(int(np.argmax(grid)), grid.shape)
    best = PostProcess(float(th[k]), int(areas[a]))
    default = PostProcess(float(cfg["postprocess"]["default_threshold"]), 0)
    return best, {"thresholds": th, "min_areas": areas, "grid": grid,
                  "score_default": float(per_image_scores(apply(probs, default), truth).mean()),
                  "score_tuned": float(grid[a, k]), "default": default}
