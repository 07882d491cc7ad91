"""Optional TensorBoard logging (``train.tensorboard: true``; needs ``pip install tensorboard``):
per epoch, the logged scalars and a grid of the worst validation predictions, in
``<run dir>/fold<k>/tb``. Off by default; ``tensorboard --logdir runs`` shows every run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tgs_salt.errors import UserError
from tgs_salt.metric import per_image_scores

SCALARS = ("train_loss", "val_loss", "val_metric", "val_iou", "lr", "images_per_s")


def worst_grid(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, scores: np.ndarray, n: int = 8) -> np.ndarray:
    """(n, 3, 101, 101) float RGB in [0, 1] of the ``n`` lowest-scoring images: the image in grey,
    missed salt tinted green, false salt red, agreed salt yellow."""
    worst = np.argsort(scores, kind="stable")[:n]
    g = images[worst].astype(np.float32) / 255.0
    rgb = np.stack([g, g, g], axis=1)
    t, p = truth[worst], pred[worst]
    tint = {0: (t & ~p, (0.1, 0.9, 0.1)), 1: (p & ~t, (0.95, 0.1, 0.1)), 2: (p & t, (1.0, 0.85, 0.0))}
    for sel, color in tint.values():
        for c in range(3):
            rgb[:, c][sel] = 0.55 * rgb[:, c][sel] + 0.45 * color[c]
    return rgb


class TensorBoard:
    def __init__(self, log_dir: Path, enabled: bool):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("train.tensorboard is true but the tensorboard package is not installed: "
                            "pip install tensorboard (or pip install -e '.[tensorboard]'), or set it to false") from None
        self.writer = SummaryWriter(str(log_dir))

    def epoch(self, epoch: int, row: dict, images: np.ndarray | None = None, truth: np.ndarray | None = None,
              pred: np.ndarray | None = None) -> None:
        """The row's scalars (blank ones, of an epoch not validated, skipped) and the worst of the
        binary predictions ``pred`` (when given)."""
        if self.writer is None:
            return
        for k in SCALARS:
            if row.get(k) not in (None, ""):
                self.writer.add_scalar(k, float(row[k]), epoch + 1)
        if pred is None:
            self.writer.flush()
            return
        self.writer.add_images("worst_validation_predictions",
                               worst_grid(images, truth, pred, per_image_scores(pred, truth)), epoch + 1,
                               dataformats="NCHW")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
