"""torchrun with gloo on CPU: one fold data-parallel on 2 processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, interrupt_when, run_cli
from helpers import tiny_config

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                                reason="torchrun not installed")


def torchrun_cmd(*args, nproc=2) -> list:
    exe = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    return [exe, "--standalone", f"--nproc-per-node={nproc}", "-m", "tgs_salt", *map(str, args)]


def torchrun(*args, nproc=2):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(torchrun_cmd(*args, nproc=nproc), capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


def test_ddp_fold_matches_single_process(synth_dir, tmp_path):
    # group norm, fp32 and SGD: the 2 x 2 data-parallel run sees exactly the global batches of 4
    # that the single process sees, so the two must agree up to floating-point summation order
    # (SGD, whose step is proportional to the gradient; Adam's normalised step amplifies rounding
    # differences of near-zero gradients)
    cfg = tiny_config(tmp_path, model={"arch": "plain_unet", "base_channels": 4, "encoder_weights": None,
                                       "norm": "group"},
                      train={"batch_size": 4, "amp": False, "sync_bn": True, "warmup_epochs": 0,
                             "optimizer": "sgd", "lr": 0.05,
                             "stages": [{"loss": "bce_lovasz", "epochs": 1}]})
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    r = torchrun("train", "--config", cfg, "--data-dir", synth_dir, "--run-dir", ddp_dir, "--fold", "0",
                 "--device", "cpu")
    assert r.returncode == 0, r.stderr[-4000:]
    r1 = run_cli("train", "--config", cfg, "--data-dir", synth_dir, "--run-dir", single_dir, "--fold", "0",
                 "--device", "cpu", "--threads", "1")
    assert r1.returncode == 0, r1.stderr[-4000:]

    fd = ddp_dir / "fold0"
    assert sorted(p.name for p in fd.iterdir() if not p.name.startswith(".")) == ["best.pt", "done.json", "log.csv",
                                                                                 "oof.npz"]  # .lock: the trainer lock
    assert len((fd / "log.csv").read_text().strip().splitlines()) == 1 + 1   # one writer, no duplicate rows
    done = json.loads((fd / "done.json").read_text())
    assert done["world_size"] == 2
    assert len(done["weights_sha1_per_rank"]) == 2 and len(set(done["weights_sha1_per_rank"])) == 1

    log_ddp = (fd / "log.csv").read_text().splitlines()[1].split(",")
    log_one = (single_dir / "fold0" / "log.csv").read_text().splitlines()[1].split(",")
    for col in (4, 5):  # train loss (reduced over ranks) and validation loss agree
        assert abs(float(log_ddp[col]) - float(log_one[col])) < 1e-3, (log_ddp, log_one)
    a = torch.load(fd / "best.pt", weights_only=True)["model"]
    b = torch.load(single_dir / "fold0" / "best.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=k)
    with np.load(fd / "oof.npz") as za, np.load(single_dir / "fold0" / "oof.npz") as zb:
        assert list(za["ids"]) == list(zb["ids"])
        assert np.abs(za["probs"].astype(np.float32) - zb["probs"].astype(np.float32)).max() < 5e-3


def test_ddp_resume_after_interruption(synth_dir, tmp_path):
    cfg = tiny_config(tmp_path, train={"batch_size": 8, "max_train_batches": 2, "amp": False,
                                       "stages": [{"loss": "bce", "epochs": 3}]})
    common = ("train", "--config", cfg, "--data-dir", synth_dir, "--fold", "1", "--device", "cpu")
    r = torchrun(*common, "--run-dir", tmp_path / "a")
    assert r.returncode == 0, r.stderr[-4000:]
    fd = tmp_path / "b" / "fold1"
    rc, err = interrupt_when(torchrun_cmd(*common, "--run-dir", tmp_path / "b"), fd / "last.pt",
                             env={"OMP_NUM_THREADS": "1"})
    assert rc != 0, err[-3000:]
    assert (fd / "last.pt").exists() and not (fd / "done.json").exists()
    r = torchrun(*common, "--run-dir", tmp_path / "b", "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    a = torch.load(tmp_path / "a" / "fold1" / "best.pt", weights_only=True)
    b = torch.load(fd / "best.pt", weights_only=True)
    assert a["epoch"] == b["epoch"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=1e-5, msg=k)
    r = torchrun(*common, "--run-dir", tmp_path / "b")
    assert r.returncode == 0 and "skipped" in r.stderr


def _sync_bn_rank(rank: int, init: str, x: torch.Tensor, w: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    from tgs_salt.distributed import convert_sync_batchnorm_cpu

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    bn = convert_sync_batchnorm_cpu(torch.nn.Sequential(torch.nn.BatchNorm2d(5))).double()
    with torch.no_grad():
        bn[0].weight.copy_(torch.linspace(0.5, 2, 5))
        bn[0].bias.copy_(torch.linspace(-1, 1, 5))
    half = slice(0, 2) if rank == 0 else slice(2, 6)          # unequal shares: counts are all-reduced too
    xr = x[half].clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    (bn(xr) * w[half]).sum().backward()
    grads = [torch.zeros_like(p.grad) for p in bn.parameters()]
    for g, p in zip(grads, bn.parameters()):
        g.copy_(p.grad)
        dist.all_reduce(g)                                        # the sum of the processes' losses
    torch.save({"x": xr.grad.detach(), "w": grads[0], "b": grads[1], "rm": bn[0].running_mean.clone(),
                "rv": bn[0].running_var.clone()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_cpu_sync_batchnorm_matches_one_batch(tmp_path):
    """train.sync_bn on a CPU: two processes with 2 and 4 images get the gradients and running
    statistics that BatchNorm2d gives the 6 images in one process."""
    import torch.multiprocessing as mp

    x = torch.randn(6, 5, 7, 9, dtype=torch.float64) * 3 + 1
    w = torch.randn_like(x)
    mp.spawn(_sync_bn_rank, args=((tmp_path / "pg").as_uri(), x, w, str(tmp_path)), nprocs=2, join=True)
    out = {r: torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)}

    ref = torch.nn.BatchNorm2d(5).double()
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 2, 5))
        ref.bias.copy_(torch.linspace(-1, 1, 5))
    xa = x.clone().requires_grad_()
    (ref(xa) * w).sum().backward()
    torch.testing.assert_close(torch.cat([out[0]["x"], out[1]["x"]]), xa.grad)
    for r in range(2):
        torch.testing.assert_close(out[r]["w"], ref.weight.grad)
        torch.testing.assert_close(out[r]["b"], ref.bias.grad)
        torch.testing.assert_close(out[r]["rm"], ref.running_mean)
        torch.testing.assert_close(out[r]["rv"], ref.running_var)


def test_ddp_ranks_train_the_encoder_the_plan_switched_to(synth_dir, tmp_path):
    """model.larger_encoder under torchrun: the main process probes resnet18, plans, probes resnet34 and
    plans again; every rank then trains resnet34 in the precision probed for it (the same weights on
    both ranks, the checkpoint holds resnet34's extra blocks, done.json's precision is precision.json's)."""
    model = {"arch": "Unet", "encoder": "resnet18", "encoder_weights": None, "encoder_depth": 3,
             "decoder_channels": [16, 8, 4], "larger_encoder": "resnet34", "larger_encoder_min_epochs": 1}
    cfg = tiny_config(tmp_path, model=model, train={"max_train_batches": 1, "batch_size": 4},
                      folds={"k": 3, "seed": 1, "train_folds": [0]})
    run = tmp_path / "run"
    r = torchrun("train", "--config", cfg, "--data-dir", synth_dir, "--run-dir", run, "--fold", "0",
                 "--device", "cpu", "--time-budget", "1")
    assert r.returncode == 0, r.stderr[-4000:]
    plan = json.loads((run / "plan.json").read_text())
    prec = json.loads((run / "precision.json").read_text())
    assert plan["encoder"] == "resnet34" and prec["encoder"] == "resnet34" and "model.larger_encoder" in r.stderr
    done = json.loads((run / "fold0" / "done.json").read_text())
    assert done["world_size"] == 2 and len(set(done["weights_sha1_per_rank"])) == 1
    ck = torch.load(run / "fold0" / "best.pt", weights_only=True)
    assert ck["config"]["model"]["encoder"] == "resnet34" and "encoder.layer1.2.conv1.weight" in ck["model"]
    assert ck["precision"] == prec["precision"]
