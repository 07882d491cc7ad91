"""Experiment configuration: YAML holds hyperparameters only; runtime facts come from the CLI.

A config is merged onto DEFAULTS; an unknown key or a bad value is a UserError that lists
what is allowed. ``resolve_config`` returns a plain nested dict that is saved in the run dir.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tgs_salt import paths
from tgs_salt.errors import UserError

CHANNELS = ("image", "depth", "row", "image_x_row")
ARCHS_PLAIN = ("plain_unet", "plain_unet_strided", "fcn")

DEFAULTS: dict[str, Any] = {
    "name": None,
    "model": {
        "arch": "Unet",                 # an smp architecture or plain_unet / plain_unet_strided / fcn
        "encoder": "resnet34",          # any smp encoder name
        "encoder_weights": "imagenet",  # imagenet | null | path to a local weights file
        "decoder_attention": None,      # null | scse
        "decoder_channels": [256, 128, 64, 32, 16],
        "base_channels": 32,            # width of the plain baselines
        "norm": "batch",                # batch | group (plain baselines only)
    },
    "input": {
        "channels": ["image", "depth", "row"],
        "resize": 101,                  # 101 -> keep; e.g. 202 upscales before padding
        "pad_to": 128,
        "pad_mode": "reflect",          # reflect | edge | constant
    },
    "augment": {
        "hflip": 0.5,
        "vflip": 0.0,                   # geologically wrong for seismic sections: off by default
        "affine_p": 0.5,
        "shift": 0.06,                  # fraction of the size
        "scale": 0.1,                   # +- fraction
        "rotate": 5.0,                  # degrees
        "brightness_contrast_p": 0.5,
        "brightness": 0.1,
        "contrast": 0.1,
    },
    "train": {
        "batch_size": 32,
        "optimizer": "adamw",           # adamw | adam | sgd
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "momentum": 0.9,
        "schedule": "cosine",           # cosine | constant | plateau  (per loss stage)
        "warmup_epochs": 1.0,
        "min_lr_ratio": 0.02,
        "plateau_patience": 3,
        "plateau_factor": 0.5,
        "stages": [
            {"loss": "bce_dice", "epochs": 20},
            {"loss": "lovasz", "epochs": 10, "lr": 5e-4},
        ],
        "early_stopping": None,         # epochs without val-metric gain before the stage ends
        "amp": "auto",                  # auto | true | false: autocast (see hardware.py for how auto decides)
        "amp_dtype": "auto",            # auto (bf16 on CPU and sm80+ GPUs, fp16 + GradScaler before) | bfloat16 | float16
        "channels_last": "auto",        # auto (measured on CPU, on with CUDA) | true | false
        "time_budget_minutes": None,    # plan the epochs so the whole job fits (stage proportions kept)
        "compile": False,
        "sync_bn": False,               # SyncBatchNorm under torchrun
        "grad_clip": None,
        "seed": 42,
        "val_batch_size": 128,
        "max_train_batches": None,      # cap batches per epoch (smoke tests)
    },
    "folds": {"k": 5, "seed": 42, "file": None, "train_folds": None},
    "predict": {"tta": True, "batch_size": 256},
    "postprocess": {
        "thresholds": [0.05, 0.95, 91],  # linspace(start, stop, count)
        "min_areas": [0, 10, 20, 30, 50, 75, 100, 150, 200, 300],
        "default_threshold": 0.5,
    },
}

CHOICES = {
    ("model", "decoder_attention"): (None, "scse"),
    ("input", "pad_mode"): ("reflect", "edge", "constant"),
    ("train", "optimizer"): ("adamw", "adam", "sgd"),
    ("train", "schedule"): ("cosine", "constant", "plateau"),
    ("train", "amp"): ("auto", True, False),
    ("train", "amp_dtype"): ("auto", "bfloat16", "float16"),
    ("train", "channels_last"): ("auto", True, False),
}
STAGE_KEYS = {"loss", "epochs", "lr"}


def _merge(base: dict, override: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if key not in base:
            allowed = ", ".join(sorted(base))
            raise UserError(f"unknown config key {where}{key!r}; allowed here: {allowed}")
        if isinstance(base[key], dict) and base[key] and not isinstance(value, dict):
            raise UserError(f"config key {where}{key} must be a mapping")
        if isinstance(base[key], dict) and base[key]:
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def find_config(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (paths.configs_dir() / name_or_path, paths.configs_dir() / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    shipped = sorted(c.stem for c in paths.configs_dir().glob("*.yaml"))
    raise UserError(f"config {name_or_path!r} not found; give a YAML path or one of: {', '.join(shipped)}")


def parse_overrides(items: list[str]) -> dict:
    """``a.b=value`` strings into a nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def load_config(name_or_path: str, overrides: list[str] | None = None) -> dict:
    path = find_config(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config {path}: invalid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path}: top level must be a mapping")
    raw.setdefault("name", path.stem)
    cfg = _merge(DEFAULTS, raw, "")
    cfg = _merge(DEFAULTS, _deep_update(cfg, parse_overrides(overrides or [])), "")
    validate(cfg, str(path))
    return cfg


def merge_defaults(raw: dict) -> dict:
    """A config dict merged onto DEFAULTS (unknown keys are errors)."""
    return _merge(DEFAULTS, raw, "")


def _deep_update(base: dict, upd: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and out[k]:
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


def _check(cond: bool, msg: str, where: str) -> None:
    if not cond:
        raise UserError(f"config {where}: {msg}")


def validate(cfg: dict, where: str = "config") -> None:
    from tgs_salt.losses import LOSSES

    for (section, key), allowed in CHOICES.items():
        v = cfg[section][key]
        _check(any(v == a and type(v) is type(a) for a in allowed), f"{section}.{key} = {cfg[section][key]!r}; allowed: "
               f"{', '.join(map(str, allowed))}", where)
    ch = cfg["input"]["channels"]
    _check(isinstance(ch, list) and ch and all(c in CHANNELS for c in ch),
           f"input.channels = {ch!r}; a non-empty list of {', '.join(CHANNELS)}", where)
    r, p = cfg["input"]["resize"], cfg["input"]["pad_to"]
    _check(isinstance(r, int) and r >= 101, f"input.resize = {r!r}; an integer >= 101", where)
    _check(isinstance(p, int) and p >= r and p % 32 == 0,
           f"input.pad_to = {p!r}; a multiple of 32 and >= input.resize ({r})", where)
    t = cfg["train"]
    for key in ("batch_size", "val_batch_size"):
        _check(isinstance(t[key], int) and t[key] >= 1, f"train.{key} = {t[key]!r}; a positive integer", where)
    _check(isinstance(t["lr"], (int, float)) and t["lr"] > 0, f"train.lr = {t['lr']!r}; a positive number", where)
    _check(isinstance(t["stages"], list) and t["stages"], "train.stages must be a non-empty list", where)
    for i, st in enumerate(t["stages"]):
        _check(isinstance(st, dict), f"train.stages[{i}] must be a mapping", where)
        unknown = set(st) - STAGE_KEYS
        _check(not unknown, f"train.stages[{i}] has unknown key(s) {sorted(unknown)}; allowed: "
               f"{', '.join(sorted(STAGE_KEYS))}", where)
        _check(st.get("loss") in LOSSES, f"train.stages[{i}].loss = {st.get('loss')!r}; allowed: "
               f"{', '.join(LOSSES)}", where)
        _check(isinstance(st.get("epochs"), int) and st["epochs"] >= 1,
               f"train.stages[{i}].epochs = {st.get('epochs')!r}; a positive integer", where)
    tb = t["time_budget_minutes"]
    _check(tb is None or (isinstance(tb, (int, float)) and not isinstance(tb, bool) and tb > 0),
           f"train.time_budget_minutes = {tb!r}; null or a positive number of minutes", where)
    es = t["early_stopping"]
    _check(es is None or (isinstance(es, int) and es >= 1), f"train.early_stopping = {es!r}; null or >= 1", where)
    f = cfg["folds"]
    _check(isinstance(f["k"], int) and f["k"] >= 2, f"folds.k = {f['k']!r}; an integer >= 2", where)
    th = cfg["postprocess"]["thresholds"]
    _check(isinstance(th, list) and len(th) == 3 and 0 < th[0] < th[1] < 1 and int(th[2]) >= 1,
           f"postprocess.thresholds = {th!r}; [start, stop, count] with 0 < start < stop < 1", where)
    for a in ("hflip", "vflip", "affine_p", "brightness_contrast_p"):
        v = cfg["augment"][a]
        _check(isinstance(v, (int, float)) and 0 <= v <= 1, f"augment.{a} = {v!r}; a probability in [0, 1]", where)
    from tgs_salt.models import check_model_config

    check_model_config(cfg["model"], where)


def total_epochs(cfg: dict) -> int:
    return sum(s["epochs"] for s in cfg["train"]["stages"])


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
