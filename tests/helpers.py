"""Shared test helpers: a tiny, fast config."""

from pathlib import Path

import yaml

TINY = {
    "name": "tiny",
    "model": {"arch": "plain_unet", "base_channels": 4, "encoder_weights": None},
    "input": {"channels": ["image", "depth", "row"], "resize": 101, "pad_to": 128},
    "augment": {"affine_p": 0.5, "brightness_contrast_p": 0.5},
    "train": {"batch_size": 8, "lr": 3e-3, "warmup_epochs": 0.5, "val_batch_size": 32,
              "amp": False, "channels_last": False,  # fixed: two runs compared for equality must not probe
              "stages": [{"loss": "bce_dice", "epochs": 2}, {"loss": "lovasz", "epochs": 1}]},
    "folds": {"k": 3, "seed": 1, "train_folds": [0, 1]},
    "predict": {"batch_size": 16},
    "postprocess": {"thresholds": [0.1, 0.9, 9], "min_areas": [0, 20]},
}


def tiny_config(tmp_path: Path, **sections) -> Path:
    import copy

    cfg = copy.deepcopy(TINY)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    p = Path(tmp_path) / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p
