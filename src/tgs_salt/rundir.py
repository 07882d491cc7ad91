"""The run-directory layout, owned in one place.

    runs/<name>/
      config.yaml  run.json  precision.json  plan.json     the run's config and facts
      fold<k>/     last.pt (while training) best.pt (the selected weights) log.csv oof.npz done.json
      cv.json  plots/  test_probs.npz  submission.json      CV, test probabilities, submission record
      logs/        one log per run_all stage
"""

from __future__ import annotations

from pathlib import Path

from tgs_salt.errors import UserError
from tgs_salt.io_utils import atomic_path


class RunDir:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    facts = property(lambda self: self.root / "run.json")
    precision = property(lambda self: self.root / "precision.json")
    plan = property(lambda self: self.root / "plan.json")
    cv = property(lambda self: self.root / "cv.json")
    plots = property(lambda self: self.root / "plots")
    test_probs = property(lambda self: self.root / "test_probs.npz")
    submission_record = property(lambda self: self.root / "submission.json")

    def fold(self, k: int) -> Path:
        return self.root / f"fold{k}"

    def last(self, k: int) -> Path:
        """Checkpoint to resume from; removed when the fold is done."""
        return self.fold(k) / "last.pt"

    def best(self, k: int) -> Path:
        """The weights the fold keeps (``train.select``: best epoch by validation metric, or the last)."""
        return self.fold(k) / "best.pt"

    def log(self, k: int) -> Path:
        return self.fold(k) / "log.csv"

    def oof(self, k: int) -> Path:
        return self.fold(k) / "oof.npz"

    def done(self, k: int) -> Path:
        return self.fold(k) / "done.json"

    def is_done(self, k: int) -> bool:
        return self.done(k).exists()


def save_checkpoint(obj: dict, path: Path) -> None:
    """Plain types and tensors only (``torch.load`` runs with ``weights_only=True``); atomic."""
    import torch

    need = sum(v.numel() * v.element_size() for part in ("model", "optimizer") if isinstance(obj.get(part), dict)
               for v in _tensors(obj[part]))
    with atomic_path(path, suffix=".pt", need_bytes=need) as tmp:
        torch.save(obj, tmp)


def _tensors(d):
    import torch

    for v in d.values():
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, dict):
            yield from _tensors(v)
        elif isinstance(v, list):
            yield from _tensors(dict(enumerate(v)))


def load_checkpoint(path: Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc}") from None
