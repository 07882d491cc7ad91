"""Training throughput (images/s) of the competition model (smp U-Net ResNet34 + scSE) at 128 px:
fp32 against channels_last + bf16 autocast, measured in one run on this machine.

    python bench/bench_train_throughput.py [--device cpu|cuda] [--batch 32] [--steps 6]
"""

import argparse
import time

import torch
from common import save

from tgs_salt.config import load_config
from tgs_salt.losses import get_loss
from tgs_salt.models import build_model


def measure(device, batch, steps, channels_last, amp, cfg, dtype=torch.bfloat16, compile_=False):
    torch.manual_seed(0)
    model = build_model(dict(cfg["model"], encoder_weights=None), 3).to(device)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=mf)
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, 128, 128, device=device).contiguous(memory_format=mf)
    y = (torch.rand(batch, 1, 101, 101, device=device) > 0.5).float()
    loss_fn = get_loss("bce_dice")

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            out = fwd(x)
        loss = loss_fn(out[..., 13:114, 13:114].float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2 if not compile_ else 4):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--config", default="competition")
    a = p.parse_args()
    device = torch.device(a.device)
    cfg = load_config(a.config)
    fp32 = measure(device, a.batch, a.steps, False, False, cfg)
    fast = measure(device, a.batch, a.steps, True, True, cfg)
    result = {"model": f"{cfg['model']['arch']} {cfg['model']['encoder']} scse={cfg['model']['decoder_attention']}",
              "device": str(device), "batch": a.batch, "input": "3x128x128",
              "images_per_s_fp32": round(fp32, 1), "images_per_s_channels_last_bf16": round(fast, 1),
              "speedup": round(fast / fp32, 2)}
    save(f"train_throughput_{device.type}_{a.config}", result)


if __name__ == "__main__":
    main()
