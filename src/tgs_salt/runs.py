"""``python -m tgs_salt runs [DIR]``: compare experiments, one row per run directory."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tgs_salt import config as C
from tgs_salt.errors import UserError


def changed_keys(cfg: dict, base: dict | None = None, prefix: str = "") -> list[str]:
    """``key=value`` for every leaf of ``cfg`` that differs from the defaults (name excluded)."""
    base = C.DEFAULTS if base is None else base
    out = []
    for k, v in cfg.items():
        if prefix == "" and k == "name":
            continue
        b = base.get(k) if isinstance(base, dict) else None
        if isinstance(v, dict) and isinstance(b, dict) and b:
            out += changed_keys(v, b, f"{prefix}{k}.")
        elif v != b:
            out.append(f"{prefix}{k}={json.dumps(v, separators=(',', ':'))}")
    return out


def _json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_row(run_dir: Path) -> dict:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    cv = _json(run_dir / "cv.json")
    done = [_json(f) for f in sorted(run_dir.glob("fold*/done.json"))]
    prec = _json(run_dir / "precision.json")
    enc = _json(run_dir / "plan.json").get("encoder")  # model.larger_encoder, chosen by the time plan
    changed = changed_keys(cfg) + ([f"model.encoder={enc}(plan)"] if enc else [])
    return {
        "run": run_dir.name, "config": cfg.get("name"),
        "changed": " ".join(changed) or "-",
        "cv_default": cv.get("score_default_threshold"), "cv_nested": cv.get("score_nested"),
        "cv_tuned": cv.get("score"),
        "threshold": cv.get("threshold"), "min_area": cv.get("min_area"),
        "folds": len(done), "epochs": sum(d.get("epochs_run", 0) for d in done),
        "minutes": round(sum(d.get("seconds", 0) for d in done) / 60, 1),
        "device": (done[0].get("device") if done else None) or prec.get("device_type"),
        "precision": (done[0].get("precision") if done else None) or _precision_name(prec),
    }


def _precision_name(prec: dict) -> str | None:
    from tgs_salt.hardware import Precision

    return Precision.from_dict(prec["precision"]).name if prec.get("precision") else None


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) and v < 1.0001 and v != int(v) else str(v)


def runs_command(args) -> int:
    from tgs_salt import paths

    root = Path(args.dir) if args.dir else paths.runs_dir()
    if not root.is_dir():
        raise UserError(f"{root} is not a directory of runs")
    dirs = [root] if (root / "config.yaml").exists() else sorted(p for p in root.iterdir()
                                                                  if (p / "config.yaml").exists())
    if not dirs:
        print(f"no runs in {root}")
        return 0
    rows = [run_row(d) for d in dirs]
    cols = ["run", "config", "cv_default", "cv_nested", "cv_tuned", "threshold", "min_area", "folds", "epochs", "minutes",
            "device", "precision", "changed"]
    table = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())
    return 0
