"""Helpers for the benchmarks: hardware description and result files."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

RESULTS = Path(__file__).resolve().parent / "results"


def hardware() -> dict:
    import torch

    from tgs_salt import hardware as H

    flags, limit = H.cpu_flags(""), H.isa_limit()  # all flags; cpu_kind and native_bf16 say what a limit leaves
    info = {"cpu": H.cpu_name(), "cpu_kind": H.cpu_kind(flags), "native_bf16": H.cpu_native_bf16(),
            "cpu_flags_of_note": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}),
            **({"isa_limit": limit.upper()} if limit else {}),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def kind_tag(device_type: str = "cpu") -> str:
    """The end of a result file's name: the CPU kind's first word ("avx2", "avx512", "amx") or "gpu";
    with "isa" after it when an ISA limit (``ONEDNN_MAX_CPU_ISA``) made the kind ("avx2isa"), so that a bigger CPU
    measured as an AVX2 one never overwrites a genuine AVX2 host's file (three older files measured
    limited, ``{epoch_parts,eval_batch,variant_cost}_cpu_cpu_budget_avx2.json``, carry the plain
    name; their hardware block says so)."""
    from tgs_salt import hardware as H

    if device_type != "cpu":
        return "gpu"
    kind = H.cpu_kind()
    return kind.split()[0].lower().replace("-", "") + ("isa" if H.kind_limit(kind) else "")


def add_variant_args(p) -> None:
    """``--set`` (measure a variant of the config) and ``--tag`` (its result file's suffix)."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--tag", default=None, help="suffix of the result file (for a --set variant)")


def variant_suffix(p, a) -> str:
    """The result file name's suffix for ``--tag``; a ``--set`` without one is refused, so that a
    variant's results never overwrite the config's."""
    if a.set and not a.tag:
        p.error("--set needs --tag: the variant's results must not overwrite the config's")
    return f"_{a.tag}" if a.tag else ""


def save(name: str, result: dict, echo: bool = True) -> Path:
    from tgs_salt.io_utils import write_json_atomic

    # this machine's hardware first, unless the caller gives its own (record_run: the run's)
    result = {"hardware": result["hardware"] if "hardware" in result else hardware(), **result}
    path = RESULTS / f"{name}.json"
    write_json_atomic(path, result)  # a result file is whole or absent
    if echo:
        print(json.dumps(result, indent=2))
    return path


def precision(cfg: dict, device, text: str | None = None):
    """The precision to time a config's training step in: ``text`` (e.g. "bf16+NCHW",
    "fp32+channels_last") when given, else the training probe's choice for the config on this machine."""
    import torch

    from tgs_salt import hardware as H
    from tgs_salt.losses import get_loss
    from tgs_salt.models import build_model
    from tgs_salt.transforms import InputBuilder

    if text:
        dtype, _, layout = text.partition("+")
        return H.Precision({"fp32": None, "bf16": "bfloat16", "fp16": "float16"}[dtype], layout == "channels_last")
    batch = cfg["train"]["batch_size"]
    builder = InputBuilder.from_config(cfg)
    g = builder.geo
    model = build_model(dict(cfg["model"], encoder_weights=None), builder.n_channels)
    x = torch.randn(batch, builder.n_channels, g.pad_to, g.pad_to, device=device)
    y = (torch.rand(batch, 1, g.resize, g.resize, device=device) > 0.5).float()
    timer = H.make_step_timer(model.to(device), x, y, get_loss(cfg["train"]["stages"][0]["loss"]), g.crop, device)
    return H.choose(cfg["train"], device, timer, batch, None)
