"""What a shorter precision probe costs: the probe a time budget under an hour runs (``budget.probe_effort``:
each timing lasts 1.5 s x budget/60 min instead of 1.5 s, the extra rounds as always) against the full
one, measured in one run on this machine, alternating efforts within each round.

    python bench/bench_probe_effort.py [--config cpu_budget] [--data-dir ../shared/tgs-salt]
                                       [--efforts 1,0.1,0.0167] [--rounds 3]

For each effort: the probe's seconds (``setup_precision`` as a budgeted run calls it: the precision
candidates, the inference rate, the augmentation cost and the low/middle-resolution step costs), the
precision it picks, and what that pick costs in training speed: the full-effort rate of the picked
candidate against the fastest one's (each candidate's median full-effort rate over the rounds, the
reference). Without ``--data-dir`` it runs on a synthetic set made in a temporary folder.
"""

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from common import kind_tag, save

from tgs_salt import hardware as H
from tgs_salt.config import load_config
from tgs_salt.data import load_train
from tgs_salt.data.synth import write_synthetic
from tgs_salt.train import setup_precision


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cpu_budget")
    p.add_argument("--data-dir", default=None, help="Kaggle-layout data (default: a synthetic set of 1000)")
    p.add_argument("--efforts", default="1,0.1,0.0167", help="probe efforts (budget minutes / 60), comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    efforts = [float(e) for e in a.efforts.split(",")]
    cfg = load_config(a.config, ["train.amp=auto", "train.channels_last=auto"])
    device = torch.device("cpu")
    H.apply_cpu_malloc(cfg["train"], device)
    with tempfile.TemporaryDirectory(prefix="probe-effort-") as tmp:
        data_dir = Path(a.data_dir) if a.data_dir else write_synthetic(Path(tmp) / "data", n_train=1000, n_test=10)
        data = load_train(data_dir)
        idx = np.random.default_rng(0).permutation(len(data.ids))
        n_val = len(idx) // 5
        val_idx, train_idx = np.sort(idx[:n_val]), np.sort(idx[n_val:])
        runs: dict[float, list[dict]] = {e: [] for e in efforts}
        for r in range(a.rounds):
            for e in (efforts if r % 2 == 0 else efforts[::-1]):
                t0 = time.perf_counter()
                out = setup_precision(Path(tmp) / f"run_{r}_{e}", cfg, device, data, train_idx, val_idx,
                                      want_rates=True, budget_min=60.0 * e)
                took = time.perf_counter() - t0
                runs[e].append({"seconds": round(took, 1), "pick": H.Precision.from_dict(out["precision"]).name,
                                "rates": out["precision"].get("rates", {}),
                                **{k: out[k]["step_cost_vs_full"] for k in ("low_res", "mid_res") if k in out}})
                print(f"round {r + 1}, effort {e:g}: {took:.1f} s, {runs[e][-1]['pick']}", flush=True)
    full = runs[max(efforts)]
    cands = {n for run in full for n in run["rates"]}
    ref = {n: statistics.median(run["rates"][n] for run in full if n in run["rates"]) for n in cands}
    best = max(ref.values())
    summary = {}
    for e, rs in runs.items():
        summary[f"{e:g}"] = {
            "budget_minutes": round(60 * e, 1),
            "probe_seconds_median": statistics.median(r["seconds"] for r in rs),
            "picks": dict(Counter(r["pick"] for r in rs)),
            "speed_of_pick_vs_fastest": round(statistics.mean(ref[r["pick"]] / best for r in rs), 3),
            **{f"{k}_step_cost_median": statistics.median(r[k] for r in rs) for k in ("low_res", "mid_res")
               if all(k in r for r in rs)},
        }
    for e, s in summary.items():
        print(f"effort {e}: probe {s['probe_seconds_median']:.1f} s, picks {s['picks']}, "
              f"pick's speed {s['speed_of_pick_vs_fastest']:.3f} of the fastest")
    save(f"probe_effort_{a.config}_{kind_tag()}", {
        "what": "setup_precision (the budgeted run's probe) at each effort, alternating; the pick's full-effort "
                "training rate against the fastest candidate's (medians over the rounds at the largest effort)",
        "config": a.config, "data": str(a.data_dir or "synthetic, 1000 images"), "rounds": a.rounds,
        "reference_rates_img_s": ref, "summary": summary, "runs": {f"{e:g}": rs for e, rs in runs.items()}})


if __name__ == "__main__":
    main()
