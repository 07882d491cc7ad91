"""Inference speed against batch size, on this machine: validation (no TTA) and the OOF / test pass
(horizontal-flip TTA) of a config's model at the precision the probe picks, batch sizes alternated
round by round in one run, best round of each kept.

    python bench/bench_eval_batch.py [--config cpu_budget] [--data-dir ../shared/tgs-salt] [--images 512]

The config's own sizes (``train.val_batch_size``, ``predict.batch_size``) are among those timed;
the result gives each size's images/s and its ratio to the fastest. Weights are random (the speed
does not depend on them). Without --data-dir, synthetic images are used.
"""

import argparse
import tempfile
import time

import torch
from bench_epoch_parts import load_data
from common import kind_tag, save
from common import precision as bench_precision

from tgs_salt import hardware as H
from tgs_salt.config import load_config
from tgs_salt.inference import predict_arrays
from tgs_salt.models import build_model
from tgs_salt.transforms import InputBuilder


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="cpu_budget")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--images", type=int, default=512, help="images predicted per timing")
    p.add_argument("--sizes", default="16,32,64,128,256")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", default=None, help="e.g. fp32+channels_last (default: the probe's choice)")
    a = p.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    cfg = load_config(a.config)
    sizes = sorted({int(s) for s in a.sizes.split(",")} | {cfg["train"]["val_batch_size"],
                                                           cfg["predict"]["batch_size"]})
    data, idx = load_data(a.data_dir, a.images, tempfile.mkdtemp(prefix="eval_batch_"))
    images, depths = data.images[idx], data.depths[idx]
    builder = InputBuilder.from_config(cfg)
    model = build_model(dict(cfg["model"], encoder_weights=None), builder.n_channels)
    precision = bench_precision(cfg, device, a.precision)
    model = model.to(memory_format=precision.memory_format).eval()
    predict_arrays(model, builder, images[:64], depths[:64], device, precision, True, 32)  # warm-up
    best = {(tta, b): 0.0 for tta in (False, True) for b in sizes}
    for r in range(a.rounds):
        for tta in (False, True):
            for b in sizes:
                t0 = time.perf_counter()
                predict_arrays(model, builder, images, depths, device, precision, tta, b)
                best[tta, b] = max(best[tta, b], len(images) / (time.perf_counter() - t0))
        print(f"round {r + 1}: " + ", ".join(f"{'tta' if k[0] else 'val'}@{k[1]} {v:.1f}" for k, v in best.items()))
    result = {"config": a.config, "device": "cpu", "cpu_kind": H.cpu_kind(), "precision": precision.name,
              "images": len(images), "rounds": a.rounds, "data": "real" if a.data_dir else "synthetic",
              "config_sizes": {"train.val_batch_size": cfg["train"]["val_batch_size"],
                               "predict.batch_size": cfg["predict"]["batch_size"]}}
    for tta, name in ((False, "validation (no TTA)"), (True, "OOF / test (flip TTA)")):
        rates = {b: best[tta, b] for b in sizes}
        top = max(rates.values())
        result[name] = {str(b): {"img_per_s": round(v, 1), "ratio_to_fastest": round(v / top, 3)}
                        for b, v in rates.items()}
    save(f"eval_batch_cpu_{cfg['name']}_{kind_tag()}", result)


if __name__ == "__main__":
    main()
