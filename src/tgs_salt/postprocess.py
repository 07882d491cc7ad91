"""Post-processing tuned on out-of-fold predictions: binarisation threshold, minimum area and,
for models with a classifier, the salt probability below which a mask is emptied.

``nested_scores`` gives the honest figure: each group of images (a fold, or half of a single
fold) is scored with the post-processing tuned on the other groups only. ``decide`` applies the
tuned post-processing only when that figure beats the untuned default's (``postprocess.tune: auto``):
on one fold of 601 images, tuned on 300 and scored on the other 300, tuning lost to the default in
every one of 5 runs x 4 splits (bench/results/postprocess_tuning_amx.json).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tgs_salt.metric import per_image_scores, threshold_sweep

CLS_GRID = np.round(np.linspace(0.0, 0.9, 10), 2)  # 0 = the classifier never empties a mask


@dataclass
class PostProcess:
    threshold: float = 0.5
    min_area: int = 0
    cls_threshold: float | None = None  # images whose salt probability is below it get an empty mask

    def to_dict(self) -> dict:
        return asdict(self)


def untuned(cfg: dict, with_cls: bool) -> PostProcess:
    """No tuning: the config's default threshold, no minimum area, the classifier's cut at 0.5."""
    return PostProcess(float(cfg["postprocess"]["default_threshold"]), 0, 0.5 if with_cls else None)


def is_blank(images: np.ndarray) -> np.ndarray:
    """Images of a single value (their masks are empty in the train set)."""
    flat = images.reshape(len(images), -1)
    return (flat == flat[:, :1]).all(axis=1)


def apply(probs: np.ndarray, pp: PostProcess, images: np.ndarray | None = None,
          cls: np.ndarray | None = None) -> np.ndarray:
    """Binary masks: prob > threshold, emptied when smaller than min_area, when the image is
    blank, or when the classifier's salt probability is below ``cls_threshold``."""
    masks = probs > pp.threshold
    area = masks.reshape(len(masks), -1).sum(axis=1)
    drop = area < pp.min_area
    if images is not None:
        drop |= is_blank(images)
    if cls is not None and pp.cls_threshold is not None:
        drop |= cls < pp.cls_threshold
    masks[drop] = False
    return masks


def threshold_grid(cfg: dict) -> np.ndarray:
    start, stop, count = cfg["postprocess"]["thresholds"]
    return np.round(np.linspace(float(start), float(stop), int(count)), 6)


def _search(probs, truth, th, areas, cls) -> tuple[PostProcess, float, np.ndarray]:
    """The best post-processing, its score, and the threshold x min-area grid at its cls cut."""
    best, best_score, best_grid = None, -1.0, None
    for c in (CLS_GRID if cls is not None else [None]):
        p = probs if not c else np.where((cls < c)[:, None, None], 0, probs)
        grid = threshold_sweep(p, truth, th, areas)
        a, k = np.unravel_index(int(np.argmax(grid)), grid.shape)
        if grid[a, k] > best_score + 1e-12:
            best = PostProcess(float(th[k]), int(areas[a]), None if c is None else float(c))
            best_score, best_grid = float(grid[a, k]), grid
    return best, best_score, best_grid


def tune(probs: np.ndarray, truth: np.ndarray, cfg: dict, cls: np.ndarray | None = None) -> tuple[PostProcess, dict]:
    """Best (threshold, min_area[, cls_threshold]) on OOF; returns it with the sweep for reporting
    (the threshold x min-area grid at the chosen cls_threshold)."""
    th = threshold_grid(cfg)
    areas = np.asarray(cfg["postprocess"]["min_areas"], dtype=np.int64)
    best, score, grid = _search(probs, truth, th, areas, cls)
    default = untuned(cfg, cls is not None)
    return best, {"thresholds": th, "min_areas": areas, "grid": grid,
                  "score_default": float(per_image_scores(apply(probs, default, cls=cls), truth).mean()),
                  "score_tuned": score, "default": default}


def split_groups(folds: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """Groups for nested tuning: the folds when there are several, else two random halves."""
    if len(np.unique(folds)) > 1:
        return folds, "tuned on the other folds"
    halves = np.random.default_rng(seed).permutation(len(folds)) % 2
    return halves, "tuned on the other half of the held-out images (2-way split)"


def nested_scores(probs: np.ndarray, truth: np.ndarray, cfg: dict, groups: np.ndarray,
                  cls: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """Per-image scores where each group's images use post-processing tuned on the other groups."""
    th = threshold_grid(cfg)
    areas = np.asarray(cfg["postprocess"]["min_areas"], dtype=np.int64)
    scores = np.empty(len(probs))
    chosen = []
    for g in np.unique(groups):
        out = groups == g
        c_in = None if cls is None else cls[~out]
        pp, _, _ = _search(probs[~out], truth[~out], th, areas, c_in)
        scores[out] = per_image_scores(apply(probs[out], pp, cls=None if cls is None else cls[out]), truth[out])
        chosen.append({"group": int(g), **pp.to_dict()})
    return scores, chosen


def decide(probs: np.ndarray, truth: np.ndarray, cfg: dict, groups: np.ndarray,
           cls: np.ndarray | None = None) -> tuple[PostProcess, dict]:
    """The post-processing to apply, with what the choice rests on. ``postprocess.tune``: true
    applies the tuned one, false the untuned default, auto the tuned one only when its nested score
    (each group tuned on the others) is above the default's on the same images."""
    best, sweep = tune(probs, truth, cfg, cls)
    nested, nested_pp = nested_scores(probs, truth, cfg, groups, cls)
    mode = cfg["postprocess"]["tune"]
    score_nested, score_default = float(nested.mean()), float(sweep["score_default"])
    use = mode is True or (mode == "auto" and score_nested > score_default)
    why = {True: "postprocess.tune: true", False: "postprocess.tune: false"}.get(mode) or (
        f"nested tuning {score_nested:.4f} {'>' if use else '<='} untuned {score_default:.4f}")
    return (best if use else sweep["default"]), {
        "tuned": best, "sweep": sweep, "nested": nested, "nested_postprocess": nested_pp,
        "applied": "tuned" if use else "untuned", "why": why,
        "score_applied": score_nested if use else score_default}
