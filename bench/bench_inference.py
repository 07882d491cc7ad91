"""Test-set inference throughput of a 5-fold x 2-TTA ensemble (random weights, the competition
architecture), through the real prediction path (predict_test), with peak memory.

    python bench/bench_inference.py [--images 1000] [--device cpu|cuda] [--batch 256]
"""

import argparse
import resource
import time

import numpy as np
import torch
from common import save

from tgs_salt import hardware
from tgs_salt.config import load_config
from tgs_salt.inference import FoldModel
from tgs_salt.models import build_model
from tgs_salt.predict import predict_test
from tgs_salt.transforms import InputBuilder


def fold_model(cfg, device):
    m = FoldModel.__new__(FoldModel)
    m.cfg = cfg
    m.builder = InputBuilder.from_config(cfg)
    m.precision = hardware.for_inference(None, device)  # this device's rule (bf16 only where native)
    m.mf = m.precision.memory_format
    m.model = build_model(dict(cfg["model"], encoder_weights=None), m.builder.n_channels).to(
        device=device, memory_format=m.mf).eval()
    m.device = device
    return m


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--config", default="competition")
    a = p.parse_args()
    device = torch.device(a.device)
    cfg = load_config(a.config)
    torch.manual_seed(0)
    models = [fold_model(cfg, device) for _ in range(a.folds)]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (a.images, 101, 101), dtype=np.uint8)
    depths = rng.uniform(50, 950, a.images).astype(np.float32)
    predict_test([(models, None)], np.array([1.0]), images[: a.batch], depths[: a.batch], device, a.batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    predict_test([(models, None)], np.array([1.0]), images, depths, device, a.batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    rate = a.images / sec
    result = {"model": f"{cfg['model']['arch']} {cfg['model']['encoder']}", "device": str(device),
              "folds": a.folds, "tta": 2, "images": a.images, "batch": a.batch,
              "seconds": round(sec, 2), "test_images_per_s": round(rate, 1),
              "forward_passes_per_s": round(rate * a.folds * 2, 1),
              "projected_seconds_18000_test_images": round(18000 / rate, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    save(f"inference_{device.type}_{a.config}", result)


if __name__ == "__main__":
    main()
