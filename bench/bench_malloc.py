"""What ``train.cpu_malloc: keep`` buys: a config's CPU training step with glibc's default malloc
against one that keeps freed memory (``hardware.keep_freed_memory``), measured in one run on this
machine, in fresh processes (the allocator's settings are process-wide), alternating rounds.

    python bench/bench_malloc.py [--config cpu_budget] [--precision fp32+channels_last] [--rounds 3] [--steps 20]
                                 [--data-dir D --batches 30]

For the full-size input and the low-resolution phase's (``train.low_res_size``): median step time,
page faults per step (``ru_minflt``) and peak resident memory, in the precision the training probe
picks on this machine (or ``--precision``). With ``--data-dir``, also what real training epochs gain
(the data loading, the EMA and the classifier's loss allocate too): the config's fold 0 trained for 3
short epochs (``--batches`` each) with ``train.cpu_malloc`` default and keep, alternating in each
round, at full size and at the low resolution, as ``bench_cpu_processes.py`` does: images/s of epochs
2-3 and the training process's page faults (``RUSAGE_CHILDREN``, start-up included).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_cpu_processes import images_per_s, short_run_args
from common import kind_tag, precision, save

from tgs_salt import hardware as H
from tgs_salt.config import load_config
from tgs_salt.losses import get_loss
from tgs_salt.models import build_model
from tgs_salt.transforms import InputBuilder

MODES = ("default", "keep")


def worker(a) -> None:
    """One process: ``a.steps`` timed training steps at ``a.px`` with the allocator ``a.mode``."""
    kept = H.keep_freed_memory() if a.mode == "keep" else False
    cfg = load_config(a.config)
    builder = InputBuilder.from_config(cfg)
    if a.px != builder.geo.pad_to:
        builder = builder.at_size(a.px)
    geo, batch = builder.geo, cfg["train"]["batch_size"]
    prec = precision(cfg, torch.device("cpu"), a.precision)
    torch.manual_seed(0)
    model = build_model(dict(cfg["model"], encoder_weights=None), builder.n_channels)
    x = torch.randn(batch, builder.n_channels, geo.pad_to, geo.pad_to)
    y = (torch.rand(batch, 1, geo.resize, geo.resize) > 0.5).float()
    step = H.make_train_step(model, x, y, get_loss(cfg["train"]["stages"][0]["loss"]), geo.crop, prec,
                             torch.device("cpu"))
    del model  # the step trains its own copy

    for _ in range(3):
        step()
    times, f0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    print(json.dumps({"mode": a.mode, "set": kept, "px": a.px, "step_ms": [round(t * 1e3, 1) for t in times],
                      "faults_per_step": faults / a.steps,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def training_epochs(a, cfg: dict, prec: str) -> dict:
    """Real short training runs, ``train.cpu_malloc`` default against keep, alternating per round."""
    common, sizes = short_run_args(cfg, a.config, a.data_dir, precision(cfg, torch.device("cpu"), prec), a.batches)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for size, extra in sizes.items():
                row = {"round": r + 1, "size": size}
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    run = Path(tmp) / f"{mode}_{size}_{r}"
                    f0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
                    proc = subprocess.run([sys.executable, "-m", "tgs_salt", "train", *common, *extra,
                                           "--set", f"train.cpu_malloc={mode}", "--run-dir", str(run)],
                                          capture_output=True, text=True, env=env, check=False)
                    if proc.returncode:
                        sys.exit(f"training ({mode}) failed:\n{proc.stderr[-3000:]}")
                    row[f"{mode}_img_s"] = round(images_per_s(run), 2)
                    row[f"{mode}_process_faults"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - f0
                row["keep_vs_default"] = round(row["keep_img_s"] / row["default_img_s"], 3)
                print(row, flush=True)
                rows.append(row)
    return {"how": "images/s of epochs 2-3 of 3 short epochs of real training (training steps, loading and EMA), "
                   "the two settings alternating within each round", "batches_per_epoch": a.batches, "rows": rows,
            "summary": {size: {"keep_vs_default_mean": round(float(np.mean([r["keep_vs_default"] for r in rows
                                                                             if r["size"] == size])), 3),
                               "ratios": [r["keep_vs_default"] for r in rows if r["size"] == size]}
                        for size in sizes}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="cpu_budget")
    p.add_argument("--precision", default=None, help="e.g. fp32+channels_last (default: the training probe's choice)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--data-dir", default=None, help="also time real training epochs on this data")
    p.add_argument("--batches", type=int, default=30, help="training batches per epoch (3 epochs per run)")
    p.add_argument("--worker", choices=MODES, dest="mode", help=argparse.SUPPRESS)
    p.add_argument("--px", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        return worker(a)
    cfg = load_config(a.config)
    prec = a.precision or precision(cfg, torch.device("cpu")).name
    sizes = [cfg["input"]["pad_to"]] + ([cfg["train"]["low_res_size"]] if cfg["train"]["low_res_size"] else [])
    runs: dict[tuple[int, str], list[dict]] = {}
    for r in range(a.rounds):
        for px in sizes:
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                out = subprocess.run([sys.executable, __file__, "--worker", mode, "--px", str(px), "--config", a.config,
                                      "--precision", prec, "--steps", str(a.steps)],
                                     capture_output=True, text=True, check=True, env=os.environ.copy())
                res = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"round {r + 1} {px} px {mode:7s}: median {statistics.median(res['step_ms']):.1f} ms, "
                      f"{res['faults_per_step']:.0f} faults/step", flush=True)
                runs.setdefault((px, mode), []).append(res)
    result = {"config": a.config, "precision": prec, "batch": cfg["train"]["batch_size"], "rounds": a.rounds,
              "steps_per_round": a.steps, "sizes": {}}
    for px in sizes:
        row = {}
        for mode in MODES:
            rs = runs[(px, mode)]
            row[mode] = {"median_step_ms": round(statistics.median(t for r in rs for t in r["step_ms"]), 1),
                         "round_medians_ms": [statistics.median(r["step_ms"]) for r in rs],
                         "faults_per_step": round(statistics.mean(r["faults_per_step"] for r in rs)),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "allocator_set": rs[0]["set"]}
        row["keep_speedup"] = round(row["default"]["median_step_ms"] / row["keep"]["median_step_ms"], 3)
        row["keep_faster_in_rounds"] = sum(d > k for d, k in zip(row["default"]["round_medians_ms"],
                                                                   row["keep"]["round_medians_ms"], strict=True))
        result["sizes"][f"{px}px"] = row
    if a.data_dir:
        result["training_epochs"] = training_epochs(a, cfg, prec)
    save(f"malloc_cpu_{cfg['name']}_{kind_tag()}", result)


if __name__ == "__main__":
    main()
