"""Training throughput of a config's model for every precision / memory-layout candidate, measured
in one run on this machine: images/s, FLOP/s as a fraction of the machine's fp32 peak (a large
fp32 matrix product, measured here), and what ``train.amp: auto`` / ``channels_last: auto`` pick.

    python bench/bench_train_throughput.py [--config cpu_budget] [--device cpu|cuda] [--batch 32]
                                           [--set model.hypercolumn=true ...] [--tag NAME]

``--set`` measures a variant of the config (what it costs per image against the shipped one);
``--tag`` names the result file's variant (default: the results of the config itself).

FLOPs per image come from ``torch.utils.flop_counter`` (forward + backward of one training step).
A reduced-precision candidate far behind fp32 (emulated bf16 on an AVX2-only CPU) is timed on a
few images only, as the probe in training does.
"""

import argparse
import time

import torch
from common import add_variant_args, kind_tag, save, variant_suffix

from tgs_salt import hardware as H
from tgs_salt.config import load_config
from tgs_salt.losses import get_loss
from tgs_salt.models import build_model, split_output
from tgs_salt.transforms import InputBuilder


def fp32_peak(device, sizes=(1024, 2048), rounds=5, flops_per_round=2e10) -> float:
    """FLOP/s of an n x n fp32 matrix product, the best of a few timed rounds at each size: what
    this machine's fp32 units deliver. One timing of a few products reads low on a shared host
    (91.6 against 185 GFLOP/s best-of-5, minutes apart on the same AVX2 EPYC), which made the
    training step read above 100% of "peak"."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        reps = max(1, int(flops_per_round / (2 * n ** 3)))
        for _ in range(2):
            a @ b
        for _ in range(rounds):
            H._sync(device)
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            H._sync(device)
            best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def train_flops_per_image(model, x, y, loss_fn, crop) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    m = model.train()
    with FlopCounterMode(display=False) as fc:
        loss = loss_fn(crop(split_output(m(x))[0]).float(), y)
        loss.backward()
    m.zero_grad(set_to_none=True)
    return fc.get_total_flops() / len(x)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="cpu_budget")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: the config's train.batch_size")
    add_variant_args(p)
    a = p.parse_args()
    tag = variant_suffix(p, a)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = load_config(a.config, a.set)
    # as training does (train.cpu_malloc): freed memory kept for the next step
    kept = H.apply_cpu_malloc(cfg["train"], device)
    batch = a.batch or cfg["train"]["batch_size"]
    builder = InputBuilder.from_config(cfg)
    geo = builder.geo
    torch.manual_seed(0)
    model = build_model(dict(cfg["model"], encoder_weights=None), builder.n_channels).to(device)
    x = torch.randn(batch, builder.n_channels, geo.pad_to, geo.pad_to, device=device)
    y = (torch.rand(batch, 1, geo.resize, geo.resize, device=device) > 0.5).float()
    loss_fn = get_loss(cfg["train"]["stages"][0]["loss"])

    flops = train_flops_per_image(model, x[:2], y[:2], loss_fn, geo.crop)
    peak = fp32_peak(device)
    timer = H.make_step_timer(model, x, y, loss_fn, geo.crop, device)
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    every = {"amp": "auto", "amp_dtype": "auto", "channels_last": "auto"}
    if device.type == "cuda":  # every candidate, not only what the rule would keep
        dts = [None, "float16"] + (["bfloat16"] if cap >= (8, 0) else [])
        cands = [(d, c) for d in dts for c in (False, True)]
        rates = H.probe_cpu(cands, timer, batch, slow_factor=1e9)
    else:
        cands = H.candidates(every, device)
        rates = H.probe_cpu(cands, timer, batch)
    choice = H.choose(cfg["train"], device, lambda d, c, n: n / rates[H.candidate_name(d, c)], batch, cap)
    best = max(rates.values())
    result = {
        "config": a.config, "overrides": a.set, "model": f"{cfg['model']['arch']} {cfg['model']['encoder']}",
        "device": str(device), "cpu_kind": H.cpu_kind(), "batch": batch, "cpu_malloc_kept": kept,
        "input": f"{builder.n_channels}x{geo.pad_to}x{geo.pad_to}",
        "train_gflops_per_image": round(flops / 1e9, 3),
        "fp32_peak_gflops": round(peak / 1e9, 1),
        "candidates": {k: {"images_per_s": v, "fraction_of_fp32_peak": round(v * flops / peak, 3),
                           "vs_fastest": round(v / best, 3)} for k, v in rates.items()},
        "auto_choice": choice.name, "auto_vs_fastest": round(rates[choice.name] / best, 3),
    }
    save(f"train_throughput_{device.type}_{cfg['name']}{tag}_{kind_tag(device.type)}", result)


if __name__ == "__main__":
    main()
