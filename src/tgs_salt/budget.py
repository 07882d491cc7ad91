"""Time budgets: how many epochs fit, so that the whole job ends on time.

From the measured training and inference throughput, the plan splits what is left of the budget
(after what the job already spent, and the fixed costs that follow training: the OOF pass of every
fold, the CV report and the test prediction) into epochs, and scales the config's loss stages to
that total keeping their proportions (each stage keeps its schedule shape: warm-up, cosine...).

The plan is written to ``<run dir>/plan.json`` before the first epoch; resume and fold retraining
follow it, so the same seed and plan give the same weights.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tgs_salt.config import low_res_count, n_views
from tgs_salt.errors import UserError
from tgs_salt.io_utils import write_json_atomic

log = logging.getLogger(__name__)

# Seconds outside the model's own steps, measured on the real cpu_budget run (2 CPU cores):
STAGE_OVERHEAD_S = 15.0   # CV and predict: two Python start-ups, data and checkpoint loads, plots, CSV
#                           (real runs, 2 AVX2 cores: ~20 s for ResNet18 on 3001 images, ~10 s for the demo)
FOLD_OVERHEAD_S = 3.0     # per fold: model build, checkpoint and OOF writes
EPOCH_OVERHEAD_S = 1.0    # per epoch: checkpoints, log, metric
SAFETY = 0.015            # aim this fraction below the budget: the plan rests on a short measurement
FULL_PROBE_MIN = 60.0     # budgets of this many minutes or more get the precision probe's full timings


@dataclass
class Costs:
    """What one fold's epoch and the fixed steps cost, from measured rates (images/s)."""

    train_rate: float       # training images/s (the whole job's processes together)
    eval_rate: float        # inference images/s without TTA
    n_train: int            # training images per epoch (after max_train_batches)
    n_val: int              # validation images per fold
    n_test: int
    n_folds: int            # folds this job still trains
    n_models: int           # folds in the final ensemble (prediction)
    tta: bool
    data_s_per_image: float = 0.0  # augmentation and batching, per training image
    low_res_rate: float | None = None  # training images/s at train.low_res_size (progressive resizing)
    low_res_share: float = 0.0         # the share of the epochs trained at that size
    low_res_validates: bool = True     # whether those epochs are validated (train.low_res_validate)
    mid_res_rate: float | None = None  # training images/s at train.mid_res_size (a middle phase after the low one)
    mid_res_share: float = 0.0         # the share of the epochs trained at that size
    val_every: int = 1                 # a full-resolution epoch is validated every n-th (train.val_every)
    tta_shift: int = 0                 # predict.tta_shift: > 0 triples the test-time views

    def _epoch_s(self, rate: float, validate: float = 1.0) -> float:
        """An epoch at ``rate`` training images/s, with the share ``validate`` of a validation."""
        return (self.n_train / rate + self.n_train * self.data_s_per_image
                + validate * self.n_val / self.eval_rate + EPOCH_OVERHEAD_S)

    @property
    def epoch_s(self) -> float:
        """A full-resolution epoch, with its share of validation (all of one unless train.val_every)."""
        return self._epoch_s(self.train_rate, 1.0 / max(self.val_every, 1))

    @property
    def low_res(self) -> dict | None:
        """Progressive resizing as the plan sees it: the share of low-resolution epochs and what one
        costs relative to a full-resolution epoch (None without it); with a middle phase, its share
        and relative cost too (``mid_share``, ``mid_relative_cost``: validated like a full-size epoch)."""
        mid_phase = bool(self.mid_res_rate and self.mid_res_share)
        if not self.low_res_rate or not (self.low_res_share or mid_phase):  # a middle phase alone counts too
            return None
        low = self._epoch_s(self.low_res_rate, float(self.low_res_validates))
        out = {"share": self.low_res_share, "relative_cost": round(low / self.epoch_s, 4)}
        if mid_phase:
            mid = self._epoch_s(self.mid_res_rate, 1.0 / max(self.val_every, 1))
            out.update({"mid_share": self.mid_res_share, "mid_relative_cost": round(mid / self.epoch_s, 4)})
        return out

    @property
    def fixed_s(self) -> float:
        views = n_views(self.tta, self.tta_shift)
        oof = self.n_folds * (self.n_val * views / self.eval_rate + FOLD_OVERHEAD_S)
        predict = self.n_test * views * self.n_models / self.eval_rate
        return oof + predict + STAGE_OVERHEAD_S

    @property
    def shift_views_s(self) -> float:
        """What the shift views (``tta_shift``) add to :attr:`fixed_s`: 3x the views in the OOF passes and
        the test prediction."""
        return self.fixed_s - replace(self, tta_shift=0).fixed_s if self.tta_shift else 0.0


def choose_views(costs: Costs, budget_s: float, max_share: float | None) -> tuple[Costs, dict]:
    """The test-time views a budgeted run uses: the config's, unless its shift views
    (``predict.tta_shift``) would take more than ``max_share`` of the budget (``predict.tta_shift_max_share``;
    None: always kept), in which case flip TTA alone. They are worth +0.0024 on average (bench/tta_views.py:
    five real AVX2 hours, 1000 test images); on the slowest AVX2 host, where an epoch more is worth ~0.002,
    that is ~1.3 epochs, ~4 % of an hour. With the competition's 18,000 test images they would take ~20 min
    of such an hour (the plan: 21 epochs instead of 36). Returns the costs the plan counts and what goes into
    the plan (``tta_shift``, and ``tta_shift_dropped`` when they were dropped)."""
    extra = costs.shift_views_s
    if not extra or max_share is None or extra <= max_share * budget_s:
        return costs, {"tta_shift": costs.tta_shift}
    return replace(costs, tta_shift=0), {
        "tta_shift": 0, "tta_shift_dropped": {"config": costs.tta_shift, "seconds": round(extra, 1),
                                              "share": round(extra / budget_s, 4), "max_share": max_share}}


def planned_views(cfg: dict, plan: dict | None) -> dict:
    """``cfg`` with the test-time shift the run's time plan chose (see :func:`choose_views`): the OOF
    passes and the test prediction of a run use the same views. A copy when it changes anything."""
    if not plan or "tta_shift" not in plan or int(plan["tta_shift"]) == cfg["predict"]["tta_shift"]:
        return cfg
    out = copy.deepcopy(cfg)
    out["predict"]["tta_shift"] = int(plan["tta_shift"])
    return out


def larger_encoder(cfg: dict, plan: dict) -> dict | None:
    """The switch to ``model.larger_encoder`` a fresh time ``plan`` made for ``model.encoder`` calls for,
    or None. Past ~120 epochs the recipe's ResNet18 only fits its 2400 images closer (a native-bf16
    host's hour: 193-208 epochs, validation metric flat from epoch ~118 at ~0.80); ResNet34 spends the
    same hour better there (126-131 epochs: +0.0126, +0.0067, +0.0050 paired at threshold 0.5 at three
    seeds, pooled +0.0081, not resolved from noise; below 150 ResNet18 epochs nothing was measured to gain,
    at 47 it lost: docs/results.md; ``cpu_budget`` now trains resnet10t with its stem at half width, whose
    300 epochs with the narrow decoder cost about what 150 ResNet18 ones did). So a plan that gives the
    configured encoder at least ``model.larger_encoder_min_epochs`` epochs per fold trains the larger one:
    the run probes it and plans again (train.setup_plan). What goes into the plan as ``encoder_switch``.
    Never for the plain baselines (no encoder) or a local ``model.encoder_weights`` file (it fits the
    configured encoder only)."""
    from tgs_salt.models import SMP_ARCHS, local_weights

    m = cfg["model"]
    big, least = m.get("larger_encoder"), m.get("larger_encoder_min_epochs")
    per_fold = sum(plan["epochs"])
    if not big or big == m["encoder"] or per_fold < least or m["arch"] not in SMP_ARCHS \
            or local_weights(m["encoder_weights"]):
        return None
    return {"from": m["encoder"], "to": big, "epochs_from": per_fold, "min_epochs": least}


def planned(cfg: dict, plan: dict | None) -> dict:
    """``cfg`` as the run's time plan trains and predicts it: the encoder it chose (``model.larger_encoder``,
    see :func:`larger_encoder`) and its test-time views (:func:`planned_views`). A copy when it changes
    anything. ``model.stem_width`` belongs to the configured encoder: the larger one is built without it,
    with ``model.larger_encoder_decoder_channels`` when those are set and one per encoder stage (else,
    with a log line, with ``model.decoder_channels``), and trained at ``model.larger_encoder_lr`` when
    set (``train.lr``, which a stage's own ``lr`` still overrides)."""
    enc = (plan or {}).get("encoder")
    if enc and enc != cfg["model"]["encoder"]:
        cfg = copy.deepcopy(cfg)
        m = cfg["model"]
        m["encoder"] = enc
        m["stem_width"] = None
        if m.get("larger_encoder_lr") is not None:
            cfg["train"]["lr"] = m["larger_encoder_lr"]
        widths = m.get("larger_encoder_decoder_channels")
        if widths is not None and len(widths) == len(m["decoder_channels"]):
            m["decoder_channels"] = list(widths)
        elif widths is not None:
            log.info("model.larger_encoder_decoder_channels %s: not one per encoder stage (model.encoder_depth %s); "
                     "%s is built with model.decoder_channels %s", widths, m["encoder_depth"], enc,
                     m["decoder_channels"])
    return planned_views(cfg, plan)


def probe_effort(budget_min: float | None) -> float:
    """The share of its full length each of the precision probe's timings takes under a time budget of
    ``budget_min`` minutes: all of it for an hour or more (or no budget), in proportion below. A timing
    runs its steps until 1.5 s x the effort have passed (at least 2 steps, at most 5), so only a small
    model's quick steps are timed fewer times: under a 1-min budget the tests' tiny U-Net probes for 14 s
    instead of 26 s in full (2-core AVX2 host). The probe's extra rounds (each candidate timed again,
    keeping its best) are kept whatever the budget: without them a 1-min budget picked the slower layout
    for ``cpu_budget`` in 2 of 3 probes on a slow AVX2 host (``bench/bench_probe_effort.py``)."""
    if budget_min is None:
        return 1.0
    return max(0.0, min(1.0, budget_min / FULL_PROBE_MIN))


def split_epochs(total: int, stage_epochs: list[int]) -> list[int]:
    """``total`` epochs over the stages in proportion to ``stage_epochs`` (largest remainder,
    at least one epoch per stage)."""
    n = len(stage_epochs)
    total = max(total, n)
    weight = sum(stage_epochs)
    exact = [total * e / weight for e in stage_epochs]
    out = [max(1, math.floor(x)) for x in exact]
    order = sorted(range(n), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    k = 0
    while sum(out) < total:
        out[order[k % n]] += 1
        k += 1
    while sum(out) > total:  # only when the floor of 1 overshot
        i = max(range(n), key=lambda j: out[j])
        out[i] -= 1
    return out


LOW, MID, FULL = 0, 1, 2  # the resolution phases of a fold, in the order it trains them


def planned_phase(low_res: dict | None, epoch: int, total: int) -> int:
    """The phase a plan of ``total`` epochs puts epoch ``epoch`` (0-based) in: progressive resizing
    trains the first round(share x total) at the low resolution, then round(mid_share x total) at
    the middle one (train.mid_res_size), the rest at full resolution (the rule of config.low_res_epochs
    and config.mid_res_epochs)."""
    if not low_res:
        return FULL
    n_low = low_res_count(low_res["share"], total)
    if epoch < n_low:
        return LOW
    return MID if epoch < n_low + low_res_count(low_res.get("mid_share", 0.0), total) else FULL


def phase_cost(low_res: dict | None, phase: int) -> float:
    """What an epoch of ``phase`` costs in full-resolution epochs."""
    if low_res and phase == LOW:
        return float(low_res["relative_cost"])
    if low_res and phase == MID and "mid_relative_cost" in low_res:
        return float(low_res["mid_relative_cost"])
    return 1.0


def epoch_weight(low_res: dict | None, epoch: int, total: int, reached: int = LOW) -> float:
    """What epoch ``epoch`` (0-based) of ``total`` costs in full-resolution epochs, for a fold that
    already ``reached`` a phase: train_fold never goes back to an earlier one (a re-plan that adds
    epochs moves the switches later, not the fold back)."""
    return phase_cost(low_res, max(reached, planned_phase(low_res, epoch, total)))


def fold_units(low_res: dict | None, total: int) -> float:
    """What a fold of ``total`` epochs costs in full-resolution epochs."""
    return sum(epoch_weight(low_res, e, total) for e in range(total))


def units_left(low_res: dict | None, total: int, done: int = 0, reached: int = LOW, folds_after: int = 0) -> float:
    """What the rest of a plan of ``total`` epochs per fold costs in full-resolution epochs: epochs
    ``done``..total-1 of this fold (none in a phase before the one it ``reached``, see train_fold) and
    every epoch of the ``folds_after`` folds after it."""
    here = sum(epoch_weight(low_res, e, total, reached) for e in range(done, total))
    return here + folds_after * fold_units(low_res, total)


def fit_epochs(low_res: dict | None, units: float, done: int = 0, reached: int = LOW, folds_after: int = 0,
               minimum: int = 1) -> int:
    """The number of epochs per fold whose :func:`units_left` is nearest ``units``."""
    if not low_res:
        return max(minimum, math.floor((units + done) / (1 + folds_after) + 0.5))
    lo = max(minimum, done)
    cheapest = min(phase_cost(low_res, p) for p in (LOW, MID, FULL))
    hi = lo + int(units / cheapest) + 2  # every epoch costs at least the cheapest phase

    def miss(total: int) -> tuple[float, int]:
        return abs(units_left(low_res, total, done, reached, folds_after) - units), total

    return min(range(lo, hi + 1), key=miss)


def plan_epochs(budget_s: float, elapsed_s: float, costs: Costs, stage_epochs: list[int]) -> dict:
    """The plan: epochs per stage and the time it should take. ``epoch_s`` in the plan is a
    full-resolution epoch; with progressive resizing (``low_res``) the first epochs cost less."""
    left = budget_s * (1 - SAFETY) - elapsed_s - costs.fixed_s
    low_res = costs.low_res
    n_folds = max(costs.n_folds, 1)
    per_epoch_all_folds = costs.epoch_s * n_folds
    # the nearest whole number of epochs: the job ends within half an epoch of the target, on
    # either side (rounding down could waste up to an epoch: 13% of a 6-minute demo)
    total = fit_epochs(low_res, left / costs.epoch_s, folds_after=n_folds - 1, minimum=0) if left > 0 else 0
    minimum = len(stage_epochs)
    if total < minimum:
        need = elapsed_s + costs.fixed_s + minimum * per_epoch_all_folds
        raise UserError(f"a time budget of {budget_s / 60:.1f} min is too small: {costs.n_folds} fold(s) with at "
                        f"least one epoch per loss stage need about {need / 60 / (1 - SAFETY):.1f} min here "
                        f"({costs.epoch_s:.0f} s per epoch, {costs.fixed_s:.0f} s for OOF, CV and prediction, "
                        f"{elapsed_s:.0f} s already spent); raise --time-budget or train fewer folds")
    epochs = split_epochs(total, stage_epochs)
    train_s = fold_units(low_res, sum(epochs)) * per_epoch_all_folds
    return {"epochs": epochs, "epoch_s": round(costs.epoch_s, 2), "fixed_s": round(costs.fixed_s, 1),
            "elapsed_s": round(elapsed_s, 1), "train_s": round(train_s, 1),
            "total_s": round(elapsed_s + train_s + costs.fixed_s, 1), "low_res": low_res}


def planned_warmup(cfg: dict) -> float:
    """The warm-up of a budgeted run: at least the whole first epoch. The first epoch's learning
    rates then depend on nothing the calibration after it may change (see :func:`calibrate`)."""
    return max(1.0, float(cfg["train"]["warmup_epochs"]))


def apply_plan(cfg: dict, plan: dict) -> dict:
    """A copy of ``cfg`` with the plan's epochs per stage, warm-up, encoder and test-time views."""
    out = copy.deepcopy(cfg)
    stages = out["train"]["stages"]
    epochs = plan["epochs"]
    if len(epochs) != len(stages):
        raise UserError(f"the plan has {len(epochs)} stage(s) but the config {len(stages)}")
    for st, e in zip(stages, epochs):
        st["epochs"] = int(e)
    out["train"]["warmup_epochs"] = float(plan.get("warmup_epochs", out["train"]["warmup_epochs"]))
    return planned(out, plan)


def calibrate(plan: dict, first_epoch_s: float, now: float) -> dict:
    """The plan after the first epoch of the job: epochs re-planned from that epoch's measured time
    (validation included) instead of the probe's estimate. Returns a new plan dict."""
    c = plan["costs"]
    n_folds = max(int(c["n_folds"]), 1)
    stage_epochs = plan["config_epochs"]
    budget_s = plan["budget_minutes"] * 60
    left = budget_s * (1 - SAFETY) - (now - plan["job_start"]) - plan["fixed_s"]
    low_res = plan.get("low_res")
    w0 = epoch_weight(low_res, 0, sum(plan["epochs"]))
    unit = first_epoch_s / w0  # a full-resolution epoch, from a first epoch that may have been a cheaper one
    # E epochs per fold: E - 1 still to run in this fold, E in each of the other folds
    if low_res:
        total = fit_epochs(low_res, left / unit, done=1, folds_after=n_folds - 1, minimum=len(stage_epochs))
    else:
        total = max(math.floor((left + first_epoch_s) / (n_folds * first_epoch_s) + 0.5), len(stage_epochs))
    epochs = split_epochs(total, stage_epochs)
    out = dict(plan)
    train_s = (fold_units(low_res, sum(epochs)) * n_folds - w0) * unit
    out.update({"epochs": epochs, "provisional_epochs": plan["epochs"], "provisional_epoch_s": plan["epoch_s"],
                "epoch_s": round(unit, 2), "calibrated": True,
                "total_s": round(now - plan["job_start"] + train_s + plan["fixed_s"], 1)})
    return out


def split_open(total: int, current: list[int], done: int, config_epochs: list[int]) -> list[int]:
    """``total`` epochs per stage for a fold that has run ``done`` epochs of the plan ``current``:
    the stages it finished keep their epochs, the stage it is in keeps at least the epochs it ran
    (a cosine stage is shortened or lengthened, never reopened), and what is left goes to the
    stage in progress and the later ones in the config's proportions (at least one epoch each)."""
    starts = [sum(current[:i]) for i in range(len(current))]
    i = max(j for j, s in enumerate(starts) if s <= done)
    fixed, ran = current[:i], done - starts[i]
    n_open = len(current) - i
    rest = max(total - sum(fixed), max(ran, 1) + n_open - 1)
    open_ = split_epochs(rest, config_epochs[i:])
    if open_[0] < max(ran, 1):
        open_[0] = max(ran, 1)
        if n_open > 1:
            open_[1:] = split_epochs(rest - open_[0], config_epochs[i + 1:])
    return fixed + open_


def replan(plan: dict, done: int, epoch_s: float, now: float, folds_after: int = 0,
           reached: int | None = None) -> dict | None:
    """The plan re-made during a fold, after its epoch ``done`` (1-based), from the measured time
    per (full-resolution) epoch: when the host slows down or speeds up, the epochs still to run (in
    this fold and the ``folds_after`` folds after it) change so that the job ends on time. None when
    the current plan still ends within 0.6 of an epoch of the target (no change for noise).
    ``reached``: the phase (LOW, MID, FULL) of the fold's epoch ``done`` (by default, the one the plan
    puts it in)."""
    current = list(plan["epochs"])
    target = plan["job_start"] + plan["budget_minutes"] * 60 * (1 - SAFETY) - plan["fixed_s"]  # training's end
    total_now = sum(current)
    low_res = plan.get("low_res")

    # the fold never goes back to an earlier phase (see train_fold)
    if reached is None:
        reached = planned_phase(low_res, done - 1, total_now) if done > 0 else LOW

    def left_units(total: int) -> float:
        return units_left(low_res, total, done, reached, folds_after)

    predicted = now + left_units(total_now) * epoch_s
    if abs(predicted - target) <= 0.6 * epoch_s:
        return None
    total = fit_epochs(low_res, (target - now) / epoch_s, done=done, reached=reached, folds_after=folds_after)
    epochs = split_open(total, current, done, plan["config_epochs"])
    if epochs == current:
        return None
    out = dict(plan)
    train_left = left_units(sum(epochs)) * epoch_s
    out.update({"epochs": epochs, "epoch_s": round(epoch_s, 2),
                "total_s": round(now - plan["job_start"] + train_left + plan["fixed_s"], 1),
                "replans": [*plan.get("replans", []), {"after_epoch": done, "epoch_s": round(epoch_s, 2),
                                                        "from": current, "to": epochs}]})
    return out


# ----------------------------------------------------------------------------- plan file

def plan_path(run_dir: Path) -> Path:
    return Path(run_dir) / "plan.json"


def read_plan(run_dir: Path) -> dict | None:
    p = plan_path(run_dir)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the time plan {p}: {exc}; delete it to plan again") from None


def check_same_budget(plan: dict, budget_min: float, run_dir: Path) -> None:
    if abs(plan["budget_minutes"] - budget_min) > 1e-9:
        raise UserError(f"{run_dir} was planned for a {plan['budget_minutes']:g} min budget, not {budget_min:g}: "
                        f"its folds follow {plan_path(run_dir).name} (epochs {plan['epochs']}). Use another "
                        f"--run-dir, or delete {plan_path(run_dir)} and retrain every fold with --force")


def write_plan(run_dir: Path, plan: dict) -> None:
    write_json_atomic(plan_path(run_dir), plan)


def describe(plan: dict) -> str:
    eta = time.strftime("%H:%M", time.localtime(plan["job_start"] + plan["total_s"]))
    low = plan.get("low_res")
    total = sum(plan["epochs"])
    low_text = (f", the first {low_res_count(low['share'], total)} at low resolution "
                f"({low['relative_cost']:.2f} of the cost)" if low else "")
    if low and "mid_relative_cost" in low:
        low_text += (f", the next {low_res_count(low['mid_share'], total)} at the middle one "
                     f"({low['mid_relative_cost']:.2f})")
    sw = plan.get("encoder_switch")
    model = (f"model.encoder {sw['to']} (model.larger_encoder: the plan gave {sw['from']} {sw['epochs_from']} epochs "
             f"per fold, at least {sw['min_epochs']}), " if sw else "")
    dropped = plan.get("tta_shift_dropped")
    views = (f" (predict.tta_shift {dropped['config']} dropped: its views would take {dropped['seconds']:.0f} s, "
             f"{dropped['share']:.0%} of the budget, over predict.tta_shift_max_share {dropped['max_share']:g}; "
             f"flip TTA only)" if dropped else "")
    return (f"time plan: {plan['budget_minutes']:g} min budget, {model}{plan['n_folds']} fold(s) x {sum(plan['epochs'])} "
            f"epochs (stages {'+'.join(map(str, plan['epochs']))}{low_text}), {plan['epoch_s']:.0f} s per epoch, "
            f"{plan['fixed_s']:.0f} s for OOF, CV and prediction{views}; the job should end at {eta} "
            f"({plan['total_s'] / 60:.1f} min)")


def to_dict(costs: Costs) -> dict:
    return asdict(costs)
