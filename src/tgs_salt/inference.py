"""The one forward pass of a trained model, used by validation, the OOF pass and test prediction.

A model returns mask logits (B, 1, H, W), or ``(mask logits, empty/non-empty logits (B, 1))``
when it has a classification head (``model.cls_head``). Outputs are probabilities at 101x101,
averaged over the test-time views, plus the probability that the image holds salt (None without
a head). The views: the image as trained, its horizontal flip when ``tta`` is on, and with
``shift`` > 0 the same again with the image moved ``shift`` pixels diagonally inside the padding,
down-right and up-left (``predict.tta_shift``): 1, 2, 3 or 6 views.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from tgs_salt import config as C
from tgs_salt import hardware
from tgs_salt.errors import check_interrupt
from tgs_salt.hardware import Precision
from tgs_salt.models import split_output
from tgs_salt.rundir import load_checkpoint
from tgs_salt.transforms import InputBuilder

log = logging.getLogger(__name__)


@torch.inference_mode()
def predict_batch(model, builder: InputBuilder, images: torch.Tensor, depths: torch.Tensor, device,
                  precision: Precision, tta: bool = True, shift: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities (B, 101, 101) float32 and salt probabilities (B,) or None."""
    images, depths = images.to(device), depths.to(device)
    masks, cls = [], []
    for b in [builder] + ([builder.shifted(shift), builder.shifted(-shift)] if shift else []):
        x = b(images, depths).contiguous(memory_format=precision.memory_format)
        for flip in ((False, True) if tta else (False,)):
            with precision.autocast(device):
                m, c = split_output(model(torch.flip(x, dims=[-1]) if flip else x))
            m = torch.sigmoid(m.float())
            masks.append(b.geo.crop(torch.flip(m, dims=[-1]) if flip else m))  # each view at its own offset
            if c is not None:
                cls.append(torch.sigmoid(c.float()).flatten())
    p = torch.stack(masks).mean(0)  # (B, 1, resize, resize): one resize to 101 for all views
    return builder.geo.to_101(p).squeeze(1), (torch.stack(cls).mean(0) if cls else None)


def predict_arrays(model, builder: InputBuilder, images: np.ndarray, depths: np.ndarray, device,
                   precision: Precision, tta: bool, batch_size: int,
                   shift: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (N, 101, 101) float32 and salt probabilities (N,) or None, in batches."""
    model.eval()
    out = np.empty((len(images), 101, 101), dtype=np.float32)
    cls = None
    for s in range(0, len(images), batch_size):
        check_interrupt()
        p, c = predict_batch(model, builder, torch.from_numpy(images[s:s + batch_size]),
                             torch.from_numpy(depths[s:s + batch_size]), device, precision, tta, shift)
        out[s:s + batch_size] = p.cpu().numpy()
        if c is not None:
            cls = np.empty(len(images), dtype=np.float32) if cls is None else cls
            cls[s:s + batch_size] = c.cpu().numpy()
    return out, cls


class FoldModel:
    """One trained fold loaded from its checkpoint: model, input builder, config and precision."""

    def __init__(self, ckpt_path: Path, device: torch.device, precision: Precision | None = None):
        from tgs_salt.models import build_model

        ck = load_checkpoint(ckpt_path)
        if precision is None:  # the training run's choice where this device runs it natively, else its rule
            saved = {"device_type": ck["device_type"], "precision": ck["precision"],
                     "amp": ck["config"]["train"].get("amp")} if "precision" in ck else None
            precision = hardware.for_inference(saved, device)
            if saved and precision.name != Precision.from_dict(saved["precision"]).name:
                log.info("precision: %s for %s (%s)", precision.name, ckpt_path, precision.reason)
        self.precision = precision
        self.cfg = C.for_reading(ck["config"])
        self.builder = InputBuilder.from_config(self.cfg)
        model_cfg = dict(self.cfg["model"], encoder_weights=None)  # weights come from the checkpoint
        self.model = build_model(model_cfg, self.builder.n_channels)
        self.model.load_state_dict(ck["model"])
        self.model = self.model.to(device=device, memory_format=precision.memory_format).eval()
        self.device = device

    def probs(self, images: torch.Tensor, depths: torch.Tensor, tta: bool = True, shift: int = 0):
        """(B, 101, 101) float32 probabilities and (B,) salt probabilities or None."""
        return predict_batch(self.model, self.builder, images, depths, self.device, self.precision, tta, shift)
