"""Where a training step's distance to the fp32 peak comes from, on this machine: every convolution
of a config's model timed alone (forward, backward to its input, backward to its weights) at the
training batch and size, in both memory layouts, and the whole step split by operator with
``torch.profiler`` (convolution forward / backward, batch norm, the rest).

    python bench/bench_conv_parts.py [--config cpu_budget] [--batch 32] [--px 112] [--set KEY=VALUE ... --tag NAME]

Each part is the best of a few repetitions in fp32 (the precision the probe picks where bf16 is
emulated; on a CPU with native bf16 the training step runs in bf16 and these fp32 figures explain
the fp32 peak fraction only). The first convolution's backward to its input is not needed in
training (the input needs no gradient) and is left out of the sums. A stride-1 convolution's
backward to its input took the time of the forward on the flipped, transposed weights and gave the
same result (checked on the AVX2 EPYC), so what there is to gain lies in the backward to the
weights and in the memory-bound operators.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from bench_train_throughput import fp32_peak
from common import add_variant_args, kind_tag, save, variant_suffix

from tgs_salt.config import load_config
from tgs_salt.losses import get_loss
from tgs_salt.models import build_model, split_output
from tgs_salt.transforms import InputBuilder


def best_ms(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def conv_shapes(model, x) -> list[tuple[torch.nn.Conv2d, torch.Size, torch.Size]]:
    found = []
    hooks = [m.register_forward_hook(lambda m, i, o: found.append((m, i[0].shape, o.shape)))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return found


def time_conv(m: torch.nn.Conv2d, in_shape, channels_last: bool) -> dict:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(in_shape).contiguous(memory_format=fmt)
    w = m.weight.detach().clone().contiguous(memory_format=fmt)
    args = (m.stride, m.padding, m.dilation, m.groups)
    g = torch.randn_like(F.conv2d(x, w, None, *args))

    def back(data: bool, weight: bool):
        return torch.ops.aten.convolution_backward(g, x, w, None, list(m.stride), list(m.padding), list(m.dilation),
                                                   False, [0, 0], m.groups, [data, weight, False])

    return {"forward_ms": best_ms(lambda: F.conv2d(x, w, None, *args)),
            "backward_input_ms": best_ms(lambda: back(True, False)),
            "backward_weight_ms": best_ms(lambda: back(False, True))}


def step_split(model, x, y, loss_fn, crop, steps: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = loss_fn(crop(split_output(model(x))[0]).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t) / steps * 1e3
    parts = {"convolution forward": ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward"),
             "convolution backward": ("aten::convolution_backward",),
             "batch norm": ("aten::native_batch_norm", "aten::native_batch_norm_backward")}
    ms = {k: 0.0 for k in parts}
    total = 0.0
    for e in prof.key_averages():
        total += e.self_cpu_time_total
        for k, names in parts.items():
            if e.key in names:
                ms[k] += e.self_cpu_time_total
    out = {k: round(v / 1e3 / steps, 1) for k, v in ms.items()}
    out["everything else"] = round((total - sum(ms.values())) / 1e3 / steps, 1)
    return {"step_ms_profiled": round(wall, 1), "self_ms_per_step": out}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="cpu_budget")
    p.add_argument("--batch", type=int, default=None, help="default: the config's train.batch_size")
    p.add_argument("--px", type=int, default=None, help="input size (default: the config's full size)")
    add_variant_args(p)
    a = p.parse_args()
    tag = variant_suffix(p, a)
    cfg = load_config(a.config, a.set)
    batch = a.batch or cfg["train"]["batch_size"]
    builder = InputBuilder.from_config(cfg)
    geo = builder.geo
    px = a.px or geo.pad_to
    torch.manual_seed(0)
    model = build_model(dict(cfg["model"], encoder_weights=None), builder.n_channels).train()
    x = torch.randn(batch, builder.n_channels, px, px)
    rows, sums = [], {"forward_ms": 0.0, "backward_input_ms": 0.0, "backward_weight_ms": 0.0}
    for i, (m, si, so) in enumerate(conv_shapes(model, x)):
        flops = 2 * so.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        cl, nchw = time_conv(m, si, True), time_conv(m, si, False)
        needed = dict(cl) if i else {**cl, "backward_input_ms": 0.0}  # the input needs no gradient
        for k in sums:
            sums[k] += needed[k]
        rows.append({"conv": f"{m.in_channels}->{m.out_channels} {m.kernel_size[0]}x{m.kernel_size[1]}/{m.stride[0]} "
                             f"at {si[-1]} px", "gflop": round(flops / 1e9, 3),
                     **{f"channels_last_{k}": round(v, 2) for k, v in cl.items()},
                     **{f"gflops_{k[:-3]}": round(flops / v / 1e6, 1) for k, v in cl.items()},
                     **{f"nchw_{k}": round(v, 2) for k, v in nchw.items()},
                     **({"note": "backward to the input not needed in training"} if i == 0 else {})})
    peak = fp32_peak(torch.device("cpu"))
    m_cl = model.to(memory_format=torch.channels_last)
    full = px == geo.pad_to  # at another size (progressive resizing's) the loss sees the whole output
    y = (torch.rand(batch, 1, *(2 * [geo.resize if full else px])) > 0.5).float()
    split = step_split(m_cl, x.contiguous(memory_format=torch.channels_last), y,
                       get_loss(cfg["train"]["stages"][0]["loss"]), geo.crop if full else lambda t: t)
    conv_ms = sum(sums.values())
    g_all = sum(r["gflop"] for r in rows)
    gflop = {"forward_ms": g_all, "backward_input_ms": g_all - rows[0]["gflop"], "backward_weight_ms": g_all}
    result = {
        "config": a.config, "overrides": a.set, "batch": batch, "input_px": px, "precision": "fp32",
        "fp32_peak_gflops": round(peak / 1e9, 1),
        "fastest_convolution_gflops": max(r["gflops_forward"] for r in rows),  # oneDNN's kernels can beat the matmul
        "convolutions": rows,
        "convolution_sums_channels_last_ms": {k: round(v, 1) for k, v in sums.items()},
        "convolution_gflops_per_s": {k[:-3]: round(fl / sums[k] * 1e3, 1) for k, fl in gflop.items()}
        | {"all": round(sum(gflop.values()) / conv_ms * 1e3, 1)},
        "step": split,
        "step_fraction_of_fp32_peak": round(sum(gflop.values()) / split["step_ms_profiled"] * 1e12 / peak, 3),
    }
    save(f"conv_parts_{cfg['name']}{tag}_{px}px_{kind_tag()}", result, echo=False)
    print(f"{'convolution':28s} {'GFLOP':>6s}  fwd ms (GF/s)   bwd-input ms (GF/s)  bwd-weight ms (GF/s)   NCHW f/bi/bw ms")
    for r in rows:
        print(f"{r['conv']:28s} {r['gflop']:6.2f}  {r['channels_last_forward_ms']:6.1f} ({r['gflops_forward']:4.0f})"
              f"   {r['channels_last_backward_input_ms']:6.1f} ({r['gflops_backward_input']:4.0f})      "
              f"{r['channels_last_backward_weight_ms']:6.1f} ({r['gflops_backward_weight']:4.0f})     "
              f"{r['nchw_forward_ms']:.1f}/{r['nchw_backward_input_ms']:.1f}/{r['nchw_backward_weight_ms']:.1f}")
    print("sums (channels_last, ms):", result["convolution_sums_channels_last_ms"],
          "GFLOP/s:", result["convolution_gflops_per_s"], f"fp32 matmul peak {result['fp32_peak_gflops']}",
          f"fastest convolution {result['fastest_convolution_gflops']}")
    print("training step by operator (ms):", split, "fraction of peak:", result["step_fraction_of_fp32_peak"])


if __name__ == "__main__":
    main()
