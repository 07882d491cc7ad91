"""Where a training epoch's time goes, on this machine: the parts of the real training loop timed
one by one on real batches, at full size and (when the config sets ``train.low_res_size``) at the
low resolution of progressive resizing's first phase, against the whole epoch the time plan counts.

    python bench/bench_epoch_parts.py [--config cpu_budget] [--data-dir ../shared/tgs-salt] [--batches 12]

Parts per batch of ``train.batch_size``: loading (augmentation of each sample in the main process,
as on CPU, and collation), building the input (normalising, resizing, padding, channels), the
training step (forward, loss, backward, AdamW), the EMA update; per epoch: validation of the held-out
images (forward of the averaged weights, metric) and the checkpoint writes. The precision is the
probe's choice for the config (or --precision). Without --data-dir, synthetic images are used.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import kind_tag, save
from common import precision as bench_precision

from tgs_salt import hardware as H
from tgs_salt.config import load_config
from tgs_salt.ema import EMA
from tgs_salt.losses import get_loss
from tgs_salt.models import build_model, split_output, take_side_logits
from tgs_salt.train import DistContext, batch_loss, evaluate
from tgs_salt.transforms import AugmentedArrays, InputBuilder, build_augment


def load_data(data_dir: str | None, n: int, tmp: str):
    """The labelled images of ``data_dir`` (or of a synthetic set written to ``tmp``) and ``n``
    random ones of them."""
    from tgs_salt.data.kaggle_io import load_train

    if not data_dir:
        from tgs_salt.data.synth import write_synthetic

        write_synthetic(tmp, n_train=n, n_test=1, seed=0)
    data = load_train(data_dir or tmp, use_cache=False)
    if len(data.ids) < n:
        raise SystemExit(f"{data_dir}: {len(data.ids)} labelled images, {n} needed (--batches, --val-images)")
    return data, np.random.default_rng(0).permutation(len(data.ids))[:n]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="cpu_budget")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batches", type=int, default=12, help="timed batches per resolution")
    p.add_argument("--val-images", type=int, default=601, help="held-out images validated per epoch")
    p.add_argument("--precision", default=None, help="e.g. fp32+channels_last (default: the probe's choice)")
    a = p.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    cfg = load_config(a.config)
    t = cfg["train"]
    batch = t["batch_size"]
    data, keep = load_data(a.data_dir, batch * a.batches + a.val_images, tempfile.mkdtemp(prefix="epoch_parts_"))
    train_idx, val_idx = keep[:batch * a.batches], keep[batch * a.batches:]
    full = InputBuilder.from_config(cfg)
    model = build_model(dict(cfg["model"], encoder_weights=None), full.n_channels)
    loss_fn = get_loss(t["stages"][0]["loss"])
    precision = bench_precision(cfg, device, a.precision)
    model = model.to(memory_format=precision.memory_format).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = EMA(model, t["ema"]) if t["ema"] else None
    side_fn = get_loss(t["side_loss"])
    ds = AugmentedArrays(data.images[train_idx], data.masks[train_idx], data.depths[train_idx],
                         build_augment(cfg["augment"]), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0, drop_last=True)
    sizes = {"full": full}
    if t["low_res_size"]:
        sizes["low_res"] = full.at_size(t["low_res_size"])

    result = {"config": a.config, "device": "cpu", "cpu_kind": H.cpu_kind(), "precision": precision.name,
              "batch": batch, "data": "real" if a.data_dir else "synthetic", "phases": {}}
    for phase, builder in sizes.items():
        parts = {"load": 0.0, "build_input": 0.0, "step": 0.0, "ema": 0.0}
        n = 0
        for rep in range(2):  # the first pass warms up
            t_load = time.perf_counter()
            for b, (img, mask, depth) in enumerate(loader):
                t0 = time.perf_counter()
                xb, yb = builder.training_pair(img, mask, depth, key=(0, b))
                xb = xb.contiguous(memory_format=precision.memory_format)
                t1 = time.perf_counter()
                with precision.autocast(device):
                    out, label = split_output(model(xb))
                loss = batch_loss(out, label, take_side_logits(model), yb, builder.geo, loss_fn, side_fn, t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                float(loss)
                t2 = time.perf_counter()
                if ema is not None:
                    ema.update()
                t3 = time.perf_counter()
                if rep:
                    parts["load"] += t0 - t_load
                    parts["build_input"] += t1 - t0
                    parts["step"] += t2 - t1
                    parts["ema"] += t3 - t2
                    n += 1
                t_load = time.perf_counter()
        per_batch = {k: v / n for k, v in parts.items()}
        result["phases"][phase] = {
            "input_px": builder.geo.pad_to,
            "ms_per_batch": {k: round(v * 1000, 1) for k, v in per_batch.items()},
            "share": {k: round(v / sum(per_batch.values()), 3) for k, v in per_batch.items()},
            "train_img_per_s": round(batch / sum(per_batch.values()), 1),
            "step_only_img_per_s": round(batch / per_batch["step"], 1),
        }
    # once per epoch: validation (at full size, as training does) and the checkpoint writes
    val_model = ema.module if ema is not None else model
    t0 = time.perf_counter()
    evaluate(val_model, full, data, val_idx, device, cfg, precision, loss_fn, DistContext())
    t_val = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "ema": ema.state_dict() if ema else None}, Path(tmp) / "last.pt")
        torch.save({"model": val_model.state_dict()}, Path(tmp) / "best.pt")
        t_save = time.perf_counter() - t0
    n_train = int(2400 // batch * batch)
    result["per_epoch"] = {"validation_s": round(t_val, 2), "validated_images": len(val_idx),
                           "checkpoints_s": round(t_save, 2)}
    for phase, r in result["phases"].items():
        train_s = n_train / r["train_img_per_s"]
        r["epoch_of_2400_images_s"] = round(train_s + t_val + t_save, 1)
        r["validation_share_of_epoch"] = round(t_val / (train_s + t_val + t_save), 3)
    save(f"epoch_parts_cpu_{cfg['name']}_{kind_tag()}", result)


if __name__ == "__main__":
    main()
