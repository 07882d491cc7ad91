"""Post-processing tuned on out-of-fold predictions: binarisation threshold, minimum area and,
for models with a classifier, the salt probability below which a mask is emptied.

``nested_scores`` gives the honest figure: each group of images (a fold, or half of a single
fold) is scored with the post-processing tuned on the other groups only. ``decide`` applies the
tuned post-processing only when that figure beats the untuned default's (``postprocess.tune: auto``):
on one fold of 601 images, tuned on 300 and scored on the other 300, tuning lost to the default in
every one of 5 runs x 4 splits (bench/results/postprocess_tuning_amx.json).

``auto`` picks the better of the two on the images it then reports, so the larger of the two
scores overstates what it will do on new images. ``policy_scores`` scores the choice itself held
out: each group gets the post-processing that ``decide`` would pick from the other groups alone
(the choice made on a nested split of those, the tuning on all of them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tgs_salt.metric import per_image_scores, score_from_counts, threshold_counts

CLS_GRID = np.round(np.linspace(0.0, 0.9, 10), 2)  # 0 = the classifier never empties a mask
TUNE_PARAMS = ("threshold", "min_area", "cls_cut")  # what postprocess.tune_params may name


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


class ScoreTable:
    """Every image's score at every (minimum area, threshold) of the grid, and its score when
    emptied: a search over any subset of the images, at any classifier cut, is then an average over
    the table, not a pass over the pixels. Averaged as a sweep over the pixels averages (the same
    values in the same order), so every choice, ties included, is the one such a sweep makes."""

    def __init__(self, probs: np.ndarray, truth: np.ndarray, th: np.ndarray, areas: np.ndarray,
                 cls: np.ndarray | None = None, cut_grid=CLS_GRID):
        inter, pred_area, true_area = threshold_counts(probs, truth, th)
        self.scores = np.empty((len(probs), len(areas), len(th)))
        for i, a in enumerate(areas):
            keep = pred_area >= a
            self.scores[:, i] = score_from_counts(np.where(keep, inter, 0), np.where(keep, pred_area, 0),
                                                  true_area[:, None])
        self.empty = np.where(true_area == 0, 1.0, 0.0)
        self.th, self.areas, self.cls, self.cut_grid = th, areas, cls, cut_grid

    def cuts(self) -> list:
        """The classifier cuts searched: ``cut_grid`` (CLS_GRID by default; 0: the classifier empties
        nothing), or [None] without a classifier."""
        return list(self.cut_grid) if self.cls is not None else [None]

    def grids(self, sel: np.ndarray | None = None) -> np.ndarray:
        """Mean score of the images ``sel`` selects (default: all) at every (classifier cut of
        :meth:`cuts`, minimum area, threshold)."""
        scores = self.scores if sel is None else self.scores[sel]
        empty = self.empty if sel is None else self.empty[sel]
        out = []
        for c in self.cuts():
            if c:  # the classifier empties the images below the cut (0: none)
                drop = (self.cls if sel is None else self.cls[sel]) < c
                out.append(np.where(drop[:, None, None], empty[:, None, None], scores).mean(axis=0))
            else:
                out.append(scores.mean(axis=0))
        return np.stack(out)

    def search(self, sel: np.ndarray | None = None) -> tuple[PostProcess, float, np.ndarray]:
        """The best post-processing on the images ``sel`` selects (default: all), its score, and the
        threshold x min-area grid of mean scores at its classifier cut (ties as :func:`best_on`)."""
        grids = self.grids(sel)
        c, a, k = best_on(grids)
        cut = self.cuts()[c]
        pp = PostProcess(float(self.th[k]), int(self.areas[a]), None if cut is None else float(cut))
        return pp, float(grids[c, a, k]), grids[c]


def best_on(grids: np.ndarray) -> tuple[int, int, int]:
    """The (classifier cut, minimum area, threshold) index of the best mean score in ``grids``:
    near-ties (1e-12) go to the first classifier cut, exact ties to the first (min area, threshold)
    in grid order."""
    best, best_score = None, -np.inf
    for c, grid in enumerate(grids):
        a, k = np.unravel_index(int(np.argmax(grid)), grid.shape)
        if grid[a, k] > best_score + 1e-12:
            best, best_score = (c, int(a), int(k)), grid[a, k]
    return best


def score_table(probs, truth, cfg, cls=None) -> ScoreTable:
    """The :class:`ScoreTable` of what ``postprocess.tune_params`` tunes: the config's threshold grid,
    its minimum areas, the classifier cuts of CLS_GRID; what it leaves out stays at the untuned value
    (the default threshold, no minimum area, the classifier's cut at 0.5)."""
    pp = cfg["postprocess"]
    params = pp.get("tune_params", TUNE_PARAMS)
    th = threshold_grid(cfg) if "threshold" in params else np.array([float(pp["default_threshold"])])
    areas = np.asarray(pp["min_areas"] if "min_area" in params else [0], dtype=np.int64)
    cuts = CLS_GRID if "cls_cut" in params else np.array([untuned(cfg, True).cls_threshold])
    return ScoreTable(probs, truth, th, areas, cls, cuts)


def tune(probs: np.ndarray, truth: np.ndarray, cfg: dict, cls: np.ndarray | None = None,
         table: ScoreTable | None = None) -> tuple[PostProcess, dict]:
    """Best (threshold, min_area[, cls_threshold]) on OOF; returns it with the sweep for reporting
    (the threshold x min-area grid at the chosen cls_threshold)."""
    table = table or score_table(probs, truth, cfg, cls)
    best, score, grid = table.search()
    default = untuned(cfg, cls is not None)
    return best, {"thresholds": table.th, "min_areas": table.areas, "grid": grid,
                  "score_default": float(per_image_scores(apply(probs, default, cls=cls), truth).mean()),
                  "score_tuned": score, "default": default}


def split_groups(folds: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """Groups for nested tuning: the folds when there are several, else two random halves."""
    if len(np.unique(folds)) > 1:
        return folds, "tuned on the other folds"
    halves = np.random.default_rng(seed).permutation(len(folds)) % 2
    return halves, "tuned on the other half of the held-out images (2-way split)"


def _scored(pp: PostProcess, probs, truth, cls, rows) -> np.ndarray:
    """Per-image scores of the images ``rows`` (indices or a mask) under ``pp``."""
    return per_image_scores(apply(probs[rows], pp, cls=None if cls is None else cls[rows]), truth[rows])


def _held_out(table: ScoreTable, probs, truth, cls, rows: np.ndarray, groups: np.ndarray):
    """Per-image scores of the images ``rows``, each group of them (``groups``, aligned with ``rows``)
    scored with the post-processing tuned on the other groups' images; and the choices."""
    scores = np.empty(len(rows))
    chosen = []
    for g in np.unique(groups):
        fit = np.zeros(len(probs), bool)
        fit[rows[groups != g]] = True
        pp, _, _ = table.search(fit)
        scores[groups == g] = _scored(pp, probs, truth, cls, rows[groups == g])
        chosen.append({"group": int(g), **pp.to_dict()})
    return scores, chosen


def nested_scores(probs: np.ndarray, truth: np.ndarray, cfg: dict, groups: np.ndarray,
                  cls: np.ndarray | None = None, table: ScoreTable | None = None) -> tuple[np.ndarray, list[dict]]:
    """Per-image scores where each group's images use post-processing tuned on the other groups."""
    table = table or score_table(probs, truth, cfg, cls)
    return _held_out(table, probs, truth, cls, np.arange(len(probs)), groups)


def policy_scores(probs: np.ndarray, truth: np.ndarray, cfg: dict, groups: np.ndarray,
                  cls: np.ndarray | None = None, table: ScoreTable | None = None) -> tuple[np.ndarray, list[dict]]:
    """Per-image scores of ``postprocess.tune``'s policy, each group scored with what the policy
    picks from the other groups only. For ``auto``, the choice between the tuned and the untuned
    post-processing rests on the other groups' own nested score (split into their groups, or into
    two halves when they are one group); the tuned one is then tuned on all of them. ``true`` gives
    :func:`nested_scores`' figure, ``false`` the untuned one's."""
    mode = cfg["postprocess"]["tune"]
    default = untuned(cfg, cls is not None)
    table = table or score_table(probs, truth, cfg, cls)
    at_default = _scored(default, probs, truth, cls, slice(None))
    scores = np.empty(len(probs))
    chosen = []
    for g in np.unique(groups):
        out = groups == g
        use = mode is True
        if mode == "auto":  # the others' own nested score against their untuned one
            inner = groups[~out]
            if len(np.unique(inner)) < 2:
                inner = split_groups(inner)[0]
            nested_in, _ = _held_out(table, probs, truth, cls, np.flatnonzero(~out), inner)
            use = nested_in.mean() > at_default[~out].mean()
        pp = table.search(~out)[0] if use else default
        scores[out] = _scored(pp, probs, truth, cls, out)
        chosen.append({"group": int(g), "applied": "tuned" if use else "untuned", **pp.to_dict()})
    return scores, chosen


def decide(probs: np.ndarray, truth: np.ndarray, cfg: dict, groups: np.ndarray,
           cls: np.ndarray | None = None) -> tuple[PostProcess, dict]:
    """The post-processing to apply, with what the choice rests on. ``postprocess.tune``: true
    applies the tuned one, false the untuned default, auto the tuned one only when its nested score
    (each group tuned on the others) is above the default's on the same images. ``policy`` holds
    the per-image scores of the choice made held out (:func:`policy_scores`): what to expect of it."""
    table = score_table(probs, truth, cfg, cls)
    best, sweep = tune(probs, truth, cfg, cls, table)
    nested, nested_pp = nested_scores(probs, truth, cfg, groups, cls, table)
    policy, policy_pp = policy_scores(probs, truth, cfg, groups, cls, table)
    mode = cfg["postprocess"]["tune"]
    score_nested, score_default = float(nested.mean()), float(sweep["score_default"])
    use = mode is True or (mode == "auto" and score_nested > score_default)
    why = {True: "postprocess.tune: true", False: "postprocess.tune: false"}.get(mode) or (
        f"nested tuning {score_nested:.4f} {'>' if use else '<='} untuned {score_default:.4f}")
    return (best if use else sweep["default"]), {
        "tuned": best, "sweep": sweep, "nested": nested, "nested_postprocess": nested_pp,
        "applied": "tuned" if use else "untuned", "why": why,
        "score_applied": score_nested if use else score_default,
        "policy": policy, "policy_postprocess": policy_pp, "score_policy": float(policy.mean())}
