"""One training process using every core, or several data-parallel processes sharing them?

    python bench/bench_cpu_processes.py --data-dir D [--config cpu_budget] [--processes 2] [--rounds 2]
                                        [--batches 25] [--set KEY=VALUE --tag T]

Trains the config's fold 0 for 3 short epochs (``--batches`` batches each) at full size and again at
``train.low_res_size``, alternating, in each round: one process of all the usable cores' threads (what
``train`` does alone), then ``--processes`` processes of cores/processes threads each, started the
way ``./run_all.sh`` starts them with ``train.cpu_processes`` (``pipeline.train_on_cpu_ranks``: gloo,
the global batch shared out). The images/s of the last two epochs of each run (the first warms up)
are compared as a ratio within the round, so that a host's speed, which drifts over minutes, enters
both arms alike. Precision and memory layout: the training probe's choice for the config, once.
Writes ``bench/results/cpu_processes_<config>_<cpu kind>.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_train_throughput import fp32_peak, train_flops_per_image
from common import add_variant_args, kind_tag, precision, save, variant_suffix

from tgs_salt.config import load_config
from tgs_salt.hardware import usable_cores
from tgs_salt.pipeline import train_on_cpu_ranks


def precision_sets(p) -> list[str]:
    return ["--set", f"train.amp={'false' if p.dtype is None else 'true'}",
            *(["--set", f"train.amp_dtype={p.dtype}"] if p.dtype else []),
            "--set", f"train.channels_last={'true' if p.channels_last else 'false'}"]


def full_size_flops(cfg: dict) -> float:
    """Training FLOPs per image at the full input size (forward and backward, as counted by torch)."""
    import torch

    from tgs_salt.losses import get_loss
    from tgs_salt.models import build_model
    from tgs_salt.transforms import InputBuilder

    builder = InputBuilder.from_config(cfg)
    g = builder.geo
    model = build_model(dict(cfg["model"], encoder_weights=None), builder.n_channels)
    x = torch.randn(2, builder.n_channels, g.pad_to, g.pad_to)
    y = (torch.rand(2, 1, g.resize, g.resize) > 0.5).float()
    return train_flops_per_image(model, x, y, get_loss(cfg["train"]["stages"][-1]["loss"]), g.crop)


def short_run_args(cfg: dict, config: str, data_dir: str, prec, batches: int,
                   sets: list[str] = ()) -> tuple[list[str], dict[str, list[str]]]:
    """``train``'s arguments for 3 short epochs of fold 0 (``batches`` batches each, in precision
    ``prec``, no time plan, validated only at the end) and the extra ones per size: ``full``, and
    ``low_res`` (every epoch at ``train.low_res_size``) when the config has one."""
    stages = json.dumps([{"loss": cfg["train"]["stages"][-1]["loss"], "epochs": 3}])
    common = ["--config", config, "--data-dir", data_dir, "--fold", "0", "--device", "cpu",
              *[x for s in sets for x in ("--set", s)], *precision_sets(prec),
              "--set", f"train.max_train_batches={batches}", "--set", f"train.stages={stages}",
              "--set", "train.time_budget_minutes=null", "--set", "train.val_every=100",
              "--set", "train.low_res_validate=false"]
    sizes = {"full": ["--set", "train.low_res_fraction=0"]}
    if cfg["train"]["low_res_size"]:
        sizes["low_res"] = ["--set", "train.low_res_fraction=1"]
    return common, sizes


def images_per_s(run_dir: Path) -> float:
    with open(run_dir / "fold0" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    return float(np.mean([float(r["images_per_s"]) for r in rows[1:]]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="cpu_budget")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", type=int, default=25, help="training batches per epoch (3 epochs per run)")
    add_variant_args(p)
    a = p.parse_args()
    suffix = variant_suffix(p, a)
    import torch

    cfg = load_config(a.config, a.set)
    cores = usable_cores()
    if a.processes < 2 or a.processes > cores or cfg["train"]["batch_size"] % a.processes:
        p.error(f"--processes {a.processes}: between 2 and the {cores} usable cores, dividing the batch "
                f"size {cfg['train']['batch_size']}")
    prec = precision(cfg, torch.device("cpu"))
    peak, flops = fp32_peak(torch.device("cpu")), full_size_flops(cfg)
    common, sizes = short_run_args(cfg, a.config, a.data_dir, prec, a.batches, a.set)
    threads = cores // a.processes
    src = str(Path(__file__).resolve().parents[1] / "src")  # the processes import this checkout's package
    os.environ["PYTHONPATH"] = src + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(a.rounds):
            for size, extra in sizes.items():
                one = Path(tmp) / f"one_{size}_{rnd}"
                t0 = time.time()
                proc = subprocess.run([sys.executable, "-m", "tgs_salt", "train", *common, *extra, "--run-dir",
                                       str(one), "--threads", str(cores)], capture_output=True, text=True, check=False)
                if proc.returncode:
                    sys.exit(f"one-process training failed:\n{proc.stderr[-3000:]}")
                t1 = time.time()
                many = Path(tmp) / f"many_{size}_{rnd}"
                train_on_cpu_ranks(a.processes, threads, [*common, *extra, "--run-dir", str(many)],
                                   Path(tmp) / f"many_{size}_{rnd}.log")
                t2 = time.time()
                r = {"round": rnd, "size": size, "one_process_img_s": round(images_per_s(one), 2),
                     f"{a.processes}_processes_img_s": round(images_per_s(many), 2),
                     "one_process_run_s": round(t1 - t0, 1), f"{a.processes}_processes_run_s": round(t2 - t1, 1)}
                r["ratio"] = round(r[f"{a.processes}_processes_img_s"] / r["one_process_img_s"], 3)
                rows.append(r)
                print(r, file=sys.stderr, flush=True)
    summary = {size: {"ratio_mean": round(float(np.mean([r["ratio"] for r in rows if r["size"] == size])), 3),
                      "ratios": [r["ratio"] for r in rows if r["size"] == size]} for size in sizes}
    full = [r for r in rows if r["size"] == "full"]
    summary["full"]["fraction_of_fp32_peak"] = {  # convolution and matmul FLOPs per image x images/s
        arm: round(float(np.mean([r[f"{arm}_img_s"] for r in full])) * flops / peak, 3)
        for arm in ("one_process", f"{a.processes}_processes")}
    save(f"cpu_processes_{a.config}_{kind_tag()}{suffix}", {
        "config": a.config, "overrides": a.set, "precision": prec.name, "usable_cores": cores,
        "fp32_peak_gflops": round(peak / 1e9, 1), "train_gflops_per_image_full_size": round(flops / 1e9, 3),
        "processes": a.processes, "threads_per_process": threads, "one_process_threads": cores,
        "batch_size": cfg["train"]["batch_size"], "batches_per_epoch": a.batches,
        "how": "images/s of epochs 2-3 of 3 (training steps only), the two arms alternating within each round",
        "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
