"""Training: ``train_fold(cfg, fold, run_dir, ...)`` trains one fold; ``train_command`` loops.

A fold directory ``<run_dir>/fold<k>/`` holds ``last.pt`` (resumable: model, optimizer,
scaler, LR state, epoch, RNG), ``best.pt`` (the kept weights: best validation metric, or the last epoch with ``train.select: last``),
``log.csv`` (one row per epoch), ``oof.npz`` (validation-id probabilities with flip TTA,
float16, 101x101, and ``cls``: salt probabilities when the model has a classifier) and
``done.json`` (written last: the fold is complete; ``last.pt`` is then
removed, as it only serves to resume an unfinished fold).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from tgs_salt import budget as B
from tgs_salt import config as C
from tgs_salt import hardware, paths
from tgs_salt.distributed import (
    DistContext,
    SyncBatchNormCPU,
    all_gather_objects,
    barrier,
    convert_sync_batchnorm_cpu,
    init_distributed,
    mark_finished,
    shutdown,
    sync_buffers,
)
from tgs_salt.ema import EMA
from tgs_salt.errors import UserError, check_interrupt
from tgs_salt.hardware import Precision, resolve_device
from tgs_salt.inference import predict_arrays
from tgs_salt.io_utils import (
    atomic_path,
    exclusive_lock,
    remove_stale_temps,
    sha1_of,
    write_json_atomic,
    write_text_atomic,
)
from tgs_salt.losses import get_loss
from tgs_salt.metric import per_image_scores
from tgs_salt.models import split_output, take_side_logits
from tgs_salt.postprocess import apply, untuned
from tgs_salt.pseudo import PseudoSet, load_pseudo
from tgs_salt.rundir import RunDir, load_checkpoint, save_checkpoint
from tgs_salt.tensorboard import TensorBoard
from tgs_salt.transforms import (
    AugmentedArrays,
    EmptySubsampler,
    EpochKeySampler,
    InputBuilder,
    build_augment,
    epoch_draw,
)

log = logging.getLogger(__name__)
LOG_FIELDS = ["epoch", "stage", "loss_name", "lr", "train_loss", "val_loss", "val_metric", "val_iou",
              "best_metric", "seconds", "images_per_s", "input_px"]


class TrainingError(UserError):
    """Training cannot go on (NaN loss, ...); the last good checkpoint stays."""


# ----------------------------------------------------------------------------- helpers

def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.REPO_ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except Exception:
        return None


class LRController:
    """Per-iteration learning rate over loss stages (cosine / linear / constant / plateau, warm-up)."""

    def __init__(self, cfg: dict):
        self.t = cfg["train"]
        self.stages = self.t["stages"]
        self.starts = np.cumsum([0] + [s["epochs"] for s in self.stages]).tolist()
        self.scale, self.best, self.bad = 1.0, -math.inf, 0

    def stage_of(self, epoch: int) -> int:
        for i in range(len(self.stages)):
            if epoch < self.starts[i + 1]:
                return i
        return len(self.stages) - 1

    def lr(self, epoch: int, frac: float) -> float:
        s = self.stage_of(epoch)
        base = self.stages[s].get("lr", self.t["lr"])
        pos = epoch + frac
        if s == 0 and pos < self.t["warmup_epochs"]:
            return base * (0.1 + 0.9 * pos / self.t["warmup_epochs"])
        if self.t["schedule"] == "constant":
            return base
        if self.t["schedule"] == "plateau":
            return base * self.scale
        p = (pos - self.starts[s]) / self.stages[s]["epochs"]
        lo = base * self.t["min_lr_ratio"]
        p = min(max(p, 0.0), 1.0)
        if self.t["schedule"] == "linear":
            return lo + (base - lo) * (1.0 - p)
        return lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * p))

    def new_stage(self) -> None:
        self.scale, self.best, self.bad = 1.0, -math.inf, 0

    def observe(self, metric: float) -> None:
        if self.t["schedule"] != "plateau":
            return
        if metric > self.best + 1e-4:
            self.best, self.bad = metric, 0
        else:
            self.bad += 1
            if self.bad >= self.t["plateau_patience"]:
                self.scale *= self.t["plateau_factor"]
                self.bad = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, d: dict) -> None:
        self.scale, self.best, self.bad = d["scale"], d["best"], d["bad"]


def make_optimizer(params, t: dict) -> torch.optim.Optimizer:
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"],
                               nesterov=True)
    cls = torch.optim.AdamW if t["optimizer"] == "adamw" else torch.optim.Adam
    return cls(params, lr=t["lr"], weight_decay=t["weight_decay"])


# ----------------------------------------------------------------------------- run directory

def prepare_run_dir(run_dir: Path, cfg: dict, fold_file: Path, data_dir: Path, force: bool,
                    pseudo_sha1: str | None = None) -> None:
    """Write (or check) the resolved config and the run's facts; refuse silent changes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run_dir)
    cfg_path = run_dir / "config.yaml"
    text = C.dump(cfg)
    if cfg_path.exists() and not force:
        # compared after merging onto today's defaults: a key added to the code since is no change
        try:
            saved = C.merge_defaults(yaml.safe_load(cfg_path.read_text()) or {})
        except UserError:
            saved = None
        if saved != cfg:
            raise UserError(f"{cfg_path} holds a different config than the one given; use another --run-dir, "
                            "or --force to retrain with the new one")
    folds_sha = sha1_of(fold_file)
    facts_path = run_dir / "run.json"
    if facts_path.exists() and not force:
        old = json.loads(facts_path.read_text())
        if old.get("folds_sha1") != folds_sha:
            raise UserError(f"fold file {fold_file} changed since {run_dir} was trained; retrain with --force "
                            "or use another --run-dir")
        if old.get("pseudo_labels_sha1") != pseudo_sha1:
            raise UserError(f"the pseudo-labels ({cfg['train']['pseudo_labels']}/test_probs.npz) changed since "
                            f"{run_dir} was trained; retrain with --force or use another --run-dir")
    write_text_atomic(cfg_path, text)
    write_json_atomic(facts_path, {"fold_file": str(fold_file), "folds_sha1": folds_sha,
                                   "data_dir": str(Path(data_dir).resolve()), "git_commit": git_commit(),
                                   "torch": torch.__version__,
                                   **({"pseudo_labels_sha1": pseudo_sha1} if pseudo_sha1 else {})})


def resolve_fold_file(cfg: dict, data_dir: Path, is_main: bool = True) -> Path:
    from tgs_salt.data.folds import default_name, fold_path, make_folds

    f = cfg["folds"]
    if f["file"]:
        path = fold_path(f["file"])
        if not path.exists():
            raise UserError(f"fold file {path} (folds.file in the config) does not exist")
        return path
    path = fold_path(default_name(data_dir, f["k"], f["seed"]))
    if not path.exists() and is_main:
        make_folds(data_dir, k=f["k"], seed=f["seed"])
    return path


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, builder, data, idx, device, cfg, precision, loss_fn, ctx: DistContext, tta: bool = False,
             shift: int = 0):
    """Validation loss, competition metric at the default threshold, pixel IoU, and the ids'
    order with their probabilities and salt probabilities (or None), over all ranks."""
    mine = idx[ctx.rank::ctx.world]
    probs, cls = predict_arrays(model, builder, data.images[mine], data.depths[mine], device, precision, tta,
                                cfg["train"]["val_batch_size"], shift)
    # loss on logits recovered from the probabilities at 101x101 (cheap, consistent across geometries)
    p = torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6)
    logits = torch.log(p) - torch.log1p(-p)
    target = torch.from_numpy(data.masks[mine]).float()
    loss_sum = float(loss_fn(logits.unsqueeze(1), target.unsqueeze(1))) * len(mine) if len(mine) else 0.0
    parts = all_gather_objects((mine, probs.astype(np.float16), loss_sum, cls), ctx)
    order = np.concatenate([q[0] for q in parts])
    all_probs = np.concatenate([q[1] for q in parts])
    sort = np.argsort(order, kind="stable")
    order, all_probs = order[sort], all_probs[sort]
    all_cls = np.concatenate([q[3] for q in parts])[sort] if cls is not None else None
    val_loss = sum(q[2] for q in parts) / max(len(order), 1)
    pred = apply(all_probs, untuned(cfg, all_cls is not None), cls=all_cls)  # a classifier empties masks
    truth = data.masks[order]
    metric = float(per_image_scores(pred, truth).mean())
    inter, union = np.logical_and(pred, truth).sum(), np.logical_or(pred, truth).sum()
    iou = float(inter / union) if union else 1.0
    return val_loss, metric, iou, order, all_probs, all_cls


# ----------------------------------------------------------------------------- one fold

@dataclass
class TrainState:
    """Everything a fold needs to continue exactly where it stopped; one state_dict for last.pt."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lrc: LRController
    epoch: int = 0           # the next epoch to run
    best_metric: float = -1.0
    best_epoch: int = -1
    since_best: int = 0      # epochs without a gain, within the stage
    ema: EMA | None = None   # the averaged weights (train.ema): validated and kept instead of the model's

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights each epoch validates and a fold keeps."""
        return self.model if self.ema is None else self.ema.module

    def state_dict(self) -> dict:
        d = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
             "scaler": self.scaler.state_dict(), "lr_state": self.lrc.state_dict(), "epoch": self.epoch,
             "best_metric": self.best_metric, "best_epoch": self.best_epoch, "since_best": self.since_best,
             "rng_torch": torch.get_rng_state()}
        if self.ema is not None:
            d["ema"] = self.ema.state_dict()
        return d

    def load_state_dict(self, d: dict) -> None:
        self.model.load_state_dict(d["model"])
        self.optimizer.load_state_dict(d["optimizer"])
        self.scaler.load_state_dict(d["scaler"])
        self.lrc.load_state_dict(d["lr_state"])
        self.epoch, self.best_metric, self.best_epoch = d["epoch"], d["best_metric"], d["best_epoch"]
        self.since_best = d["since_best"]
        if self.ema is not None:
            if "ema" not in d:
                raise UserError("the checkpoint to resume has no averaged weights but train.ema is set; "
                                "resume with the config it was started with, or --force to restart")
            self.ema.load_state_dict(d["ema"])
        torch.set_rng_state(d["rng_torch"])


def observe(metric: float, best_metric: float, since_best: int) -> tuple[bool, float, int]:
    """(improved, best metric, epochs without gain) after an epoch scoring ``metric``."""
    if metric > best_metric:
        return True, metric, 0
    return False, best_metric, since_best + 1


def next_epoch(epoch: int, starts: list[int], since_best: int, early_stopping: int | None) -> tuple[int, bool]:
    """The epoch to run after ``epoch`` and whether it opens a new stage. ``starts`` are the
    stages' first epochs followed by the total; a stage ends early after ``early_stopping``
    epochs without gain (the last stage then ends the fold)."""
    n_epochs = starts[-1]
    stage = max(i for i in range(len(starts) - 1) if starts[i] <= epoch)
    nxt = epoch + 1
    if early_stopping and since_best >= early_stopping and nxt < starts[stage + 1]:
        nxt = starts[stage + 1]
    return nxt, nxt < n_epochs and nxt >= starts[stage + 1]


def small_mask_weights(y: torch.Tensor, t: dict) -> torch.Tensor | None:
    """Per image of the target batch ``y`` (B, 1, H, W): ``train.small_mask_weight`` where the mask's
    salt covers more than 0 and at most ``train.small_mask_coverage`` of its pixels, else 1; None
    when the weight is 1 (the unweighted losses, unchanged)."""
    if t["small_mask_weight"] == 1:
        return None
    cover = y.flatten(1).float().mean(1)
    small = (cover > 0) & (cover <= t["small_mask_coverage"])
    return torch.where(small, float(t["small_mask_weight"]), 1.0).to(y.device, torch.float32)


def batch_loss(out, label, side, y, geo, loss_fn, side_fn, t: dict) -> torch.Tensor:
    """The training loss of one batch: the stage's loss on the (cropped) mask logits, plus each
    deep-supervision side output's (upsampled to the output's size, then cropped) and the empty /
    non-empty classifier's BCE, with their weights from the train config. With
    ``train.small_mask_weight`` w != 1 the mask losses weigh each image whose (augmented) mask
    covers more than 0 and at most ``train.small_mask_coverage`` of it w times the others."""
    F = torch.nn.functional
    w = small_mask_weights(y, t)
    weight = () if w is None else (w,)
    loss = loss_fn(geo.crop(out).float(), y, *weight)
    for s in side or []:  # each earlier decoder block's logits against the same mask
        up = F.interpolate(s.float(), size=out.shape[2:], mode="bilinear", align_corners=False)
        loss = loss + t["side_loss_weight"] * side_fn(geo.crop(up), y, *weight)
    if label is not None:  # empty / non-empty classifier, trained jointly
        has_salt = y.flatten(1).amax(1, keepdim=True)
        loss = loss + t["cls_loss_weight"] * F.binary_cross_entropy_with_logits(label.float(), has_salt)
    return loss


def train_one_epoch(fwd_model, model, loader, n_batches: int, state: TrainState, builder: InputBuilder, loss_fn,
                    t: dict, device, precision: Precision, desc: str, progress: ProgressLog, show_bar: bool,
                    on_bad_loss) -> tuple[float, int, float]:
    """One pass over the loader: (summed loss, images seen, last learning rate)."""
    from tqdm import tqdm

    model.train()
    mf, geo = precision.memory_format, builder.geo
    side_fn = get_loss(t["side_loss"])
    loss_acc = torch.zeros((), device=device)  # summed on the device: no host sync per step on CUDA
    check_every = 1 if device.type == "cpu" else 50  # on CPU a sync costs nothing
    seen, lr = 0, 0.0
    bar = tqdm(total=n_batches, desc=desc, disable=None if show_bar else True, leave=False)
    progress.enabled = progress.enabled and bar.disable
    for b, (img, mask, depth) in enumerate(loader):
        if b >= n_batches:
            break
        check_interrupt()
        lr = state.lrc.lr(state.epoch, b / n_batches)
        for g in state.optimizer.param_groups:
            g["lr"] = lr
        img, mask, depth = (v.to(device, non_blocking=True) for v in (img, mask, depth))
        x, y = builder.training_pair(img, mask, depth, key=(state.epoch, b))
        x = x.contiguous(memory_format=mf)
        with precision.autocast(device):
            out, label = split_output(fwd_model(x))
        loss = batch_loss(out, label, take_side_logits(model), y, geo, loss_fn, side_fn, t)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        if t["grad_clip"]:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        state.scaler.step(state.optimizer)
        state.scaler.update()
        if state.ema is not None:
            state.ema.update()
        loss_acc += loss.detach() * len(img)
        seen += len(img)
        if (b + 1) % check_every == 0 or b + 1 == n_batches:
            mean = float(loss_acc) / seen
            if not math.isfinite(mean):
                bar.close()
                on_bad_loss(mean, b, lr)
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.1e}")
            progress.update(b + 1, mean, seen)
        bar.update()
    bar.close()
    return float(loss_acc), seen, lr


def _setup_model(cfg: dict, device, precision: Precision, ctx: DistContext):
    """(model, the module to call forward on: DDP- or compile-wrapped)."""
    from tgs_salt.models import build_model

    t = cfg["train"]
    model = build_model(cfg["model"], len(cfg["input"]["channels"]))
    if ctx.enabled and t["sync_bn"]:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # torch's SyncBatchNorm is GPU-only
            model = convert_sync_batchnorm_cpu(model)
            if ctx.is_main:
                n = sum(isinstance(m, SyncBatchNormCPU) for m in model.modules())
                log.info("train.sync_bn: %d BatchNorm layers normalise over the %d processes' batches "
                         "(SyncBatchNormCPU)", n, ctx.world)
    model = model.to(device=device, memory_format=precision.memory_format)
    fwd_model = model
    if ctx.enabled:
        fwd_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if t["compile"]:
        fwd_model = torch.compile(fwd_model)
    return model, fwd_model


def _loader(cfg: dict, data, train_idx: np.ndarray, seed: int, device, workers: int, ctx: DistContext,
            pseudo: PseudoSet | None = None):
    t = cfg["train"]
    augment = build_augment(cfg["augment"])
    arrays = [data.images[train_idx], data.masks[train_idx], data.depths[train_idx]]
    if pseudo is not None:  # appended: the real images keep their indices, hence their augmentation seeds
        arrays = [np.concatenate([a, b]) for a, b in zip(arrays, (pseudo.images, pseudo.masks, pseudo.depths))]
    ds = AugmentedArrays(*arrays, augment, seed)
    if t["batch_size"] % ctx.world:
        raise UserError(f"train.batch_size {t['batch_size']} is not divisible by the {ctx.world} processes")
    if t["empty_fraction"] < 1:
        draw = EmptySubsampler(_empty(arrays[1]), t["empty_fraction"], seed, ctx.world, ctx.rank)
    else:  # every image each epoch: the order earlier runs had
        draw = torch.utils.data.DistributedSampler(ds, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=seed,
                                                   drop_last=True)
    if len(draw) == 0:
        raise UserError(f"no training image for each of the {ctx.world} processes: {len(ds)} images, "
                        f"{int(_empty(arrays[1]).sum())} of them empty, train.empty_fraction {t['empty_fraction']}")
    per_rank = min(t["batch_size"] // ctx.world, len(draw))
    sampler = EpochKeySampler(draw, len(ds))
    loader = torch.utils.data.DataLoader(ds, batch_size=per_rank, sampler=sampler, num_workers=workers,
                                         drop_last=True, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    n_batches = len(loader) if t["max_train_batches"] is None else min(len(loader), t["max_train_batches"])
    return loader, sampler, n_batches


def fold_rows(cfg: dict, folds: np.ndarray, fold: int, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of a fold; with train.drop_stripe_masks, the training rows
    without the "vertical" masks (data.folds.stripe_masks). Validation keeps every image: the
    held-out score stays the competition's."""
    from tgs_salt.data.folds import stripe_masks

    train_idx, val_idx = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
    if cfg["train"]["drop_stripe_masks"] and len(train_idx):
        train_idx = train_idx[~stripe_masks(masks[train_idx])]
    return train_idx, val_idx


def _empty(masks: np.ndarray) -> np.ndarray:
    """Per mask: no salt pixel (pseudo-labels included, as they would be trained)."""
    return ~np.asarray(masks).reshape(len(masks), -1).any(axis=1)


def images_per_epoch(cfg: dict, masks: np.ndarray) -> int:
    """The images an epoch trains on (what the time plan counts): the draw of train.empty_fraction,
    in whole batches, capped by train.max_train_batches."""
    t = cfg["train"]
    n = epoch_draw(_empty(masks), t["empty_fraction"]) // t["batch_size"] * t["batch_size"]
    return n if t["max_train_batches"] is None else min(n, t["max_train_batches"] * t["batch_size"])


def _oof_pass(model, cfg, fold, rd: RunDir, builder, data, val_idx, device, precision, ctx) -> tuple[dict, float]:
    """Out-of-fold probabilities of the kept weights, with the test-time views the test prediction
    uses (``predict.tta``, ``predict.tta_shift``), to oof.npz; (kept checkpoint, metric)."""
    kept = load_checkpoint(rd.best(fold))  # written by the main process before the epoch's barrier
    model.load_state_dict(kept["model"])
    _, metric_tta, _, order, probs, cls = evaluate(model, builder, data, val_idx, device, cfg, precision,
                                                   get_loss(cfg["train"]["stages"][-1]["loss"]), ctx,
                                                   tta=cfg["predict"]["tta"], shift=cfg["predict"]["tta_shift"])
    if ctx.is_main:
        with atomic_path(rd.oof(fold), suffix=".npz") as tmp, open(tmp, "wb") as fh:
            extra = {} if cls is None else {"cls": cls.astype(np.float32)}
            np.savez(fh, ids=data.ids[order], probs=probs.astype(np.float16), **extra)
    return kept, metric_tta


def _weights_digests(model, ctx: DistContext, fold: int) -> list[str]:
    """Every rank must end with the same weights: their checksums, one per rank."""
    digest = hashlib.sha1(b"".join(v.detach().cpu().float().numpy().tobytes()
                                   for v in model.state_dict().values())).hexdigest()
    digests = all_gather_objects(digest, ctx)
    if len(set(digests)) != 1:
        raise TrainingError(f"fold {fold}: model weights differ across the {ctx.world} processes")
    return digests


def train_fold(cfg: dict, fold: int, run_dir: Path, data, folds: np.ndarray, *, device: torch.device,
               resume: bool = False, workers: int = 0, ctx: DistContext | None = None,
               precision: Precision | None = None, calibrate=None, pseudo: PseudoSet | None = None) -> dict:
    """Train one fold; returns the contents of its done.json. ``cfg`` holds the epochs to run
    (a time plan already applied); ``precision`` defaults to the config's rule (no probe).
    ``calibrate(epochs_done, epoch_seconds)``, called on the main process after each epoch of a
    fresh fold, may return new epochs per stage (the time plan corrected by the measured epochs).
    ``pseudo``: pseudo-labelled test images trained on with the fold's training images."""
    ctx = ctx or DistContext()
    t = cfg["train"]
    if precision is None:
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        precision = hardware.rule_based(t, device, cap)
    rd = RunDir(run_dir)
    fdir, last_path = rd.fold(fold), rd.last(fold)
    if ctx.is_main:
        fdir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(fdir)
    if last_path.exists() and not resume:
        raise UserError(f"{fdir} holds an unfinished run: pass --resume to continue it or --force to restart")
    train_idx, val_idx = fold_rows(cfg, folds, fold, data.masks)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise UserError(f"fold {fold} has {len(train_idx)} train and {len(val_idx)} validation images")
    if t["drop_stripe_masks"] and ctx.is_main:
        n_all = len(folds) - len(val_idx)
        log.info("fold %d: train.drop_stripe_masks: %d of its %d training images left out (every column of the "
                 "mask all salt or all empty); validation keeps them", fold, n_all - len(train_idx), n_all)

    seed = int(t["seed"]) + 1000 * fold
    torch.manual_seed(seed)
    builder = InputBuilder.from_config(cfg)
    low_builder = None
    if t["low_res_size"]:
        low_builder = (builder.cropped(t["low_res_size"], seed) if t["low_res_mode"] == "crop"
                       else builder.at_size(t["low_res_size"]))
    mid_builder = builder.at_size(t["mid_res_size"]) if t["mid_res_size"] else None
    model, fwd_model = _setup_model(cfg, device, precision, ctx)
    state = TrainState(model, make_optimizer(model.parameters(), t),
                       torch.amp.GradScaler(device.type, enabled=precision.needs_scaler), LRController(cfg),
                       ema=EMA(model, t["ema"]) if t["ema"] else None)
    log_rows: list[dict] = []
    if resume and last_path.exists():
        state.load_state_dict(load_checkpoint(last_path))
        log_rows = [r for r in _read_log(rd.log(fold)) if int(r["epoch"]) < state.epoch]
        if ctx.is_main:
            log.info("fold %d: resuming at epoch %d (best %.4f at epoch %d)", fold, state.epoch, state.best_metric,
                     state.best_epoch)
    start_epoch = state.epoch
    loader, sampler, n_batches = _loader(cfg, data, train_idx, seed, device, workers, ctx, pseudo)

    t_fold, epoch_times = time.time(), {B.LOW: [], B.MID: [], B.FULL: []}  # seconds of each phase's epochs
    val_times: list[float] = []  # seconds of each full-size epoch's validation
    phase_builders = {B.LOW: low_builder, B.MID: mid_builder, B.FULL: builder}
    # the phase the fold reached (a resume never goes back to an earlier one either)
    reached = max((p for p, b in phase_builders.items() for r in log_rows
                   if b is not None and str(r.get("input_px")) == str(b.geo.pad_to)), default=B.LOW)
    eta_costs = phase_costs(B.read_plan(run_dir) if ctx.is_main else None, phase_builders)
    tb = TensorBoard(fdir / "tb", t["tensorboard"] and ctx.is_main)
    while state.epoch < C.total_epochs(cfg):
        epoch, n_epochs = state.epoch, C.total_epochs(cfg)
        stage = state.lrc.stage_of(epoch)
        loss_name = t["stages"][stage]["loss"]
        loss_fn = get_loss(loss_name)
        sampler.set_epoch(epoch)  # the epoch travels with each sample's key, into worker processes too
        t0 = time.time()

        def bad_loss(mean, b, lr, epoch=epoch, loss_name=loss_name):
            kept = (f"the last good checkpoint {last_path} (epoch {start_epoch_of(last_path)}) stays"
                    if last_path.exists() else "no checkpoint was written yet")
            raise TrainingError(f"fold {fold}: loss is {mean} at epoch {epoch + 1}, by batch {b + 1} "
                                f"({loss_name}, lr {lr:.2e}); training stopped, {kept}. Lower train.lr "
                                "or check the data")

        progress = ProgressLog(fold, epoch, n_epochs, n_batches, enabled=ctx.is_main, world=ctx.world)
        # never back to an earlier phase once past it (a re-plan that adds epochs moves the switches)
        phase = reached = max(reached, C.phase_of_epoch(cfg, epoch))
        low_res = phase == B.LOW
        train_builder = phase_builders[phase]
        loss_sum, seen, lr = train_one_epoch(fwd_model, model, loader, n_batches, state,
                                             train_builder, loss_fn, t,
                                             device, precision, f"fold {fold} epoch {epoch + 1}/{n_epochs} "
                                             f"{loss_name} {train_builder.geo.pad_to} px",
                                             progress, ctx.is_main, bad_loss)
        train_seconds = time.time() - t0
        if ctx.enabled:  # the logged train loss covers every rank's images
            parts = all_gather_objects((loss_sum, seen), ctx)
            loss_sum, seen = sum(p[0] for p in parts), sum(p[1] for p in parts)
        sync_buffers(model, ctx)
        if state.ema is not None:
            sync_buffers(state.ema.module, ctx)
        # a low-resolution epoch is scored at full size, which it does not train at: only the phase's
        # last one is validated unless train.low_res_validate; a full-size one every train.val_every-th
        # (the time is spent on training instead)
        validated = C.validates_epoch(cfg, epoch, low_res, _last_validated(log_rows, builder.geo.pad_to))
        improved, val_loss, metric, iou, val_s = False, math.nan, math.nan, math.nan, 0.0
        if validated:
            t_val = time.time()
            val_loss, metric, iou, order, val_probs, val_cls = evaluate(state.eval_model, builder, data, val_idx,
                                                                        device, cfg, precision, loss_fn, ctx)
            val_s = time.time() - t_val
            if not low_res:
                val_times.append(val_s)
            improved, state.best_metric, state.since_best = observe(metric, state.best_metric, state.since_best)
            if improved:
                state.best_epoch = epoch
            state.lrc.observe(metric)
        scores = {"val_loss": val_loss, "val_metric": metric, "val_iou": iou}
        log_rows.append({"epoch": epoch, "stage": stage, "loss_name": loss_name, "lr": f"{lr:.3e}",
                         "train_loss": f"{loss_sum / max(seen, 1):.5f}",
                         **{k: f"{v:.5f}" if validated else "" for k, v in scores.items()},
                         "best_metric": f"{state.best_metric:.5f}", "seconds": f"{time.time() - t0:.1f}",
                         "images_per_s": f"{seen / max(train_seconds, 1e-9):.1f}",
                         "input_px": train_builder.geo.pad_to})
        if tb.writer is not None:  # with the masks the metric saw, when it scored this epoch
            seen_masks = (data.images[order], data.masks[order],
                          apply(val_probs, untuned(cfg, val_cls is not None), cls=val_cls)) if validated else ()
            tb.epoch(epoch, log_rows[-1], *seen_masks)
        epoch_s = amortized_epoch_s(time.time() - t0, val_s, val_times, 1 if low_res else t["val_every"])
        if calibrate is not None and start_epoch == 0:
            cfg = _recalibrate(cfg, calibrate(epoch + 1, epoch_s, phase) if ctx.is_main else None, state, ctx)
            t = cfg["train"]
        state.epoch, new_stage = next_epoch(epoch, state.lrc.starts, state.since_best, t["early_stopping"])
        if state.epoch > epoch + 1 and ctx.is_main:
            log.info("fold %d: no gain for %d epochs, ending stage %d early", fold, t["early_stopping"], stage)
        if new_stage:
            state.lrc.new_stage()
            state.since_best = 0
        if ctx.is_main:
            # the log first: last.pt, written last, is what a resume trusts (it drops later log rows)
            _write_log(rd.log(fold), log_rows)
            _checkpoint(state, cfg, fold, rd, device, precision, metric, epoch,
                        keep=improved if t["select"] == "best" else True)
            epoch_times[phase].append(epoch_s)
            phases_left = [max(reached, C.phase_of_epoch(cfg, e)) for e in range(state.epoch, C.total_epochs(cfg))]
            left = time_left(epoch_times, {p: phases_left.count(p) for p in epoch_times}, eta_costs)
            scored = (f"val {val_loss:.4f} metric {metric:.4f} iou {iou:.4f} (best {state.best_metric:.4f})"
                      if validated else f"not validated ({t['low_res_size']} px epoch; train.low_res_validate)"
                      if low_res else f"not validated (train.val_every {t['val_every']})")
            log.info("fold %d epoch %d/%d %s: train %.4f %s %.0fs, %.1f img/s; fold ETA %s", fold, epoch + 1,
                     C.total_epochs(cfg), loss_name, loss_sum / max(seen, 1), scored, time.time() - t0,
                     seen / max(train_seconds, 1e-9), _clock(time.time() + left))
        barrier(ctx)

    tb.close()
    digests = _weights_digests(state.eval_model, ctx, fold)
    kept, metric_tta = _oof_pass(model, cfg, fold, rd, builder, data, val_idx, device, precision, ctx)
    done = {"fold": fold, "best_metric": state.best_metric, "best_epoch": state.best_epoch,
            "oof_metric_tta": metric_tta, "oof_views": C.n_views(cfg["predict"]["tta"], cfg["predict"]["tta_shift"]),
            "select": t["select"], "kept_epoch": int(kept["epoch"]),
            "epochs_run": len(log_rows), "n_train": len(train_idx), "n_val": len(val_idx),
            "seconds": round(time.time() - t_fold, 1), "device": str(device), "world_size": ctx.world,
            "precision": precision.name, "epochs_planned": C.total_epochs(cfg), "weights_sha1_per_rank": digests}
    if pseudo is not None:
        facts = json.loads((run_dir / "run.json").read_text())
        done["pseudo_labels"] = pseudo.fold_facts(facts.get("folds_sha1"), fold)
        if done["pseudo_labels"]["leaks_held_out"] and ctx.is_main:
            log.warning("fold %d: the pseudo-labels come from models that trained on its held-out images; "
                        "its CV is optimistic", fold)
    if ctx.is_main:
        write_json_atomic(rd.done(fold), done)
        last_path.unlink(missing_ok=True)  # only needed to resume an unfinished fold
        log.info("fold %d done: best metric %.4f (epoch %d); kept epoch %d (%s); OOF with TTA %.4f", fold,
                 state.best_metric, state.best_epoch + 1, int(kept["epoch"]) + 1, t["select"], metric_tta)
    barrier(ctx)
    return done


def _recalibrate(cfg: dict, new: list[int] | None, state: TrainState, ctx: DistContext) -> dict:
    """The config with the epochs the calibrated time plan gives (the main process decides)."""
    new = all_gather_objects(new, ctx)[0]
    if new is None or new == [st["epochs"] for st in cfg["train"]["stages"]]:
        return cfg
    cfg = B.apply_plan(cfg, {"epochs": new, "warmup_epochs": cfg["train"]["warmup_epochs"]})
    lr_state = state.lrc.state_dict()
    state.lrc = LRController(cfg)
    state.lrc.load_state_dict(lr_state)
    return cfg


def _checkpoint(state: TrainState, cfg: dict, fold: int, rd: RunDir, device, precision: Precision, metric: float,
                epoch: int, keep: bool) -> None:
    """best.pt (the kept weights, for prediction) when ``keep``; last.pt (to resume) always."""
    if keep:
        save_checkpoint({"model": state.eval_model.state_dict(), "config": cfg, "fold": fold, "epoch": epoch,
                         "metric": metric, "device_type": device.type, "precision": precision.to_dict()},
                        rd.best(fold))
    save_checkpoint({**state.state_dict(), "config": cfg, "fold": fold}, rd.last(fold))


def amortized_epoch_s(seconds: float, val_s: float, val_times: list[float], val_every: int) -> float:
    """What an epoch that took ``seconds`` (``val_s`` of them validating) costs on average when one
    epoch in ``val_every`` is validated: the validation counts at its share, the mean of the last
    three measured (``val_times``), whether or not this epoch ran it: the time plan's rule (see
    budget.Costs), so that a re-plan does not swing with the validated epochs."""
    if val_every <= 1 or not val_times:
        return seconds
    return seconds - val_s + float(np.mean(val_times[-3:])) / val_every


def phase_costs(plan: dict | None, builders: dict) -> dict[int, float]:
    """What an epoch of each resolution phase (budget.LOW, MID, FULL; ``builders[p]`` its InputBuilder,
    or None when the config has no such phase) costs against a full-size one, for the fold ETA: the
    time plan's, from the rates its probe measured, when the run has a ``plan`` with progressive
    resizing; otherwise the input pixels over the full-size ones. Pixels undercount a small epoch: in a
    real 60-min run (native bf16 EPYC, 64 -> 112 px) a 64 px epoch cost 0.40 of a 112 px one (9.5 s
    against 23.7 s), the plan said 0.43, the pixels 0.33; over that run's first 105 epochs (64 px) the fold
    ETA with the pixels read a median 12.5 min late (8.4-20.5), with the plan's costs 0.1 min (-3.3 to
    +6.6 while the plan itself moved)."""
    low_res = (plan or {}).get("low_res")
    full = builders[B.FULL].geo.pad_to
    return {p: B.phase_cost(low_res, p) if low_res else (b.geo.pad_to / full) ** 2
            for p, b in builders.items() if b is not None}


def time_left(epoch_times: dict[int, list[float]], left: dict[int, int], costs: dict[int, float]) -> float:
    """Seconds of ``left[p]`` more epochs of each phase ``p`` (budget.LOW, MID, FULL), from the last
    five epochs of each (``epoch_times[p]``); a phase not seen yet is the latest phase seen scaled by
    ``costs[p]`` (what an epoch of the phase costs against a full-size one: :func:`phase_costs`)."""
    seen = [p for p in sorted(epoch_times) if epoch_times[p]]
    if not seen:
        return 0.0
    mean = {p: float(np.mean(epoch_times[p][-5:])) for p in seen}
    latest = seen[-1]
    return sum(n * (mean[p] if p in mean else mean[latest] / costs[latest] * costs[p])
               for p, n in left.items() if n)


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def start_epoch_of(last_path: Path) -> str:
    try:
        return str(load_checkpoint(last_path)["epoch"])
    except Exception:
        return "?"


class ProgressLog:
    """When no progress bar shows (output is not a terminal): a log line every ``every`` seconds
    within an epoch, with the loss, images/s and the epoch's ETA. Logged by the main process of
    ``world`` data-parallel ones, which train the same number of batches each: images/s counts all
    of them (as the end-of-epoch line does); the loss is the main process's."""

    def __init__(self, fold: int, epoch: int, n_epochs: int, n_batches: int, enabled: bool, every: float = 30.0,
                 world: int = 1):
        self.fold, self.epoch, self.n_epochs, self.n_batches = fold, epoch, n_epochs, n_batches
        self.enabled, self.every, self.world = enabled, every, world
        self.t0 = self.last = time.time()

    def update(self, done: int, loss: float, seen: int) -> None:
        now = time.time()
        if not self.enabled or now - self.last < self.every or done >= self.n_batches:
            return
        self.last = now
        rate = done / (now - self.t0)
        log.info("fold %d epoch %d/%d: batch %d/%d, loss %.4f, %.1f img/s, epoch ETA %s", self.fold,
                 self.epoch + 1, self.n_epochs, done, self.n_batches, loss, seen * self.world / (now - self.t0),
                 _clock(now + (self.n_batches - done) / max(rate, 1e-9)))


def _last_validated(log_rows: list[dict], full_px: int) -> int | None:
    """The last full-size epoch the log shows validated (a resumed fold reads it from log.csv)."""
    return max((int(r["epoch"]) for r in log_rows
                if str(r.get("val_metric", "")) != "" and str(r.get("input_px")) == str(full_px)), default=None)


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_log(path: Path, rows: list[dict]) -> None:
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


# ----------------------------------------------------------------------------- command

def parse_folds(arg_fold, arg_folds, cfg) -> list[int]:
    k = cfg["folds"]["k"]
    if arg_fold is not None:
        folds = [arg_fold]
    elif arg_folds:
        try:
            folds = [int(x) for x in str(arg_folds).split(",") if x.strip() != ""]
        except ValueError:
            raise UserError(f"--folds {arg_folds!r}: expected comma-separated integers like 0,1,2") from None
    elif cfg["folds"]["train_folds"] is not None:
        folds = list(cfg["folds"]["train_folds"])
    else:
        folds = list(range(k))
    bad = [f for f in folds if not 0 <= f < k]
    if bad:
        raise UserError(f"fold {bad[0]} is out of range: this config has folds 0..{k - 1}")
    return folds


# ----------------------------------------------------------------------------- precision and time plan

def precision_path(run_dir: Path) -> Path:
    return Path(run_dir) / "precision.json"


def _device_facts(device: torch.device) -> dict:
    facts = {"device_type": device.type, "cpu": hardware.cpu_name(), "cpu_kind": hardware.cpu_kind(),
             "threads": torch.get_num_threads()}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["capability"] = list(torch.cuda.get_device_capability(device))
    return facts


def read_precision(run_dir: Path) -> dict | None:
    p = precision_path(run_dir)
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except (OSError, json.JSONDecodeError):
        return None


def setup_precision(run_dir: Path, cfg: dict, device: torch.device, data, train_idx: np.ndarray,
                    val_idx: np.ndarray, want_rates: bool, budget_min: float | None = None) -> dict:
    """The run's precision and layout (probed on CPU when the config says auto) and the measured
    rates the time plan needs; reused from ``precision.json`` when it was chosen on this kind of
    device (the same GPU model; a CPU of the same :func:`hardware.cpu_kind`, ISA limit included) with the
    same settings. Under a time budget shorter than an hour each of the probe's
    timings lasts less (:func:`budget.probe_effort`)."""
    t = cfg["train"]
    settings = {k: t[k] for k in ("amp", "amp_dtype", "channels_last", "cpu_malloc")}
    facts = _device_facts(device)
    saved = read_precision(run_dir)
    low, mid = t["low_res_size"], t["mid_res_size"]
    encoder = cfg["model"]["encoder"]  # a plan may train model.larger_encoder instead: probed for itself
    moved = saved and device.type == "cpu" == saved.get("device_type") and saved.get("cpu_kind") != facts["cpu_kind"]
    if moved:  # a run resumed on another kind of CPU: bf16 chosen where native is ~11x slower where emulated
        log.info("precision: %s was chosen on a CPU with %s; this one has %s: probed again", precision_path(run_dir),
                 saved.get("cpu_kind", "an unrecorded kind"), facts["cpu_kind"])
    same = saved and not moved and saved.get("settings") == settings and saved.get("device_type") == device.type \
        and saved.get("encoder", encoder) == encoder \
        and saved.get("gpu") == facts.get("gpu") and (saved.get("train_rate") or not want_rates) \
        and (not want_rates or not low or (saved.get("low_res") or {}).get("size") == low) \
        and (not want_rates or not mid or (saved.get("mid_res") or {}).get("size") == mid)
    if same:
        prec = Precision.from_dict(saved["precision"])
        log.info("precision: %s (chosen before, %s; %s)", prec.name, prec.reason, precision_path(run_dir))
        return saved

    from tgs_salt.models import build_model

    t0 = time.time()
    torch.manual_seed(int(t["seed"]))
    builder = InputBuilder.from_config(cfg)
    geo = builder.geo
    model = build_model(cfg["model"], builder.n_channels).to(device)
    batch = min(t["batch_size"], len(train_idx))
    rows = train_idx[:batch]
    x = builder(torch.from_numpy(data.images[rows]).to(device), torch.from_numpy(data.depths[rows]).to(device))
    y = builder.target(torch.from_numpy(data.masks[rows]).to(device))
    effort = B.probe_effort(budget_min)
    min_s = hardware.TIMING_SECONDS * effort
    timer = hardware.make_step_timer(model, x, y, get_loss(t["stages"][0]["loss"]), geo.crop, device,
                                     min_seconds=min_s)
    cap = facts.get("capability")
    layouts = hardware.safe_layouts(t, model, device)
    prec = hardware.choose(layouts, device, timer, batch, tuple(cap) if cap else None)
    train_rate = prec.rates.get(prec.name)
    if want_rates and train_rate is None:
        train_rate = round(batch / timer(prec.dtype, prec.channels_last, batch), 2)
    out = {**facts, "settings": settings, "encoder": encoder, "precision": prec.to_dict(), "train_rate": train_rate}
    if want_rates:
        vb = min(t["val_batch_size"], 64, len(val_idx))
        vrows = val_idx[:vb]
        xv = builder(torch.from_numpy(data.images[vrows]).to(device),
                     torch.from_numpy(data.depths[vrows]).to(device))
        out["eval_rate"] = round(hardware.time_inference(model, xv, prec, device), 2)
        out["data_s_per_image"] = _augment_cost(cfg, data, train_idx)
        if low:  # progressive resizing: what a step costs at the low (and middle) resolution, in the chosen precision
            sizes = {"low_res": low, **({"mid_res": mid} if mid else {})}
            timers = {}
            for key, size in sizes.items():
                sb = builder.at_size(size)
                xs = sb(torch.from_numpy(data.images[rows]).to(device), torch.from_numpy(data.depths[rows]).to(device))
                ys = sb.target(torch.from_numpy(data.masks[rows]).to(device))
                timers[key] = hardware.make_step_timer(model, xs, ys, get_loss(t["stages"][0]["loss"]), sb.geo.crop,
                                                       device, min_seconds=min_s)
            # the best of 3 alternating timings at each size: a busy neighbour must not make the small
            # input look dearer than the full one (one contended timing said 4x)
            times: dict[str, list[float]] = {key: [] for key in (*timers, "full")}
            for _ in range(3):
                for key, tm in (*timers.items(), ("full", timer)):
                    times[key].append(tm(prec.dtype, prec.channels_last, batch))
            for key, size in sizes.items():
                ratio = min(1.0, min(times[key]) / min(times["full"]))
                out[key] = {"size": size, "step_cost_vs_full": round(ratio, 4), "train_rate": round(train_rate / ratio, 2)}
                log.info("progressive resizing: a training step at %d px costs %.2f of one at %d px (best of 3 each)",
                         size, ratio, geo.pad_to)
    out["probe_seconds"] = round(time.time() - t0, 1)
    write_json_atomic(precision_path(run_dir), out)
    rates = ", ".join(f"{k} {v:g}" for k, v in prec.rates.items()) or "not measured"
    log.info("precision: %s (%s); training img/s: %s; probe took %.0f s", prec.name, prec.reason, rates,
             out["probe_seconds"])
    return out


def _augment_cost(cfg: dict, data, train_idx: np.ndarray, n: int = 32, rounds: int = 3) -> float:
    """Seconds per training image spent on augmentation and batching (the main process's share): the
    best of ``rounds`` passes over ``n`` images, after a few unmeasured ones (one single pass once
    measured 0.0105 s per image where every other job measured 0.0003-0.0007 on the same host, and
    the first plan gave half the epochs the first epoch then showed)."""
    ds = AugmentedArrays(data.images[train_idx], data.masks[train_idx], data.depths[train_idx],
                         build_augment(cfg["augment"]), 0)
    n = min(n, len(ds))
    if n == 0:  # nothing to time (as the single pass gave)
        return 0.0
    for i in range(min(4, len(ds))):
        ds[i]
    best = float("inf")
    for r in range(rounds):
        t0 = time.perf_counter()
        for i in range(n):
            ds[(r * n + i) % len(ds)]
        best = min(best, time.perf_counter() - t0)
    return round(best / n, 6)


def setup_plan(run_dir: Path, cfg: dict, budget_min: float, rates: dict | None, *, n_train: int, n_val: int,
               n_test: int, n_folds: int, n_models: int, world: int, job_start: float,
               will_calibrate: bool = True, probe=None, plan: dict | None = None) -> dict:
    """The run's time plan: ``plan`` (the run's ``plan.json``, read by the caller) when there is one,
    else made from the measured rates and written. ``probe(cfg)``: the rates of another model config
    (:func:`setup_precision`); when the plan gives ``model.encoder`` enough epochs for
    ``model.larger_encoder`` (:func:`budget.larger_encoder`), that one is probed and the plan made again
    for it."""
    if plan is not None:
        B.check_same_budget(plan, budget_min, run_dir)
        log.info("following the time plan in %s: epochs per stage %s", B.plan_path(run_dir), plan["epochs"])
        return plan

    def make(cfg: dict, rates: dict) -> dict:
        return _make_plan(cfg, budget_min, rates, n_train=n_train, n_val=n_val, n_test=n_test, n_folds=n_folds,
                          n_models=n_models, world=world, job_start=job_start, will_calibrate=will_calibrate)

    plan = make(cfg, rates)
    switch = B.larger_encoder(cfg, plan) if probe is not None else None
    if switch:
        big = B.planned(cfg, {"encoder": switch["to"]})
        log.info("model.larger_encoder: the plan gives %s %d epochs per fold, at least "
                 "model.larger_encoder_min_epochs %d: %s is probed and trained instead (decoder %s, lr %g)",
                 switch["from"], switch["epochs_from"], switch["min_epochs"], switch["to"],
                 big["model"]["decoder_channels"], big["train"]["lr"])
        plan = {**make(big, probe(big)), "encoder": switch["to"], "encoder_switch": switch}
    B.write_plan(run_dir, plan)
    log.info(B.describe(plan))
    return plan


def _make_plan(cfg: dict, budget_min: float, rates: dict, *, n_train: int, n_val: int, n_test: int, n_folds: int,
               n_models: int, world: int, job_start: float, will_calibrate: bool) -> dict:
    """A time plan for ``cfg`` from the measured ``rates`` (see :func:`setup_plan`)."""
    scale = world * 0.9 if world > 1 else 1.0  # data-parallel ranks share each epoch
    costs = B.Costs(train_rate=rates["train_rate"] * scale, eval_rate=rates["eval_rate"] * scale,
                    n_train=n_train, n_val=n_val, n_test=n_test, n_folds=n_folds, n_models=n_models,
                    tta=bool(cfg["predict"]["tta"]), tta_shift=cfg["predict"]["tta_shift"],
                    data_s_per_image=rates.get("data_s_per_image", 0.0) / scale,
                    low_res_rate=rates["low_res"]["train_rate"] * scale if rates.get("low_res") else None,
                    low_res_share=cfg["train"]["low_res_fraction"] if cfg["train"]["low_res_size"] else 0.0,
                    low_res_validates=cfg["train"]["low_res_validate"], val_every=cfg["train"]["val_every"],
                    mid_res_rate=rates["mid_res"]["train_rate"] * scale if rates.get("mid_res") else None,
                    mid_res_share=cfg["train"]["mid_res_fraction"] if cfg["train"]["mid_res_size"] else 0.0)
    costs, views = B.choose_views(costs, budget_min * 60, cfg["predict"]["tta_shift_max_share"])
    elapsed = time.time() - job_start
    plan = B.plan_epochs(budget_min * 60, elapsed, costs, [s["epochs"] for s in cfg["train"]["stages"]])
    plan.update({**views, "budget_minutes": budget_min, "job_start": job_start, "n_folds": n_folds,
                 "config_epochs": [s["epochs"] for s in cfg["train"]["stages"]], "costs": B.to_dict(costs),
                 "warmup_epochs": B.planned_warmup(cfg), "precision": Precision.from_dict(rates["precision"]).name,
                 # folds trained in parallel processes keep the probe's plan: they could not agree on a change
                 "calibrated": False if will_calibrate else None})
    return plan


def _calibrator(run_dir: Path, folds_after: int):
    """The callback that keeps a time plan made by this job on time, for a fold followed by
    ``folds_after`` more: the job's first epoch replaces the probe's estimate; after each later
    epoch the plan is re-made when it drifted off by more than 0.6 of an epoch (the host slowed down
    or sped up), at the median time of the last three epochs (the plan's own estimate standing in for
    the epochs not yet run since calibration): one epoch slowed by something passing on the host
    changes the plan only by the time it lost; two in three move the time per epoch."""
    recent: list[float] = []

    def calibrate(done: int, epoch_s: float, phase: int = B.FULL) -> list[int] | None:
        """``phase``: the resolution phase the epoch trained in (B.LOW, MID or FULL; train_fold never
        goes back to an earlier one)."""
        plan = B.read_plan(run_dir)
        if plan is None:
            return None
        weight = B.phase_cost(plan.get("low_res"), phase)
        if plan.get("calibrated") is False:
            new, why = B.calibrate(plan, epoch_s, time.time()), "calibrated on the first epoch"
        else:  # in full-resolution epochs: progressive resizing's first epochs cost less
            recent.append(epoch_s / weight)
            window = [float(plan["epoch_s"])] * max(0, 3 - len(recent)) + recent[-3:]
            per_epoch = float(np.median(window))
            new = B.replan(plan, done, per_epoch, time.time(), folds_after, reached=phase)
            why = f"re-planned after epoch {done} ({per_epoch:.0f} s per epoch, the median of the last 3)"
        if new is None:
            return None
        B.write_plan(run_dir, new)
        log.info("time plan %s (%.0f s measured, %.0f s planned): epochs per stage %s -> %s; the job should end "
                 "at %s (%.1f min)", why, epoch_s, plan["epoch_s"], plan["epochs"], new["epochs"],
                 time.strftime("%H:%M", time.localtime(new["job_start"] + new["total_s"])), new["total_s"] / 60)
        return new["epochs"]
    return calibrate


def _follower(run_dir: Path, folds_after: int):
    """A rank other than the main one: the plan is the main process's to change."""
    return lambda done, epoch_s, phase=B.FULL: None


def job_start_time() -> float:
    """When the job started: ``TGS_JOB_START`` (set by run_all.sh after set-up), else now."""
    v = os.environ.get("TGS_JOB_START")
    try:
        return float(v) if v else time.time()
    except ValueError:
        raise UserError(f"TGS_JOB_START={v!r}: expected seconds since the epoch (date +%s)") from None


def count_test_images(data_dir: Path) -> int:
    d = Path(data_dir) / "test" / "images"
    return sum(1 for _ in d.glob("*.png")) if d.is_dir() else 0


def _recorded_pseudo(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("pseudo_labels_sha1")
    except (OSError, ValueError):
        return None


def _pseudo_labels(cfg: dict, data_dir: Path, run_dir: Path, load: bool) -> PseudoSet | None:
    """The pseudo-labelled images of ``train.pseudo_labels`` (when ``load``: a fold is to be trained)."""
    source = cfg["train"]["pseudo_labels"]
    if source is None:
        return None
    from tgs_salt.data import load_test

    source = Path(source).expanduser()
    if source.resolve() == run_dir.resolve():
        raise UserError(f"train.pseudo_labels = {str(source)!r} is the run directory being trained: its test "
                        "predictions would be replaced by this run's; train into another --run-dir")
    return load_pseudo(source, load_test(data_dir), cfg["train"]["pseudo_confidence"]) if load else None


def train_command(args) -> int:
    from tgs_salt.data import load_train
    from tgs_salt.data.folds import folds_for
    from tgs_salt.report import expected_folds

    job_start = job_start_time()
    cfg = C.load_config(args.config, args.set)
    budget_min = args.time_budget if args.time_budget is not None else cfg["train"]["time_budget_minutes"]
    if budget_min is not None and not budget_min > 0:
        raise UserError(f"--time-budget {budget_min}: a positive number of minutes")
    parallel = max(1, args.parallel_folds or 1)
    device = resolve_device(args.device)
    ctx = init_distributed(device.type)
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        elif ctx.enabled and device.type == "cpu":
            torch.set_num_threads(max(1, hardware.usable_cores() // ctx.world))
        if hardware.apply_cpu_malloc(cfg["train"], device):
            log.info("malloc: freed memory kept for the next step (train.cpu_malloc keep: no trimming, no mmap)")
        data_dir = Path(args.data_dir) if args.data_dir else paths.data_dir()
        run_dir = Path(args.run_dir) if args.run_dir else paths.runs_dir() / cfg["name"]
        folds_to_train = parse_folds(args.fold, args.folds, cfg)
        data = load_train(data_dir)
        fold_file = resolve_fold_file(cfg, data_dir, ctx.is_main)
        barrier(ctx)
        folds = folds_for(data.ids, fold_file)
        pending = [f for f in folds_to_train if args.force or not RunDir(run_dir).is_done(f)]
        # pseudo-labels are read only when a fold is to be trained (the source may be gone since)
        pseudo = _pseudo_labels(cfg, data_dir, run_dir, load=bool(pending))
        if ctx.is_main:
            prepare_run_dir(run_dir, cfg, fold_file, data_dir, args.force,
                            pseudo.facts["test_probs_sha1"] if pseudo is not None else _recorded_pseudo(run_dir))
        barrier(ctx)

        # precision (probed once per run on CPU) and the time plan, made by the main process
        precision, calibrate = None, None
        if pending or args.plan_only:
            first = pending[0] if pending else folds_to_train[0]
            tr, va = fold_rows(cfg, folds, first, data.masks)
            plan = B.read_plan(run_dir) if budget_min is not None else None
            need_plan = budget_min is not None and plan is None

            def probe(c: dict, want_rates: bool = True) -> dict:
                return setup_precision(run_dir, c, device, data, tr, va, want_rates=want_rates, budget_min=budget_min)

            if ctx.is_main:  # the model the plan trains (model.larger_encoder maybe)
                info = probe(B.planned(cfg, plan), want_rates=need_plan)
            barrier(ctx)
            if budget_min is not None:
                if ctx.is_main:
                    masks = data.masks[tr] if pseudo is None else np.concatenate([data.masks[tr], pseudo.masks])
                    plan = setup_plan(run_dir, cfg, budget_min, info, n_train=images_per_epoch(cfg, masks),
                                      n_val=len(va),
                                      n_test=count_test_images(data_dir),
                                      n_folds=-(-max(len(pending), 1) // parallel),
                                      n_models=len(expected_folds(cfg)), world=ctx.world, job_start=job_start,
                                      will_calibrate=not args.plan_only and parallel == 1, probe=probe,
                                      plan=plan)
                    if plan.get("calibrated") is False:  # a fresh plan, made by this job: kept on time
                        calibrate = _calibrator
                barrier(ctx)
                if ctx.enabled and all_gather_objects(calibrate is not None, ctx)[0] and not ctx.is_main:
                    calibrate = _follower  # every rank joins the main process's broadcast of a new plan
            # every rank, from the file the main process wrote: the precision probed for the model the plan
            # trains (with model.larger_encoder, probed again by setup_plan)
            precision = Precision.from_dict(read_precision(run_dir)["precision"])
        if args.plan_only:
            if ctx.is_main:
                print(run_dir)
            return 0

        workers = args.workers if args.workers is not None else (
            min(6, max(hardware.usable_cores() // ctx.world - 1, 0)) if device.type == "cuda" else 0)
        for fold in folds_to_train:
            fdir = RunDir(run_dir).fold(fold)
            if fold not in pending:
                if ctx.is_main:
                    log.info("fold %d is complete in %s: skipped (--force retrains)", fold, fdir)
                continue
            # one trainer per fold: a second process (or a second --resume) is refused, naming the first
            lock = exclusive_lock(fdir / ".lock", f"fold {fold} of {run_dir}") if ctx.is_main \
                else contextlib.nullcontext()
            with lock:
                if args.force and ctx.is_main:
                    rd = RunDir(run_dir)
                    for f in (rd.done(fold), rd.last(fold), rd.best(fold), rd.log(fold), rd.oof(fold)):
                        f.unlink(missing_ok=True)
                barrier(ctx)
                # the plan as it stands (calibrated by an earlier fold, maybe)
                train_cfg = B.apply_plan(cfg, B.read_plan(run_dir)) if budget_min is not None else cfg
                folds_after = len(pending) - pending.index(fold) - 1  # trained after this one, in this job
                train_fold(train_cfg, fold, run_dir, data, folds, device=device, resume=args.resume,
                           workers=workers, ctx=ctx, precision=precision,
                           calibrate=calibrate(run_dir, folds_after) if calibrate is not None else None,
                           pseudo=pseudo)
        mark_finished(ctx)
    finally:
        shutdown(ctx)
    if ctx.is_main:
        print(run_dir)
    return 0
