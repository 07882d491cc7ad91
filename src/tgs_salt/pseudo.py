"""Pseudo-labels: a finished run's confident test predictions, added to the training images.

The last step of the 1st and 4th places: a trained ensemble predicts the test images, the images
it is sure of join the training set with their post-processed masks as labels, and the models are
trained again. ``train.pseudo_labels`` names the directory where ``predict`` wrote
``test_probs.npz`` and ``submission.json`` (a run directory, or an ensemble's output directory);
the masks are made with the post-processing recorded there (the one of the submission). An image
is kept when its confidence, the mean over pixels of ``|2p - 1|`` (and, with a classifier, no more
than ``|2c - 1|`` of its salt probability), is at least ``train.pseudo_confidence``.

Validation stays on real labelled images only. A fold's CV is still optimistic when a model of the
source ensemble trained on that fold's held-out images (any source model of another fold, or of
other folds files): what those images taught it reaches the new model through the pseudo-labels.
Each fold records whether that is so (``pseudo_labels.leaks_held_out`` in done.json).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tgs_salt.errors import UserError
from tgs_salt.io_utils import sha1_of
from tgs_salt.postprocess import PostProcess, apply

log = logging.getLogger(__name__)


@dataclass
class PseudoSet:
    ids: np.ndarray
    images: np.ndarray      # (N, 101, 101) uint8
    masks: np.ndarray       # (N, 101, 101) bool
    depths: np.ndarray      # (N,) float32
    facts: dict = field(default_factory=dict)
    source_models: list = field(default_factory=list)  # (folds file sha1, fold) of every model behind them

    def __len__(self) -> int:
        return len(self.ids)

    def fold_facts(self, folds_sha1: str, fold: int) -> dict:
        """What done.json records for ``fold``: the source, and whether it saw the fold's held-out images."""
        leaks = any(sha != folds_sha1 or k != fold for sha, k in self.source_models)
        return {**self.facts, "leaks_held_out": leaks}


def confidence(probs: np.ndarray, cls: np.ndarray | None = None) -> np.ndarray:
    """Per image: mean over pixels of |2p - 1| (1: every pixel certain), capped by |2c - 1|."""
    conf = np.abs(2.0 * probs.reshape(len(probs), -1).astype(np.float32) - 1.0).mean(axis=1)
    if cls is not None:
        conf = np.minimum(conf, np.abs(2.0 * np.asarray(cls, dtype=np.float32).reshape(-1) - 1.0))
    return conf


def _source_models(source: Path, record: dict) -> list[tuple[str, int]]:
    """(folds file sha1, fold) of every model behind a predict output directory."""
    models = []
    for run in record.get("runs") or [str(source)]:
        run = Path(run)
        try:
            sha = json.loads((run / "run.json").read_text())["folds_sha1"]
        except (OSError, ValueError, KeyError):
            sha = None  # unknown: counted as a leak
        folds = sorted(int(p.parent.name.removeprefix("fold")) for p in run.glob("fold*/done.json"))
        models += [(sha, k) for k in folds] or [(sha, -1)]
    return models


def load_pseudo(source: Path, test, min_confidence: float) -> PseudoSet:
    """The confident test images of ``source`` (a predict output directory) with their masks."""
    source = Path(source)
    probs_path, record_path = source / "test_probs.npz", source / "submission.json"
    for p in (probs_path, record_path):
        if not p.is_file():
            raise UserError(f"train.pseudo_labels = {str(source)!r}: {p} is missing; run `python -m tgs_salt "
                            f"predict --run-dir {source}` (or ./run_all.sh) on that run first")
    try:
        record = json.loads(record_path.read_text())
        pp = PostProcess(**record["postprocess"])
        with np.load(probs_path) as z:
            ids, probs = z["ids"].astype(str), z["probs"]
            cls = z["cls"] if "cls" in z.files else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"train.pseudo_labels: cannot read {probs_path} / {record_path} ({e})") from None
    if probs.shape != (len(ids), 101, 101):
        raise UserError(f"{probs_path}: probabilities of shape {probs.shape}; expected ({len(ids)}, 101, 101)")
    where = {i: k for k, i in enumerate(test.ids)}
    unknown = [i for i in ids if i not in where]
    if unknown:
        raise UserError(f"{probs_path} holds {len(unknown)} image(s) that are not test images of this data "
                        f"folder (e.g. {unknown[0]}): pseudo-labels must come from a run on the same data")
    rows = np.array([where[i] for i in ids], dtype=np.int64)
    images, depths = test.images[rows], test.depths[rows]
    masks = apply(probs, pp, images, cls if pp.cls_threshold is not None else None)
    conf = confidence(probs, cls)
    keep = conf >= min_confidence
    facts = {"from": str(source), "test_probs_sha1": sha1_of(probs_path), "confidence": min_confidence,
             "images": int(keep.sum()), "of": len(ids), "non_empty": int(masks[keep].any(axis=(1, 2)).sum()),
             "postprocess": pp.to_dict()}
    log.info("pseudo-labels from %s: %d of %d test images at confidence >= %.2f (%d with salt)", source,
             facts["images"], facts["of"], min_confidence, facts["non_empty"])
    if not keep.any():
        raise UserError(f"train.pseudo_labels: no test image of {source} reaches confidence {min_confidence} "
                        f"(highest: {conf.max():.3f}); lower train.pseudo_confidence")
    return PseudoSet(ids[keep], images[keep], masks[keep], depths[keep].astype(np.float32), facts,
                     _source_models(source, record))
