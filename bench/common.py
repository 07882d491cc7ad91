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

    flags = H.cpu_flags("")  # all of them; cpu_kind and native_bf16 say what an ISA limit leaves
    info = {"cpu": H.cpu_name(), "cpu_kind": H.cpu_kind(flags), "native_bf16": H.cpu_native_bf16(),
            "cpu_flags_of_note": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}),
            **({"isa_limit": H.isa_limit().upper()} if H.isa_limit() else {}),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def save(name: str, result: dict, echo: bool = True) -> Path:
    RESULTS.mkdir(exist_ok=True)
    result = {"hardware": hardware(), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    if echo:
        print(json.dumps(result, indent=2))
    return path
