"""Losses on logits (B, 1, H, W) against binary targets of the same shape.

``bce``, ``dice`` (soft, per image), ``bce_dice``, ``lovasz`` (per-image Lovasz hinge, elu+1
as popularised on this competition), ``lovasz_symmetric`` (mean of the hinge on the mask and
on its complement, which also rewards empty predictions on empty masks), ``bce_lovasz``, and any
weighted sum of them written as ``"bce + 0.5*lovasz_symmetric"``.

Each takes an optional ``weight`` (B,): the batch's per-image losses are then averaged with those
weights, ``sum(w * loss) / sum(w)`` (an image of weight 2 counts as if it were in the batch twice;
``train.small_mask_weight``). Without it the code path is the unweighted one, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mean(per_image: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The batch mean of per-image losses, weighted by ``weight`` when given."""
    if weight is None:
        return per_image.mean()
    return (per_image * weight).sum() / weight.sum()


def bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    if weight is None:
        return F.binary_cross_entropy_with_logits(logits, target)
    return _mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1), weight)


def dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
         eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return _mean(1 - (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps), weight)


def bce_dice(logits, target, weight=None):
    return bce(logits, target, weight) + dice(logits, target, weight)


def _sorted_errors(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge errors sorted per image, descending, and the labels in the same order."""
    x = logits.flatten(1)
    y = target.flatten(1)
    errors = 1 - x * (2 * y - 1)
    errors_sorted, perm = torch.sort(errors, dim=1, descending=True)
    return errors_sorted, torch.gather(y, 1, perm)


def _lovasz_sorted(hinge: torch.Tensor, gt_sorted: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The Lovasz extension of the Jaccard loss, per image, for errors already sorted (``hinge`` is
    elu(errors) + 1 in that order), averaged over the batch (with ``weight``, weighted)."""
    gts = gt_sorted.sum(1, keepdim=True)
    inter = gts - gt_sorted.cumsum(1)
    union = gts + (1 - gt_sorted).cumsum(1)
    jaccard = 1 - inter / union
    grad = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return _mean((hinge * grad.detach()).sum(1), weight)


def lovasz_hinge(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image Lovasz hinge (Berman et al. 2018), batched: one sort over (B, H*W)."""
    errors_sorted, gt_sorted = _sorted_errors(logits, target)
    return _lovasz_sorted(F.elu(errors_sorted) + 1, gt_sorted, weight)


def lovasz_symmetric(logits, target, weight=None):
    """Mean of the hinge on (logits, mask) and on (-logits, 1 - mask). The complement's errors
    1 - (-x)(1 - 2y) equal the mask's 1 - x(2y - 1) exactly, so one sort serves both halves; only
    the sorted labels flip (the sort is a third of this loss's time on 2 CPU cores)."""
    errors_sorted, gt_sorted = _sorted_errors(logits, target)
    hinge = F.elu(errors_sorted) + 1
    return 0.5 * (_lovasz_sorted(hinge, gt_sorted, weight) + _lovasz_sorted(hinge, 1 - gt_sorted, weight))


def bce_lovasz(logits, target, weight=None):
    return bce(logits, target, weight) + lovasz_hinge(logits, target, weight)


LOSSES = {
    "bce": bce,
    "dice": dice,
    "bce_dice": bce_dice,
    "lovasz": lovasz_hinge,
    "lovasz_symmetric": lovasz_symmetric,
    "bce_lovasz": bce_lovasz,
}


def parse_loss(name: str) -> list[tuple[float, str]]:
    """``"bce + 0.5*lovasz_symmetric"`` -> [(1.0, "bce"), (0.5, "lovasz_symmetric")]: a weighted sum of
    the named losses (one name alone is a sum of one). Raises ValueError naming what is wrong."""
    terms = []
    for part in str(name).split("+"):
        w, _, loss = part.strip().rpartition("*")
        loss = loss.strip()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r} in {name!r}; valid: {', '.join(LOSSES)}, or a weighted sum "
                             "such as 'bce + 0.5*lovasz_symmetric'")
        try:
            weight = float(w) if w.strip() else 1.0
        except ValueError:
            raise ValueError(f"weight {w.strip()!r} of {loss} in {name!r} is not a number") from None
        if not weight > 0:
            raise ValueError(f"weight {w.strip()!r} of {loss} in {name!r} must be positive")
        terms.append((weight, loss))
    return terms


def get_loss(name: str):
    from tgs_salt.errors import UserError

    try:
        terms = parse_loss(name)
    except ValueError as e:
        raise UserError(str(e)) from None
    if len(terms) == 1 and terms[0][0] == 1.0:
        return LOSSES[terms[0][1]]
    fns = [(w, LOSSES[n]) for w, n in terms]
    return lambda logits, target, weight=None: sum(w * fn(logits, target, weight) for w, fn in fns)
