"""Exponential moving average of a model's weights (``train.ema``: the per-step decay).

The averaged copy is what each epoch validates and what a fold keeps; the model being trained
is left alone. Floating-point state (weights and BatchNorm statistics) is averaged, integer state
(BatchNorm's batch counter) copied. The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after
``n`` updates, so early weights from a random start do not linger.
"""

from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = float(decay), 0
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values(), strict=True))
        self._float = [(e, m) for e, m in pairs if e.dtype.is_floating_point]
        self._other = [(e, m) for e, m in pairs if not e.dtype.is_floating_point]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the trained model's current state in (call after each optimizer step)."""
        self.updates += 1
        d = self.current_decay()
        if self._float:
            torch._foreach_lerp_([e for e, _ in self._float], [m.detach() for _, m in self._float], 1.0 - d)
        for e, m in self._other:
            e.copy_(m)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, d: dict) -> None:
        self.module.load_state_dict(d["module"])
        self.updates = int(d["updates"])
