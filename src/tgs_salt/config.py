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
        "encoder_depth": 5,             # smp encoders: 3..5 downsamplings (4: no deepest stage, input a multiple of 16)
        "decoder_channels": [256, 128, 64, 32, 16],  # one per encoder stage: encoder_depth entries
        "base_channels": 32,            # width of the plain baselines
        "norm": "batch",                # batch | group (plain baselines only)
        "cls_head": False,              # empty / non-empty classifier on the deepest features; empties masks
        "hypercolumn": False,           # Unet: every decoder block's output, upsampled and fused, feeds the head
        "deep_supervision": False,      # Unet: mask logits from every earlier decoder block join the training loss
        "stem_skip": True,              # Unet: the decoder's half-resolution block joins the encoder stem's features
        "half_res_head": False,         # Unet: no decoder block at full size; logits at half size, upsampled (bilinear)
                                        # (both ignored by other archs, so that --set model.arch=... works on cpu_budget)
        "zero_init_residual": False,    # ResNet encoders from scratch: each residual block's last batch-norm scale
                                        # starts at 0 (the block starts as the identity; Goyal et al. 2017)
        "stem_width": None,             # tu-<timm ResNet> encoders from scratch: the deep stem's width (timm's
                                        # stem_width; resnet10t's is 32); left out, with a log line, where it does
                                        # not apply (other encoders, weights, a larger_encoder switch)
        "larger_encoder": None,         # under a time budget: an smp encoder trained instead of model.encoder when the
        "larger_encoder_min_epochs": 150,  # plan gives that one at least this many epochs per fold (it is probed and
                                        # the plan made again for it: budget.larger_encoder)
        "larger_encoder_decoder_channels": None,  # the larger encoder's decoder widths (null: model.decoder_channels)
        "larger_encoder_lr": None,      # the learning rate the larger encoder trains at (null: train.lr)
    },
    "input": {
        "channels": ["image", "depth", "row"],
        "resize": 101,                  # 101 -> keep; e.g. 202 upscales before padding, 90 scales down
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
        "schedule": "cosine",           # cosine | linear | constant | plateau  (per loss stage)
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
        "low_res_size": None,           # progressive resizing: the first epochs train at this network input size
        "low_res_fraction": 0.5,        # ... for this fraction of the epochs
        "low_res_mode": "resize",       # resize: images and masks scaled down alike | crop: random windows at full scale
        "mid_res_size": None,           # a middle phase at this input size after the low-res one (resize mode) ...
        "mid_res_fraction": 0.0,        # ... for this fraction of the epochs (the time plan counts its measured cost)
        "low_res_validate": False,      # validate each low-resolution epoch too (off: only the last; scored at full
                                        # size, which they do not train at, it took ~20% of such an epoch on CPU)
        "val_every": 1,                 # validate every n-th full-size epoch and the planned last (n apart, the first
                                        # counted back from the last); select: best, early stopping, plateau see only those
        "empty_fraction": 1.0,          # share of the empty-mask training images each epoch draws afresh (all the
                                        # ones with salt always): fewer, cheaper epochs spent on salt
        "drop_stripe_masks": False,     # train without the "vertical" masks (every column all salt or all empty:
                                        # a labelling artefact); validation and CV keep them
        "cpu_malloc": "keep",           # keep | default: on a CPU, glibc's malloc keeps freed memory for the next step
                                        # (no trimming, no mmap: 1.02-1.12x the img/s of real epochs; hardware.keep_freed_memory)
        "sync_bn": False,               # SyncBatchNorm under torchrun
        "cpu_processes": 1,             # ./run_all.sh on a CPU: train data-parallel in this many processes (at most
                                        # one per core; the cores shared out as threads; BatchNorm per process)
        "grad_clip": None,
        "cls_loss_weight": 0.1,         # weight of the classifier's BCE (with model.cls_head)
        "small_mask_weight": 1.0,       # weight in the mask loss of each image whose salt covers more than 0 and at
        "small_mask_coverage": 0.1,     # most this share of it (1: every image alike, the unweighted losses)
        "side_loss": "bce",             # loss of each deep-supervision side output (model.deep_supervision)
        "side_loss_weight": 0.1,        # its weight, per side output
        "tensorboard": False,           # scalars and the worst validation predictions per epoch (pip install tensorboard)
        "select": "best",               # weights kept per fold: best (validation metric) | last epoch
        "ema": None,                    # per-step decay of a moving average of the weights (e.g. 0.99): validated and kept
        "pseudo_labels": None,          # null | a finished run's predict output (test_probs.npz): confident test images join training
        "pseudo_confidence": 0.9,       # least per-image confidence (mean |2p - 1|) of a pseudo-labelled image
        "seed": 42,
        "val_batch_size": 128,
        "max_train_batches": None,      # cap batches per epoch (smoke tests)
    },
    "folds": {"k": 5, "seed": 42, "file": None, "train_folds": None},
    "predict": {
        "tta": True,                    # + the horizontally flipped image
        "tta_shift": 0,                 # > 0: + the image shifted this many px diagonally both ways (3x the views)
        "tta_shift_max_share": 0.05,    # under a time budget the shift views are dropped (flip only) when they would
                                        # take more than this share of it (null: kept): budget.choose_views
        "batch_size": 256,
    },
    "postprocess": {
        "thresholds": [0.05, 0.95, 91],  # linspace(start, stop, count)
        "min_areas": [0, 10, 20, 30, 50, 75, 100, 150, 200, 300],
        "default_threshold": 0.5,
        "tune": "auto",                 # auto: the tuned post-processing only where it beats the untuned one nested | true | false
        "tune_params": ["threshold", "min_area", "cls_cut"],  # what the tuning searches; the rest stays untuned
    },
}

CHOICES = {
    ("model", "decoder_attention"): (None, "scse"),
    ("input", "pad_mode"): ("reflect", "edge", "constant"),
    ("train", "optimizer"): ("adamw", "adam", "sgd"),
    ("train", "schedule"): ("cosine", "linear", "constant", "plateau"),
    ("train", "amp"): ("auto", True, False),
    ("train", "amp_dtype"): ("auto", "bfloat16", "float16"),
    ("train", "channels_last"): ("auto", True, False),
    ("train", "select"): ("best", "last"),
    ("postprocess", "tune"): ("auto", True, False),
    ("train", "low_res_mode"): ("resize", "crop"),
    ("train", "cpu_malloc"): ("keep", "default"),
}
STAGE_KEYS = {"loss", "epochs", "lr"}

# Every scalar key: (kind, low, high, nullable); low/high are inclusive bounds, "(" marks an
# exclusive low. Floats are also accepted as YAML strings such as 5e-4 (YAML 1.1 reads them as text).
INF = float("inf")
SCALARS: dict[tuple[str, str], tuple] = {
    ("model", "base_channels"): (int, 1, 1024, False),
    ("model", "cls_head"): (bool, None, None, False),
    ("model", "hypercolumn"): (bool, None, None, False),
    ("model", "deep_supervision"): (bool, None, None, False),
    ("model", "stem_skip"): (bool, None, None, False),
    ("model", "half_res_head"): (bool, None, None, False),
    ("model", "zero_init_residual"): (bool, None, None, False),
    ("model", "larger_encoder_min_epochs"): (int, 1, 1 << 20, False),
    ("model", "stem_width"): (int, 4, 1024, True),
    ("model", "larger_encoder_lr"): (float, "(0", 10, True),
    ("input", "resize"): (int, 16, 1024, False),
    ("input", "pad_to"): (int, 16, 1024, False),
    ("augment", "hflip"): (float, 0, 1, False),
    ("augment", "vflip"): (float, 0, 1, False),
    ("augment", "affine_p"): (float, 0, 1, False),
    ("augment", "shift"): (float, 0, 0.5, False),
    ("augment", "scale"): (float, 0, 0.9, False),
    ("augment", "rotate"): (float, 0, 180, False),
    ("augment", "brightness_contrast_p"): (float, 0, 1, False),
    ("augment", "brightness"): (float, 0, 1, False),
    ("augment", "contrast"): (float, 0, 1, False),
    ("train", "batch_size"): (int, 1, 1 << 16, False),
    ("train", "val_batch_size"): (int, 1, 1 << 16, False),
    ("train", "lr"): (float, "(0", 10, False),
    ("train", "weight_decay"): (float, 0, 10, False),
    ("train", "momentum"): (float, 0, 1, False),
    ("train", "warmup_epochs"): (float, 0, 1e6, False),
    ("train", "min_lr_ratio"): (float, 0, 1, False),
    ("train", "plateau_patience"): (int, 1, 1 << 20, False),
    ("train", "plateau_factor"): (float, "(0", 1, False),
    ("train", "early_stopping"): (int, 1, 1 << 20, True),
    ("train", "time_budget_minutes"): (float, "(0", 1e6, True),
    ("train", "compile"): (bool, None, None, False),
    ("train", "low_res_validate"): (bool, None, None, False),
    ("train", "val_every"): (int, 1, 1000, False),
    ("train", "low_res_size"): (int, 16, 1024, True),
    ("train", "low_res_fraction"): (float, 0, 1, False),
    ("train", "empty_fraction"): (float, "(0", 1, False),
    ("train", "drop_stripe_masks"): (bool, None, None, False),
    ("train", "mid_res_size"): (int, 16, 1024, True),
    ("train", "mid_res_fraction"): (float, 0, 1, False),
    ("train", "sync_bn"): (bool, None, None, False),
    ("train", "cpu_processes"): (int, 1, 1024, False),
    ("train", "grad_clip"): (float, "(0", 1e9, True),
    ("train", "cls_loss_weight"): (float, 0, 100, False),
    ("train", "side_loss_weight"): (float, 0, 100, False),
    ("train", "small_mask_weight"): (float, "(0", 100, False),
    ("train", "small_mask_coverage"): (float, "(0", 1, False),
    ("train", "tensorboard"): (bool, None, None, False),
    ("train", "ema"): (float, "(0", 0.999999, True),
    ("train", "pseudo_confidence"): (float, 0, 1, False),
    ("train", "seed"): (int, 0, 2**32 - 1, False),
    ("train", "max_train_batches"): (int, 1, 1 << 30, True),
    ("folds", "k"): (int, 2, 1000, False),
    ("folds", "seed"): (int, 0, 2**32 - 1, False),
    ("predict", "tta"): (bool, None, None, False),
    ("predict", "tta_shift"): (int, 0, 64, False),
    ("predict", "tta_shift_max_share"): (float, 0, 1, True),
    ("predict", "batch_size"): (int, 1, 1 << 16, False),
    ("postprocess", "default_threshold"): (float, "(0", 1, False),
}
_FLOAT_TEXT = __import__("re").compile(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")


def _yaml_word(a) -> str:
    return {True: "true", False: "false", None: "null"}.get(a, str(a)) if not isinstance(a, str) else a


def _scalar(value, spec: tuple, name: str, where: str):
    """``value`` checked against ``spec`` (see SCALARS); returns it, floats coerced from text."""
    kind, low, high, nullable = spec
    if value is None and nullable:
        return None
    if kind is bool:
        _check(isinstance(value, bool), f"{name} = {value!r}; true or false", where)
        return value
    if kind is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        value = float(value)
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    ok_type = ok_type and not isinstance(value, bool)
    exclusive = isinstance(low, str)
    lo = float(low[1:]) if exclusive else low
    in_range = ok_type and value == value and (value > lo if exclusive else value >= lo) and value <= high
    what = "an integer" if kind is int else "a number"
    fmt = (lambda x: str(int(x))) if kind is int else (lambda x: f"{x:g}")
    rng = f"{'>' if exclusive else '>='} {fmt(lo)} and <= {fmt(high)}"
    _check(in_range, f"{name} = {value!r}; {what} {rng}{' (or null)' if nullable else ''}", where)
    return float(value) if kind is float else value


def _merge(base: dict, override: dict, where: str, strict: bool = True) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if key not in base and not strict:
            out[key] = copy.deepcopy(value)
            continue
        if key not in base:
            allowed = ", ".join(sorted(base))
            raise UserError(f"unknown config key {where}{key!r}; allowed here: {allowed}")
        if isinstance(base[key], dict) and base[key] and not isinstance(value, dict):
            raise UserError(f"config key {where}{key} must be a mapping")
        if isinstance(base[key], dict) and base[key]:
            out[key] = _merge(base[key], value, f"{where}{key}.", strict)
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
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.0005")
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


def for_reading(raw: dict) -> dict:
    """A finished run's saved config (config.yaml, or a checkpoint's) on today's DEFAULTS, for the
    commands that read runs (cv, predict, compare, ...): a key added since the run takes its
    default. For the keys those commands read (model, input, predict, postprocess) the default is
    the behaviour from before the key (predict.tta_shift 0, postprocess.tune auto, model.cls_head
    off); a key removed since is kept and ignored, so older runs still load."""
    return _merge(DEFAULTS, raw or {}, "", strict=False)


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
    from tgs_salt.losses import parse_loss

    for (section, key), allowed in CHOICES.items():
        v = cfg[section][key]
        _check(any(v == a and type(v) is type(a) for a in allowed), f"{section}.{key} = {cfg[section][key]!r}; allowed: "
               f"{', '.join(_yaml_word(a) for a in allowed)}", where)
    for (section, key), spec in SCALARS.items():
        cfg[section][key] = _scalar(cfg[section][key], spec, f"{section}.{key}", where)
    ch = cfg["input"]["channels"]
    _check(isinstance(ch, list) and ch and all(c in CHANNELS for c in ch),
           f"input.channels = {ch!r}; a non-empty list of {', '.join(CHANNELS)}", where)
    r, p = cfg["input"]["resize"], cfg["input"]["pad_to"]
    m = cfg["model"]
    depth = m["encoder_depth"]
    _check(isinstance(depth, int) and not isinstance(depth, bool) and 3 <= depth <= 5,
           f"model.encoder_depth = {depth!r}; 3, 4 or 5", where)
    from tgs_salt.models import SMP_ARCHS

    smp_arch = m["arch"] in SMP_ARCHS
    stride = 2 ** depth if smp_arch else 16  # the plain baselines downsample 4 times
    _check(isinstance(p, int) and p >= r and p % stride == 0,
           f"input.pad_to = {p!r}; a multiple of {stride} (2^{stride.bit_length() - 1} for "
           f"{'model.encoder_depth ' + str(depth) if smp_arch else 'the plain baselines'}) and >= input.resize ({r})",
           where)
    shift = cfg["predict"]["tta_shift"]
    _check(shift <= (p - r) // 2, f"predict.tta_shift = {shift!r}; at most {(p - r) // 2} px: the image is shifted "
           f"both ways inside the padding from input.resize {r} to input.pad_to {p}", where)
    t = cfg["train"]
    lo = t["low_res_size"]
    _check(lo is None or (lo % stride == 0 and lo < p),
           f"train.low_res_size = {lo!r}; null or a multiple of {stride} below input.pad_to ({p})", where)
    _check(lo is None or t["low_res_mode"] != "crop" or lo <= r,
           f"train.low_res_size = {lo!r} with train.low_res_mode crop: the window must fit in the "
           f"{r} px image (input.resize)", where)
    mid = t["mid_res_size"]
    _check(mid is None or (lo is not None and t["low_res_mode"] == "resize" and lo < mid < p and mid % stride == 0),
           f"train.mid_res_size = {mid!r}; null or a multiple of {stride} between train.low_res_size ({lo}, resize "
           f"mode) and input.pad_to ({p})", where)
    _check(mid is None or t["low_res_fraction"] + t["mid_res_fraction"] <= 1,
           f"train.low_res_fraction {t['low_res_fraction']} + train.mid_res_fraction {t['mid_res_fraction']} is more "
           "than all the epochs", where)
    _check(isinstance(t["stages"], list) and t["stages"], "train.stages must be a non-empty list", where)
    _check(t["pseudo_labels"] is None or (isinstance(t["pseudo_labels"], str) and t["pseudo_labels"].strip()),
           f"train.pseudo_labels = {t['pseudo_labels']!r}; null or the directory of a finished run's test "
           "predictions (test_probs.npz)", where)
    try:
        parse_loss(t["side_loss"])
    except ValueError as e:
        _check(False, f"train.side_loss: {e}", where)
    for i, st in enumerate(t["stages"]):
        _check(isinstance(st, dict), f"train.stages[{i}] must be a mapping", where)
        unknown = set(st) - STAGE_KEYS
        _check(not unknown, f"train.stages[{i}] has unknown key(s) {sorted(unknown)}; allowed: "
               f"{', '.join(sorted(STAGE_KEYS))}", where)
        try:
            parse_loss(st.get("loss"))
        except ValueError as e:
            _check(False, f"train.stages[{i}].loss: {e}", where)
        _check(isinstance(st.get("epochs"), int) and not isinstance(st.get("epochs"), bool) and st["epochs"] >= 1,
               f"train.stages[{i}].epochs = {st.get('epochs')!r}; a positive integer", where)
        if "lr" in st:
            st["lr"] = _scalar(st["lr"], SCALARS[("train", "lr")], f"train.stages[{i}].lr", where)
    f = cfg["folds"]
    tf = f["train_folds"]
    _check(tf is None or (isinstance(tf, list) and tf and all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x < f["k"] for x in tf)),
        f"folds.train_folds = {tf!r}; null or a non-empty list of folds in 0..{f['k'] - 1}", where)
    _check(f["file"] is None or isinstance(f["file"], str), f"folds.file = {f['file']!r}; null or a file name",
           where)
    ma = cfg["postprocess"]["min_areas"]
    _check(isinstance(ma, list) and ma and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 10201
                                               for x in ma),
           f"postprocess.min_areas = {ma!r}; a non-empty list of pixel counts 0..10201", where)
    from tgs_salt.postprocess import TUNE_PARAMS

    tp = cfg["postprocess"]["tune_params"]
    _check(isinstance(tp, list) and tp and all(x in TUNE_PARAMS for x in tp) and len(set(tp)) == len(tp),
           f"postprocess.tune_params = {tp!r}; a non-empty list of {', '.join(TUNE_PARAMS)} (each once)", where)
    for key in ("decoder_channels", "larger_encoder_decoder_channels"):
        dc = m.get(key)
        if dc is None and key != "decoder_channels":
            continue
        _check(isinstance(dc, list) and dc and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                   for x in dc),
               f"model.{key} = {dc!r}; a list of positive integers", where)
    # (the larger encoder's widths are used only where their count fits model.encoder_depth: budget.planned,
    # so that --set model.encoder_depth=5 with five decoder_channels still works on cpu_budget)
    dc = m["decoder_channels"]
    if m["arch"] in ("Unet", "UnetPlusPlus"):
        _check(len(dc) == depth, f"model.decoder_channels = {dc!r} has {len(dc)} entries; {m['arch']} needs one per "
               f"encoder stage: model.encoder_depth = {depth} entries", where)
    th = cfg["postprocess"]["thresholds"]
    _check(isinstance(th, list) and len(th) == 3 and all(isinstance(x, (int, float)) for x in th)
           and 0 < th[0] < th[1] < 1 and int(th[2]) >= 1,
           f"postprocess.thresholds = {th!r}; [start, stop, count] with 0 < start < stop < 1", where)
    from tgs_salt.models import check_model_config

    check_model_config(cfg["model"], where)


def total_epochs(cfg: dict) -> int:
    return sum(s["epochs"] for s in cfg["train"]["stages"])


def low_res_count(fraction: float, total: int) -> int:
    """How many of ``total`` epochs progressive resizing trains at the low resolution: the rule
    training and the time plan share."""
    return round(fraction * total)


def low_res_epochs(cfg: dict) -> int:
    """How many of the first epochs train at ``train.low_res_size`` (progressive resizing)."""
    t = cfg["train"]
    return 0 if t["low_res_size"] is None else low_res_count(t["low_res_fraction"], total_epochs(cfg))


def mid_res_epochs(cfg: dict) -> int:
    """How many epochs after the low-resolution ones train at ``train.mid_res_size``."""
    t = cfg["train"]
    return 0 if t["mid_res_size"] is None else low_res_count(t["mid_res_fraction"], total_epochs(cfg))


def phase_of_epoch(cfg: dict, epoch: int) -> int:
    """The resolution phase the config puts epoch ``epoch`` (0-based) in: 0 low (train.low_res_size),
    1 middle (train.mid_res_size), 2 full size (budget.LOW, MID, FULL)."""
    n_low = low_res_epochs(cfg)
    return 0 if epoch < n_low else 1 if epoch < n_low + mid_res_epochs(cfg) else 2


def n_views(tta: bool, shift: int = 0) -> int:
    """Forward passes per image at test time: flip TTA doubles them, shift TTA triples them."""
    return (2 if tta else 1) * (3 if shift else 1)


def validates_epoch(cfg: dict, epoch: int, low_res: bool, last_validated: int | None = None) -> bool:
    """Whether epoch ``epoch`` (0-based) is validated: of the low-resolution epochs only the last unless
    ``train.low_res_validate``; of the full-size ones the planned last (by the plan's current number of
    epochs), and every ``train.val_every``-th: the first counted back from the planned last, each later
    one n epochs after the last validated full-size epoch ``last_validated`` (unless the planned last is
    nearer than n/2, which is then the next). Counting from the last validation keeps the spacing when a
    time budget's re-plan moves the end by an epoch after every epoch (counting back from the moving end
    validated neighbours, 48, 49, 50, then left a gap of 10). A re-plan that ends the fold right after an
    unvalidated epoch leaves the last unvalidated; the OOF pass scores the kept weights anyway."""
    t = cfg["train"]
    if low_res:
        return bool(t["low_res_validate"]) or epoch + 1 >= low_res_epochs(cfg)
    n, last = int(t["val_every"]), total_epochs(cfg) - 1
    if epoch >= last:
        return True
    if last_validated is None:
        return (last - epoch) % n == 0
    return epoch - last_validated >= n and last - epoch >= (n + 1) // 2


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
