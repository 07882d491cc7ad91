"""What a variant of a config costs per training image against the config itself, measured in one
run on this machine: the variants' training steps are timed in alternating rounds (so a busy
neighbour slows them alike) and reported as images/s and as a ratio to the config's own.

    python bench/bench_variant_cost.py --config cpu_budget \
        --variant ds model.deep_supervision=true --variant hc model.hypercolumn=true [--rounds 4] [--suffix S] \
        [--set train.low_res_size=null]   # overrides for all: here the full-size step instead of the low-res one

A step is the real one: forward, the stage's loss on the mask, the side outputs' and the
classifier's losses when the variant has them, backward and an AdamW step, in the precision and
memory layout the probe picks for the config on this machine (or --precision). Use the ratio to
give a variant the epochs that fit in the config's time when it is compared at a fixed number of
epochs (docs/results.md, *Two more levers at a slow host's compute*: the fixed-48 table).
"""

import argparse
import copy
import time

import torch
from common import kind_tag, save
from common import precision as bench_precision

from tgs_salt import hardware as H
from tgs_salt.config import load_config
from tgs_salt.losses import get_loss
from tgs_salt.models import build_model, split_output, take_side_logits
from tgs_salt.train import batch_loss
from tgs_salt.transforms import InputBuilder


def make_step(cfg: dict, precision: H.Precision, device, name: str = ""):
    """One training step of the config's model on a random batch of its batch size (at
    ``train.low_res_size`` when the config sets it: the step of progressive resizing's first phase),
    and the name of the precision it runs in (NCHW where channels_last is unsafe for the model)."""
    torch.manual_seed(0)
    batch = cfg["train"]["batch_size"]
    builder = InputBuilder.from_config(cfg)
    if cfg["train"]["low_res_size"]:
        builder = builder.at_size(cfg["train"]["low_res_size"])
    geo = builder.geo
    model = build_model(dict(cfg["model"], encoder_weights=None), builder.n_channels)
    why = H.channels_last_unsafe(model, device) if precision.channels_last else None
    if why:  # as the training probe does (hardware.safe_layouts)
        print(f"{name or cfg['name']} timed in NCHW: {why}")
        precision = H.Precision(precision.dtype, False)
    model = model.to(device=device, memory_format=precision.memory_format).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, builder.n_channels, geo.pad_to, geo.pad_to, device=device)
    x = x.contiguous(memory_format=precision.memory_format)
    y = (torch.rand(batch, 1, geo.resize, geo.resize, device=device) > 0.5).float()
    loss_fn = get_loss(cfg["train"]["stages"][0]["loss"])
    t = cfg["train"]
    side_fn = get_loss(t["side_loss"])

    def step():
        with precision.autocast(device):
            out, label = split_output(model(x))
        loss = batch_loss(out, label, take_side_logits(model), y, geo, loss_fn, side_fn, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    return step, precision.name


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="cpu_budget")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="a name and the --set overrides that make the variant (repeatable)")
    p.add_argument("--set", dest="common", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides for the config and every variant, e.g. train.low_res_size=null to time the "
                   "full-size step of a config with progressive resizing")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--precision", default=None, help="e.g. bf16+NCHW (default: the probe's choice for the config)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--suffix", default="", help="appended to the results file's name, so that a measurement "
                   "of other variants does not replace an earlier one")
    a = p.parse_args()
    if not a.variant:
        p.error("give at least one --variant NAME KEY=VALUE ...")
    device = torch.device(a.device)
    base = load_config(a.config, a.common)
    precision = bench_precision(base, device, a.precision)
    cfgs = {a.config: base}
    for name, *sets in a.variant:
        cfgs[name] = load_config(a.config, a.common + sets)
    made = {name: make_step(cfg, precision, device, name) for name, cfg in cfgs.items()}
    steps = {name: step for name, (step, _) in made.items()}
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(a.rounds):
        for name, step in (steps.items() if r % 2 == 0 else reversed(list(steps.items()))):
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            H._sync(device)
            rates[name].append(a.steps * cfgs[name]["train"]["batch_size"] / (time.perf_counter() - t0))
    med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    ref = med[a.config]
    result = {
        "config": a.config, "common_overrides": a.common, "device": str(device), "cpu_kind": H.cpu_kind(),
        "precision": precision.name, "rounds": a.rounds,
        "variants": {name: {"overrides": copy.deepcopy(sets), "batch": cfgs[name]["train"]["batch_size"],
                            "precision": made[name][1], "images_per_s": round(med[name], 2),
                            "per_round": [round(v, 2) for v in rates[name]],
                            "cost_vs_config": round(ref / med[name], 3)}
                     for name, sets in [(a.config, [])] + [(v[0], v[1:]) for v in a.variant]},
    }
    save(f"variant_cost_{device.type}_{base['name']}_{kind_tag(device.type)}{'_' + a.suffix if a.suffix else ''}",
         result)


if __name__ == "__main__":
    main()
