import json
import types

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import cli_cmd, interrupt_when, run_cli
from helpers import tiny_config
from tgs_salt import budget as B
from tgs_salt import config as C
from tgs_salt import losses
from tgs_salt.data import load_train
from tgs_salt.data.folds import assign_folds, coverage_class, make_folds, stripe_masks
from tgs_salt.errors import UserError
from tgs_salt.train import TrainingError, next_epoch, observe, phase_costs, time_left, train_fold

# ----------------------------------------------------------------------------- folds

def test_folds_are_stratified_and_deterministic():
    rng = np.random.default_rng(0)
    masks = np.zeros((500, 101, 101), bool)
    for i in range(500):
        if i % 5:
            masks[i, : rng.integers(1, 101)] = True
    ids = np.array([f"id{i}" for i in range(500)])
    a = assign_folds(ids, masks, 5, seed=3)
    assert np.array_equal(a, assign_folds(ids, masks, 5, seed=3))
    assert not np.array_equal(a, assign_folds(ids, masks, 5, seed=4))
    cls = coverage_class(masks)
    for f in range(5):
        assert (a == f).sum() == 100
        assert abs((cls[a == f] == 0).mean() - 0.2) < 0.02


def test_stripe_masks_are_the_vertical_label_artefact():
    m = np.zeros((6, 101, 101), bool)
    m[1] = True                          # all salt: a real kind of mask, kept
    m[2][:, 10:30] = True                # whole columns: the artefact
    m[3][:, 10:30] = True
    m[3][0, 12] = False                  # ... but one pixel short of it: a mask
    m[4][50:, :] = True                  # salt below a flat top
    m[5][:, :40] = True
    m[5][:, 70:] = True                  # two stripe bands
    assert stripe_masks(m).tolist() == [False, False, True, False, False, True]
    assert stripe_masks(m.astype(np.uint8) * 255).tolist() == stripe_masks(m).tolist()


def test_drop_stripe_masks_leaves_them_out_of_training_only(tmp_path, synth_dir):
    from types import SimpleNamespace

    from tgs_salt.train import fold_rows

    cfg, data, folds = _setup(tmp_path, synth_dir, train={
        "batch_size": 4, "select": "last", "max_train_batches": 1, "stages": [{"loss": "bce", "epochs": 1}]})
    masks = data.masks.copy()
    stripes = np.flatnonzero(folds == 1)[:3].tolist() + np.flatnonzero(folds == 0)[:2].tolist()
    for i in stripes:
        masks[i] = False
        masks[i][:, 20:45] = True
    data = SimpleNamespace(**{**vars(data), "masks": masks})
    tr, va = fold_rows(cfg, folds, 0, masks)  # off by default: every image
    assert np.array_equal(tr, np.flatnonzero(folds != 0)) and np.array_equal(va, np.flatnonzero(folds == 0))
    cfg["train"]["drop_stripe_masks"] = True
    tr2, va2 = fold_rows(cfg, folds, 0, masks)
    assert np.array_equal(va2, va)                                   # validation keeps them
    assert sorted(set(tr) - set(tr2)) == sorted(stripes[:3])         # training loses its own three only
    done = train_fold(cfg, 0, tmp_path / "r", data, folds, device=torch.device("cpu"))
    assert done["n_train"] == len(tr) - 3 and done["n_val"] == len(va)


def test_real_stripe_masks(shared_data):
    data = load_train(shared_data)
    s = stripe_masks(data.masks)
    assert s.sum() == 84  # of 3001 (1829 with salt), counted by hand from the PNGs
    assert not (s & ~data.masks.reshape(len(s), -1).any(axis=1)).any()


def test_folds_file_protected(synth_dir, tmp_path):
    p = make_folds(synth_dir, k=3, seed=1, name=str(tmp_path / "f.csv"))
    before = p.read_text()
    assert make_folds(synth_dir, k=3, seed=1, name=str(tmp_path / "f.csv")) == p  # same: no-op
    with pytest.raises(UserError) as e:
        make_folds(synth_dir, k=3, seed=2, name=str(tmp_path / "f.csv"))
    assert "--force" in str(e.value) and p.read_text() == before
    make_folds(synth_dir, k=3, seed=2, name=str(tmp_path / "f.csv"), force=True)
    assert p.read_text() != before
    df = pd.read_csv(p)
    assert list(df.columns) == ["id", "fold"] and sorted(df.fold.unique()) == [0, 1, 2]


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_dir):
    """A tiny 2-fold run through the CLI, shared by several tests."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tmp)
    run_dir = tmp / "run"
    r = run_cli("train", "--config", cfg, "--data-dir", synth_dir, "--run-dir", run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "malloc: freed memory kept" in r.stderr  # train.cpu_malloc keep (the default) on a CPU with glibc
    return cfg, run_dir


def test_train_writes_everything(trained, synth_dir):
    cfg_path, run_dir = trained
    assert (run_dir / "config.yaml").exists() and json.loads((run_dir / "run.json").read_text())["folds_sha1"]
    data = load_train(synth_dir)
    seen = []
    for k in (0, 1):
        fd = run_dir / f"fold{k}"
        for f in ("best.pt", "log.csv", "oof.npz", "done.json"):
            assert (fd / f).exists(), f
        assert not (fd / "last.pt").exists()  # removed once the fold is complete
        log = pd.read_csv(fd / "log.csv")
        assert list(log.epoch) == [0, 1, 2] and list(log.loss_name) == ["bce_dice", "bce_dice", "lovasz"]
        assert log.val_metric.between(0, 1).all() and np.isfinite(log.train_loss).all()
        with np.load(fd / "oof.npz") as z:
            assert z["probs"].dtype == np.float16 and z["probs"].shape[1:] == (101, 101)
            assert 0 <= z["probs"].min() and z["probs"].max() <= 1
            seen += list(z["ids"])
        ck = torch.load(fd / "best.pt", weights_only=True)
        assert set(ck) >= {"model", "config", "fold", "epoch", "metric"}
    assert len(seen) == len(set(seen)) and set(seen) < set(data.ids)   # folds 0 and 1 of 3


def test_completed_folds_are_skipped(trained, synth_dir):
    cfg_path, run_dir = trained
    stamp = (run_dir / "fold0" / "best.pt").stat().st_mtime_ns
    r = run_cli("train", "--config", cfg_path, "--data-dir", synth_dir, "--run-dir", run_dir, "--fold", "0")
    assert r.returncode == 0 and "skipped" in r.stderr
    assert (run_dir / "fold0" / "best.pt").stat().st_mtime_ns == stamp


def test_changed_config_refused(trained, synth_dir, tmp_path):
    cfg_path, run_dir = trained
    other = tiny_config(tmp_path, train={"batch_size": 4})
    r = run_cli("train", "--config", other, "--data-dir", synth_dir, "--run-dir", run_dir, "--fold", "0")
    assert r.returncode != 0 and "different config" in r.stderr and "Traceback" not in r.stderr


def test_fold_out_of_range(trained, synth_dir):
    cfg_path, run_dir = trained
    r = run_cli("train", "--config", cfg_path, "--data-dir", synth_dir, "--run-dir", run_dir, "--fold", "7")
    assert r.returncode != 0 and "out of range" in r.stderr and "Traceback" not in r.stderr


def _setup(tmp_path, synth_dir, **sections):
    cfg = C.load_config(str(tiny_config(tmp_path, **sections)))
    data = load_train(synth_dir)
    folds = assign_folds(data.ids, data.masks, 3, 1)
    return cfg, data, folds


def test_saved_config_missing_a_new_default_key_is_no_change(trained, synth_dir, tmp_path):
    import shutil

    import yaml

    cfg_path, shared = trained
    run_dir = tmp_path / "run"
    shutil.copytree(shared, run_dir)  # a copy: the other tests of the shared run read its config.yaml
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["model"]["norm"]   # as written by an older version of the code
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    r = run_cli("train", "--config", cfg_path, "--data-dir", synth_dir, "--run-dir", run_dir, "--fold", "0")
    assert r.returncode == 0 and "skipped" in r.stderr, r.stderr[-2000:]


# ----------------------------------------------------------------------------- CV report

def test_cv_report(trained, synth_dir):
    cfg_path, run_dir = trained
    r = run_cli("cv", "--run-dir", run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((run_dir / "cv.json").read_text())
    assert out["score"] >= out["score_default_threshold"] - 1e-9   # tuning never hurts on OOF
    assert 0 <= out["score"] <= 1 and set(out["per_fold"]) == {"0", "1"}
    # what the test set gets: tuned only when that wins held out, and its held-out score
    applied = out["applied_postprocess"]
    if out["applied"] == "tuned":
        assert out["score_nested"] > out["score_default_threshold"] and out["score_applied"] == out["score_nested"]
        assert applied["threshold"] == out["threshold"] and applied["min_area"] == out["min_area"]
    else:
        assert out["score_nested"] <= out["score_default_threshold"] == out["score_applied"]
        assert applied == {"threshold": 0.5, "min_area": 0, "cls_threshold": None}
    assert "applied to the test set" in r.stdout
    assert len(out["per_coverage"]) == 11 and sum(b["n"] for b in out["per_coverage"]) == out["n_images"]
    bins = out["per_coverage"]  # bin 0: the empty masks, where an empty prediction is the right one
    assert bins[0]["bin"] == "empty" and all(0 <= b["predicted_empty"] <= b["n"] for b in bins)
    right = bins[0]["predicted_empty"] + sum(b["n"] - b["predicted_empty"] for b in bins[1:])
    assert right == round(out["empty_accuracy"] * out["n_images"]) and "predicted empty" in r.stdout
    assert "CV score:" in r.stdout
    for png in ("score_vs_threshold", "score_by_coverage", "empty_decision", "training_curves",
                "worst_predictions"):
        assert (run_dir / "plots" / f"{png}.png").stat().st_size > 1000


def test_cv_errors(trained, tmp_path, synth_dir):
    import shutil

    cfg_path, run_dir = trained
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "fold1" / "oof.npz").unlink()
    r = run_cli("cv", "--run-dir", broken)
    assert r.returncode != 0 and "fold 1" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("cv", "--run-dir", tmp_path / "nothing")
    assert r.returncode != 0 and "not a training run" in r.stderr
    # a fold file that doesn't match the data
    facts = json.loads((run_dir / "run.json").read_text())
    bad_folds = tmp_path / "folds.csv"
    pd.read_csv(facts["fold_file"]).iloc[5:].to_csv(bad_folds, index=False)
    facts["fold_file"] = str(bad_folds)
    shutil.copytree(run_dir, tmp_path / "b2")
    (tmp_path / "b2" / "run.json").write_text(json.dumps(facts))
    r = run_cli("cv", "--run-dir", tmp_path / "b2")
    assert r.returncode != 0 and "does not match the data" in r.stderr


def test_compare_runs_paired(trained, synth_dir, tmp_path):
    cfg_path, run_dir = trained
    out = tmp_path / "cmp.json"
    r = run_cli("compare", run_dir, run_dir, "--out", out, "--bootstrap", "500")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["nested_method"] == "tuned on the other folds" and res["n_images"] > 0
    for k in ("default_threshold", "nested", "submitted"):
        assert res[k]["gain"] == 0 and res[k]["ci95"] == [0, 0] and res[k]["base"] == res[k]["other"]
    # per-image scores stored as JSON (as the ablation table keeps them) pair as the runs do
    from tgs_salt.compare import paired, run_scores
    from tgs_salt.errors import UserError

    stored = json.loads(json.dumps(run_scores(run_dir)))
    assert set(np.unique(stored["default"])) <= {round(0.1 * k, 4) for k in range(11)}
    worse = {**stored, "default": [max(0.0, x - 0.1) for x in stored["default"]]}
    p = paired(stored, worse, n_boot=200)
    assert p["nested"]["gain"] == 0 and p["default_threshold"]["images_better"] == 0
    assert p["default_threshold"]["gain"] == pytest.approx(np.mean(worse["default"]) - np.mean(stored["default"]))
    # the submission's policy, its choice made held out (postprocess.policy_scores), when both sides kept it
    assert len(stored["policy"]) == len(stored["ids"]) and "submitted" in p
    assert "submitted" not in paired(stored, {k: v for k, v in worse.items() if k != "policy"}, n_boot=200)
    with pytest.raises(UserError, match="different images"):
        paired(stored, {**stored, "ids": stored["ids"][::-1]})
    with pytest.raises(UserError, match="different groups of images"):
        paired(stored, {**stored, "nested_method": "tuned on the other half of the held-out images"})
    # a recorded result (bench/record_run.py keeps per_image) pairs against a run directory
    rec = tmp_path / "recorded.json"
    rec.write_text(json.dumps({"cv_score": 0.5, "per_image": worse}))
    r = run_cli("compare", rec, run_dir, "--out", out, "--bootstrap", "200")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["default_threshold"]["gain"] == pytest.approx(-p["default_threshold"]["gain"], abs=1e-6)
    assert res["nested"]["gain"] == 0 and res["n_images"] == len(stored["ids"])
    from tgs_salt.compare import stored_or_run_scores

    for bad, msg in (({"cv_score": 0.5}, "no per-image scores"),
                     ({"per_image": {**stored, "nested": stored["nested"][1:]}}, "ids but")):
        rec.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=msg):
            stored_or_run_scores(rec)
    rec.write_text("not json")
    r = run_cli("compare", rec, run_dir)
    assert r.returncode != 0 and "not a run directory nor a JSON result" in r.stderr and "Traceback" not in r.stderr
    # several pairs are pooled; runs come in pairs
    rec.write_text(json.dumps({"per_image": worse}))
    r = run_cli("compare", run_dir, rec, run_dir, run_dir, "--out", out, "--bootstrap", "200")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [x["default_threshold"]["gain"] for x in res["pairs"]] == pytest.approx([p["default_threshold"]["gain"], 0])
    pool = res["pooled"]["default_threshold"]
    assert pool["gain"] == pytest.approx(p["default_threshold"]["gain"] / 2, abs=1e-6) and 1 <= pool["df"] < 2
    assert "pooled over 2 pairs" in r.stdout and res["pooled"]["nested"]["ci95"] == [0, 0]
    r = run_cli("compare", run_dir, rec, run_dir)
    assert r.returncode != 0 and "in pairs" in r.stderr and "Traceback" not in r.stderr
    # a list of runs is scored as their equal-weight average (bench/ensemble_gain.py): a run with itself is the run
    from tgs_salt.compare import per_image

    one, two = per_image(run_dir, None), per_image([run_dir, run_dir], None)
    assert np.array_equal(one[0], two[0]) and np.allclose(one[1], two[1]) and np.allclose(one[2], two[2])
    # a run over other folds cannot be paired
    other = tmp_path / "other"
    (other / "fold0").mkdir(parents=True)
    for f in ("config.yaml", "run.json"):
        (other / f).write_bytes((run_dir / f).read_bytes())
    cfg = (other / "config.yaml").read_text().replace("train_folds:\n  - 0\n  - 1", "train_folds:\n  - 0")
    (other / "config.yaml").write_text(cfg)
    (other / "fold0" / "oof.npz").write_bytes((run_dir / "fold0" / "oof.npz").read_bytes())
    r = run_cli("compare", run_dir, other)
    assert r.returncode != 0 and "different images" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- resume and stopping

CTRL_C_IN_A_FINALIZER = """
import signal, sys
from tgs_salt.errors import check_interrupt, sticky_interrupt

class Finalized:
    def __del__(self):  # raise_signal raises the KeyboardInterrupt here, where Python only prints it
        signal.raise_signal(signal.SIGINT)

sticky = sys.argv[1] == "sticky"
with sticky_interrupt() if sticky else open(__file__) as installed:
    assert installed is True or not sticky
    Finalized()
    print("went on", flush=True)
    check_interrupt()
    print("not stopped", flush=True)
"""


@pytest.mark.parametrize("mode", ["sticky", "plain"])
def test_ctrl_c_swallowed_by_a_finalizer_still_stops_the_run(tmp_path, mode):
    """A KeyboardInterrupt raised inside a __del__ is printed and dropped by Python (seen once in CI:
    a run went on to its end after Ctrl-C): under sticky_interrupt the next check_interrupt (each
    training step, each prediction batch) raises it again; with Python's handler alone it is lost."""
    import subprocess
    import sys

    from conftest import REPO

    script = tmp_path / "fin.py"
    script.write_text(CTRL_C_IN_A_FINALIZER)
    r = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=60,
                       check=False, env={"PYTHONPATH": str(REPO / "src"), "PATH": ""})
    assert "Exception ignored" in r.stderr and "KeyboardInterrupt" in r.stderr and "went on" in r.stdout, r.stderr
    if mode == "sticky":
        assert r.returncode != 0 and "not stopped" not in r.stdout
        assert r.stderr.count("KeyboardInterrupt") >= 2  # the swallowed one, then the one that stopped it
    else:
        assert r.returncode == 0 and "not stopped" in r.stdout


def test_check_interrupt_stops_prediction_and_the_handler_is_put_back():
    import signal

    from tgs_salt import errors
    from tgs_salt.hardware import Precision
    from tgs_salt.inference import predict_arrays

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default here")
    with errors.sticky_interrupt() as installed:
        if not installed:  # not the main thread
            pytest.skip("not in the main thread")
        assert signal.getsignal(signal.SIGINT) is errors._on_sigint
        errors._interrupted = True  # as _on_sigint leaves it
        with pytest.raises(KeyboardInterrupt):
            predict_arrays(torch.nn.Identity(), None, np.zeros((2, 101, 101), np.uint8), np.zeros(2, np.float32),
                           torch.device("cpu"), Precision(), False, 1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and not errors._interrupted


def test_resume_after_ctrl_c_gives_the_same_weights(tmp_path, synth_dir):
    """A real process interrupted by SIGINT after its first checkpoint resumes to the very weights
    and log of an uninterrupted run."""
    cfg = tiny_config(tmp_path, train={"ema": 0.9, "stages": [{"loss": "bce_dice", "epochs": 3},
                                                               {"loss": "bce + 0.5*lovasz_symmetric", "epochs": 2}]},
                      folds={"k": 3, "seed": 1, "train_folds": [0]})  # the averaged weights are resumed too
    common = ["train", "--config", cfg, "--data-dir", synth_dir, "--device", "cpu", "--threads", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_cli(*common, "--run-dir", a)
    assert r.returncode == 0, r.stderr[-3000:]
    rc, err = interrupt_when(cli_cmd(*common, "--run-dir", b), b / "fold0" / "last.pt")
    assert rc == 130 and "interrupted" in err and "Traceback" not in err, err[-3000:]
    assert (b / "fold0" / "last.pt").exists() and not (b / "fold0" / "done.json").exists()
    assert not list((b / "fold0").glob(".*tmp*"))  # no half-written checkpoint left
    r = run_cli(*common, "--run-dir", b)  # an unfinished fold is not silently restarted
    assert r.returncode != 0 and "--resume" in r.stderr
    r = run_cli(*common, "--run-dir", b, "--resume")
    assert r.returncode == 0 and "resuming at epoch" in r.stderr, r.stderr[-3000:]
    wa = torch.load(a / "fold0" / "best.pt", weights_only=True)
    wb = torch.load(b / "fold0" / "best.pt", weights_only=True)
    assert wa["epoch"] == wb["epoch"]
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    la = pd.read_csv(a / "fold0" / "log.csv").drop(columns=["seconds", "images_per_s"])
    lb = pd.read_csv(b / "fold0" / "log.csv").drop(columns=["seconds", "images_per_s"])
    pd.testing.assert_frame_equal(la, lb)


def test_stage_and_early_stopping_rule():
    starts = [0, 4, 7]  # stage 0: epochs 0-3, stage 1: 4-6
    assert next_epoch(0, starts, 0, None) == (1, False)
    assert next_epoch(3, starts, 0, None) == (4, True)       # the stage switch
    assert next_epoch(6, starts, 0, None) == (7, False)      # the end: no new stage
    assert next_epoch(1, starts, 2, 2) == (4, True)          # 2 epochs without gain: stage 0 ends early
    assert next_epoch(1, starts, 1, 2) == (2, False)
    assert next_epoch(5, starts, 2, 2) == (7, False)         # in the last stage it ends the fold
    assert next_epoch(3, starts, 5, 2) == (4, True)          # already at the boundary: nothing to skip
    assert observe(0.5, 0.4, 3) == (True, 0.5, 0)
    assert observe(0.4, 0.4, 3) == (False, 0.4, 4)          # a tie is no gain


def test_nan_loss_stops_with_clear_error(tmp_path, synth_dir, monkeypatch):
    cfg, data, folds = _setup(tmp_path, synth_dir, train={
        "batch_size": 8, "stages": [{"loss": "bce", "epochs": 1}, {"loss": "dice", "epochs": 1}]})
    monkeypatch.setitem(losses.LOSSES, "dice", lambda x, y: (x * float("nan")).mean())
    with pytest.raises(TrainingError) as e:
        train_fold(cfg, 0, tmp_path / "r", data, folds, device=torch.device("cpu"))
    assert "nan" in str(e.value) and "epoch 2" in str(e.value)
    ck = torch.load(tmp_path / "r" / "fold0" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_early_stopping_ends_the_stage(tmp_path, synth_dir):
    # a learning rate too small to change anything: the metric never improves after epoch 1
    cfg, data, folds = _setup(tmp_path, synth_dir, train={
        "batch_size": 8, "lr": 1e-12, "warmup_epochs": 0, "early_stopping": 1, "max_train_batches": 1,
        "stages": [{"loss": "bce", "epochs": 5}, {"loss": "lovasz", "epochs": 1}]})
    done = train_fold(cfg, 0, tmp_path / "r", data, folds, device=torch.device("cpu"))
    log = pd.read_csv(tmp_path / "r" / "fold0" / "log.csv")
    assert list(log.epoch) == [0, 1, 5] and list(log.loss_name) == ["bce", "bce", "lovasz"]
    assert done["epochs_run"] == 3


def test_lr_schedules():
    from tgs_salt.train import LRController

    cfg = C.load_config("demo", ["train.warmup_epochs=1", "train.lr=0.01", "train.min_lr_ratio=0.1",
                                 "train.stages=[{loss: bce, epochs: 4}, {loss: lovasz, epochs: 2, lr: 0.002}]"])
    lrc = LRController(cfg)
    assert lrc.lr(0, 0.0) == pytest.approx(0.001)          # warm-up starts at a tenth
    import math

    # warm-up done: on the stage's cosine (a quarter of the way through a 4-epoch stage)
    assert lrc.lr(1, 0.0) == pytest.approx(0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lrc.lr(3, 0.999) == pytest.approx(0.001, rel=1e-3)  # bottom of the stage
    assert lrc.lr(4, 0.0) == pytest.approx(0.002)          # the next stage restarts at its own lr
    cfg["train"]["schedule"] = "linear"
    lrc = LRController(cfg)
    assert lrc.lr(0, 0.5) == pytest.approx(0.0055)         # the same warm-up
    assert lrc.lr(1, 0.0) == pytest.approx(0.001 + 0.009 * 0.75)  # a straight line from lr to lr * min_lr_ratio
    assert lrc.lr(3, 0.0) == pytest.approx(0.001 + 0.009 * 0.25)
    assert lrc.lr(5, 0.5) == pytest.approx(0.0002 + 0.0018 * 0.25)
    cfg["train"]["schedule"] = "plateau"
    cfg["train"]["plateau_patience"] = 2
    lrc = LRController(cfg)
    for m in (0.5, 0.6, 0.6, 0.6):
        lrc.observe(m)
    assert lrc.lr(2, 0.0) == pytest.approx(0.005)           # halved after 2 epochs without gain
    state = lrc.state_dict()
    other = LRController(cfg)
    other.load_state_dict(state)
    assert other.lr(2, 0.5) == lrc.lr(2, 0.5)


def test_committed_real_folds_are_reproducible(shared_data, tmp_path):
    from tgs_salt.paths import REPO_ROOT

    committed = REPO_ROOT / "folds" / "tgs-salt-k5-seed42.csv"
    made = make_folds(shared_data, k=5, seed=42, name=str(tmp_path / "f.csv"))
    assert made.read_text() == committed.read_text()


# ----------------------------------------------------------------------------- classifier head

@pytest.mark.parametrize("arch", ["plain_unet", "Unet"])
def test_classifier_head_trains_and_reaches_oof_and_cv(tmp_path, synth_dir, arch):
    model = {"arch": arch, "cls_head": True, "encoder": "resnet18", "decoder_channels": [16, 8, 8, 8, 8]}
    cfg, data, folds = _setup(tmp_path, synth_dir, model=model, train={
        "batch_size": 8, "select": "last", "max_train_batches": 3,
        "stages": [{"loss": "bce_dice", "epochs": 2}]})
    run = tmp_path / "r"
    done = train_fold(cfg, 0, run, data, folds, device=torch.device("cpu"))
    assert done["select"] == "last" and done["kept_epoch"] == 1  # the last epoch, not the best
    with np.load(run / "fold0" / "oof.npz") as z:
        cls = z["cls"]
        assert cls.shape == (len(z["ids"]),) and ((cls >= 0) & (cls <= 1)).all() and cls.std() > 0
    ck = torch.load(run / "fold0" / "best.pt", weights_only=True)
    assert any(k.startswith(("cls.", "classification_head.")) for k in ck["model"])


def test_deep_supervision_adds_the_side_losses(tmp_path, synth_dir):
    """The same first step with and without the side outputs' loss: the logged loss grows by it, the
    side heads are trained and kept, and inference (OOF) is unchanged in kind."""
    model = {"arch": "Unet", "deep_supervision": True, "encoder": "resnet18", "decoder_channels": [16, 8, 8, 8, 8]}
    train = {"batch_size": 8, "select": "last", "max_train_batches": 1, "stages": [{"loss": "bce_dice", "epochs": 1}]}
    losses, heads = [], []
    for w in (0.0, 1.0):
        cfg, data, folds = _setup(tmp_path, synth_dir, model=model, train=dict(train, side_loss_weight=w))
        run = tmp_path / f"r{w}"
        train_fold(cfg, 0, run, data, folds, device=torch.device("cpu"))
        losses.append(pd.read_csv(run / "fold0" / "log.csv")["train_loss"].iloc[0])
        ck = torch.load(run / "fold0" / "best.pt", weights_only=True)["model"]
        heads.append(ck["decoder.side.0.weight"])
        with np.load(run / "fold0" / "oof.npz") as z:
            assert z["probs"].shape[1:] == (101, 101)
    assert losses[1] > losses[0] + 0.1  # four side outputs, each with a BCE+Dice of about 1 at the start
    assert not torch.allclose(heads[0], heads[1])


def _spy_input_sizes(monkeypatch) -> list:
    """(training?, input height) of every forward pass of the models built from now on."""
    from tgs_salt import models

    seen = []
    build = models.build_model

    def spying_build(*a, **k):
        m = build(*a, **k)
        m.register_forward_pre_hook(lambda mod, args: seen.append((mod.training, args[0].shape[-1])))
        return m

    monkeypatch.setattr(models, "build_model", spying_build)
    return seen


@pytest.mark.parametrize("mode", ["resize", "crop"])
def test_progressive_resizing_trains_the_first_epochs_at_low_res(tmp_path, synth_dir, monkeypatch, mode):
    """train.low_res_size: the first round(fraction x epochs) epochs feed the network images (and
    score masks) scaled to that size (or windows of that size); later epochs, validation and OOF use
    the full input."""
    seen = _spy_input_sizes(monkeypatch)
    train = {"batch_size": 8, "select": "last", "max_train_batches": 2, "low_res_size": 64, "low_res_fraction": 0.4,
             "low_res_mode": mode, "stages": [{"loss": "bce + 0.5*lovasz_symmetric", "epochs": 5}]}
    cfg, data, folds = _setup(tmp_path, synth_dir, input={"resize": 101, "pad_to": 112}, train=train)
    assert C.low_res_epochs(cfg) == 2
    train_fold(cfg, 0, tmp_path / "r", data, folds, device=torch.device("cpu"))
    train_sizes = [s for training, s in seen if training]
    assert train_sizes == [64] * 4 + [112] * 6  # 2 batches per epoch
    assert {s for training, s in seen if not training} == {112}
    log = pd.read_csv(tmp_path / "r" / "fold0" / "log.csv")
    assert log["input_px"].tolist() == [64, 64, 112, 112, 112]
    with np.load(tmp_path / "r" / "fold0" / "oof.npz") as z:
        assert z["probs"].shape[1:] == (101, 101)


def test_a_middle_resolution_phase_follows_the_low_res_one(tmp_path, synth_dir, monkeypatch):
    """train.mid_res_size: after the low-resolution epochs, round(mid_res_fraction x epochs) train at
    the middle size, then the rest at full size; validation and OOF stay at full size."""
    seen = _spy_input_sizes(monkeypatch)
    train = {"batch_size": 8, "select": "last", "max_train_batches": 2, "low_res_size": 64, "low_res_fraction": 0.4,
             "mid_res_size": 96, "mid_res_fraction": 0.2, "stages": [{"loss": "bce + 0.5*lovasz_symmetric", "epochs": 5}]}
    cfg, data, folds = _setup(tmp_path, synth_dir, input={"resize": 101, "pad_to": 112}, train=train)
    assert C.low_res_epochs(cfg) == 2 and C.mid_res_epochs(cfg) == 1
    train_fold(cfg, 0, tmp_path / "r", data, folds, device=torch.device("cpu"))
    assert [s for training, s in seen if training] == [64] * 4 + [96] * 2 + [112] * 4
    assert {s for training, s in seen if not training} == {112}
    assert pd.read_csv(tmp_path / "r" / "fold0" / "log.csv")["input_px"].tolist() == [64, 64, 96, 112, 112]


def test_a_plan_that_grows_never_sends_a_fold_back_to_an_earlier_phase(tmp_path, synth_dir, monkeypatch):
    """Three phases and a time plan that grows twice (a host that sped up): the switches move later
    by the shares, but a fold at the middle size never goes back to the low one,
    nor a full-size one to the middle; the calibrator is told the phase each epoch trained in."""
    seen = _spy_input_sizes(monkeypatch)
    train = {"batch_size": 8, "select": "last", "max_train_batches": 1, "low_res_size": 64, "low_res_fraction": 0.4,
             "mid_res_size": 96, "mid_res_fraction": 0.4, "stages": [{"loss": "bce + 0.5*lovasz_symmetric", "epochs": 5}]}
    cfg, data, folds = _setup(tmp_path, synth_dir, input={"resize": 101, "pad_to": 112}, train=train)
    told = []

    def calibrate(done, seconds, phase):
        told.append(phase)
        return {3: [10], 9: [14]}.get(done)

    done = train_fold(cfg, 0, tmp_path / "r", data, folds, device=torch.device("cpu"), calibrate=calibrate)
    px = pd.read_csv(tmp_path / "r" / "fold0" / "log.csv")["input_px"].tolist()
    # 5 epochs: 0-1 at 64 px, 2-3 at 96, 4 at 112 (0-based). After epoch 2 (at 96 px) the plan grows to 10,
    # whose shares put epochs 0-3 at 64 px and 4-7 at 96: epoch 3 trains at 96, not 64. After epoch 8 (at
    # 112 px) it grows to 14, whose shares put epochs 6-11 at 96: epochs 9-11 train at 112, not 96.
    assert done["epochs_run"] == 14
    assert px == [64, 64] + [96] * 6 + [112] * 6
    assert told == [{64: B.LOW, 96: B.MID, 112: B.FULL}[p] for p in px]
    assert [s for training, s in seen if training] == px  # one batch per epoch


def test_fold_eta_counts_each_resolution_phase_apart():
    """The fold ETA of progressive resizing: the cheap low-res epochs do not set the pace of the
    full-size ones (it read 30 min early in a real run); a phase not seen yet is the latest one seen,
    scaled by pixels."""
    px = {B.LOW: 0.25, B.MID: 0.5, B.FULL: 1.0}
    low_only = {B.LOW: [30.0, 32.0], B.MID: [], B.FULL: []}
    assert time_left(low_only, {B.LOW: 2, B.FULL: 10}, px) == pytest.approx(2 * 31 + 10 * 124)
    assert time_left(low_only, {B.LOW: 2, B.MID: 3, B.FULL: 10}, px) == pytest.approx(2 * 31 + 3 * 62 + 10 * 124)
    both = {B.LOW: [30.0] * 3, B.MID: [], B.FULL: [100.0, 90.0, 80.0, 70.0, 60.0, 50.0]}  # the last five full ones
    assert time_left(both, {B.FULL: 4}, px) == pytest.approx(4 * 70)
    mid = {B.LOW: [30.0], B.MID: [50.0, 54.0], B.FULL: []}  # the full size from the middle one, not the low one
    assert time_left(mid, {B.MID: 1, B.FULL: 2}, px) == pytest.approx(52 + 2 * 104)
    assert time_left({B.LOW: [], B.FULL: [80.0]}, {B.LOW: 3, B.FULL: 1}, {B.LOW: 0.5, B.FULL: 1.0}) == \
        pytest.approx(3 * 40 + 80)
    assert time_left({B.LOW: [], B.FULL: [80.0]}, {B.LOW: 0, B.FULL: 0}, px) == 0


def test_fold_eta_costs_a_phase_not_seen_yet_by_the_time_plan(tmp_path, synth_dir, monkeypatch):
    """A run with a time plan scales the ETA of the phases it has not trained yet by the plan's relative
    costs (measured by its probe), not by pixels: a 64 px epoch costs ~0.4 of a 112 px one on CPU, not
    the 0.33 of its pixels. Without a plan (or without progressive resizing in it), pixels."""
    def size(px):
        return types.SimpleNamespace(geo=types.SimpleNamespace(pad_to=px))

    builders = {B.LOW: size(64), B.MID: None, B.FULL: size(112)}
    pixels = {B.LOW: pytest.approx((64 / 112) ** 2), B.FULL: 1.0}
    assert phase_costs(None, builders) == pixels
    assert phase_costs({"low_res": None}, builders) == pixels
    assert phase_costs({"low_res": {"share": 0.5, "relative_cost": 0.43}}, builders) == {B.LOW: 0.43, B.FULL: 1.0}
    mid = {"share": 0.4, "relative_cost": 0.43, "mid_share": 0.2, "mid_relative_cost": 0.7}
    assert phase_costs({"low_res": mid}, {**builders, B.MID: size(96)}) == {B.LOW: 0.43, B.MID: 0.7, B.FULL: 1.0}
    low = {B.LOW: [9.0, 9.0], B.FULL: []}
    assert time_left(low, {B.LOW: 47, B.FULL: 115}, phase_costs({"low_res": mid}, builders)) == \
        pytest.approx(47 * 9 + 115 * 9 / 0.43)

    # train_fold reads the run's plan: the ETA of its first (64 px) epochs uses the plan's cost
    import tgs_salt.train as T
    told = []
    monkeypatch.setattr(T, "time_left", lambda times, left, costs: told.append(dict(costs)) or 0.0)
    train = {"batch_size": 8, "select": "last", "max_train_batches": 1, "low_res_size": 64, "low_res_fraction": 0.5,
             "stages": [{"loss": "bce + 0.5*lovasz_symmetric", "epochs": 2}]}
    cfg, data, folds = _setup(tmp_path, synth_dir, input={"resize": 101, "pad_to": 112}, train=train)
    (tmp_path / "r").mkdir()
    B.write_plan(tmp_path / "r", {"low_res": {"share": 0.5, "relative_cost": 0.43}})
    train_fold(cfg, 0, tmp_path / "r", data, folds, device=torch.device("cpu"))
    assert told == [{B.LOW: 0.43, B.FULL: 1.0}] * 2
    train_fold(cfg, 0, tmp_path / "p", data, folds, device=torch.device("cpu"))  # no plan: pixels
    assert told[2:] == [pixels] * 2


def test_low_res_epochs_are_validated_only_at_the_switch_unless_asked(tmp_path, synth_dir, monkeypatch):
    """train.low_res_validate false (the default): of the low-resolution epochs only the last is
    validated (their score at full size costs ~20% of such an epoch on CPU); the weights trained are
    the same either way, the log leaves the fields blank, and the curves plot only what was scored."""
    from tgs_salt import report
    from tgs_salt import train as T

    calls = []
    evaluate = T.evaluate
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    train = {"batch_size": 8, "select": "last", "max_train_batches": 2, "low_res_size": 64, "low_res_fraction": 0.6,
             "stages": [{"loss": "bce + 0.5*lovasz_symmetric", "epochs": 5}]}
    weights, logs = {}, {}
    for validate in (False, True):
        cfg, data, folds = _setup(tmp_path, synth_dir, input={"resize": 101, "pad_to": 112},
                                  train=dict(train, low_res_validate=validate))
        assert C.low_res_epochs(cfg) == 3
        calls.clear()
        run = tmp_path / f"v{validate}"
        done = train_fold(cfg, 0, run, data, folds, device=torch.device("cpu"))
        assert len(calls) == (5 if validate else 3) + 1 and done["epochs_run"] == 5  # + the OOF pass
        weights[validate] = torch.load(run / "fold0" / "best.pt", weights_only=True)["model"]
        logs[validate] = pd.read_csv(run / "fold0" / "log.csv", keep_default_na=False)
    blank = logs[False]["val_metric"].astype(str).str.len() == 0
    assert blank.tolist() == [True, True, False, False, False]
    assert (logs[False]["val_loss"].astype(str).str.len() == 0).tolist() == blank.tolist()
    assert not (logs[True]["val_metric"].astype(str).str.len() == 0).any()
    scored = ~blank
    assert np.allclose(logs[False]["val_metric"][scored].astype(float), logs[True]["val_metric"][scored].astype(float))
    assert np.allclose(logs[False]["train_loss"].astype(float), logs[True]["train_loss"].astype(float))
    for k, v in weights[True].items():
        assert torch.equal(v, weights[False][k]), k
    rows = logs[False].astype(str).to_dict("records")
    report.training_curves(tmp_path / "plots", [("r/fold0", rows), ("empty", [])], "test machine")
    assert (tmp_path / "plots" / "training_curves.png").stat().st_size > 1000


def test_val_every_validates_every_nth_full_size_epoch_back_from_the_last(tmp_path, synth_dir, monkeypatch):
    """train.val_every n: of the full-size epochs every n-th is validated, counted back from the last
    (validated as planned; the low-res rule is unchanged). The weights trained are the same as with
    every epoch validated; the time plan's calibration gets each epoch at its average cost: a
    validated epoch less than it took, an unvalidated one more (here validation takes >= 1 s)."""
    import time

    from tgs_salt import train as T

    calls = []
    evaluate = T.evaluate

    def slow_evaluate(*a, **k):
        calls.append(1)
        time.sleep(1.0)
        return evaluate(*a, **k)

    monkeypatch.setattr(T, "evaluate", slow_evaluate)
    train = {"batch_size": 8, "select": "last", "max_train_batches": 2, "low_res_size": 64, "low_res_fraction": 0.25,
             "stages": [{"loss": "bce + 0.5*lovasz_symmetric", "epochs": 8}]}
    weights, logs, seconds = {}, {}, {}
    for every in (1, 3):
        cfg, data, folds = _setup(tmp_path, synth_dir, input={"resize": 101, "pad_to": 112},
                                  train=dict(train, val_every=every))
        assert C.low_res_epochs(cfg) == 2
        calls.clear()
        got = []
        run = tmp_path / f"e{every}"
        done = train_fold(cfg, 0, run, data, folds, device=torch.device("cpu"),
                          calibrate=lambda n, s, low, got=got: got.append(s))
        weights[every] = torch.load(run / "fold0" / "best.pt", weights_only=True)["model"]
        logs[every] = pd.read_csv(run / "fold0" / "log.csv", keep_default_na=False)
        seconds[every] = np.array(got) - logs[every]["seconds"].astype(float).to_numpy()
        assert done["epochs_run"] == 8 and len(calls) == logs[every]["val_metric"].astype(str).str.len().gt(0).sum() + 1
    validated = logs[3]["val_metric"].astype(str).str.len() > 0
    # epochs 0-1 at 64 px (the last validated), 2-7 at full size: 7, 4 counted back from the last
    assert validated.tolist() == [False, True, False, False, True, False, False, True]
    assert (logs[1]["val_metric"].astype(str).str.len() > 0).tolist() == [False, True] + [True] * 6
    assert np.allclose(logs[3]["val_metric"][validated].astype(float), logs[1]["val_metric"][validated].astype(float))
    for k, v in weights[1].items():
        assert torch.equal(v, weights[3][k]), k
    assert np.abs(seconds[1]).max() < 0.1  # every epoch validated: the seconds as taken (rounded to 0.1 in the log)
    # full-size epochs from the first validated one (epoch 4) on: validated ones count 1/3 of a validation
    assert (seconds[3][[4, 7]] < -0.5).all() and (seconds[3][[5, 6]] > 0.25).all()
    assert np.abs(seconds[3][:4]).max() < 0.1  # low-res epochs, and full-size ones before any validation


def test_val_every_keeps_its_spacing_when_the_plan_moves_the_end():
    """A time budget re-plans after every epoch, and the planned end moves by an epoch back and forth.
    Counting back from the moving end validated neighbours and left gaps; counted from the last
    validation, the full-size validations stay n apart up to the end, where the planned last is
    validated (twice over if a re-plan then adds an epoch)."""
    from tgs_salt.train import _last_validated

    def run(totals, every):
        cfg = {"train": {"low_res_size": None, "low_res_validate": False, "val_every": every,
                         "stages": [{"epochs": 0}]}}
        rows, epoch = [], 0
        while epoch < totals[epoch]:
            cfg["train"]["stages"][0]["epochs"] = totals[epoch]
            v = C.validates_epoch(cfg, epoch, False, _last_validated(rows, 112))
            rows.append({"epoch": str(epoch), "val_metric": "0.7" if v else "", "input_px": "112"})
            epoch += 1
        return [int(r["epoch"]) for r in rows if r["val_metric"]], epoch

    fixed, n = run([30] * 40, 5)
    assert n == 30 and fixed == [4, 9, 14, 19, 24, 29]  # a fixed plan: every 5th counted back from the last
    assert run([30] * 40, 1)[0] == list(range(30))
    rng = np.random.default_rng(0)
    for every in (3, 5):
        for _ in range(20):  # an end that wanders by an epoch at every re-plan, then settles
            totals = [50 + int(rng.integers(-1, 2)) for _ in range(49)] + [50] * 20
            got, n = run(totals, every)
            assert n == 50 and got[-1] == 49
            gaps = np.diff(got)  # near the end: the planned last, and again the last when the plan then grows
            assert (gaps[:-2] == every).all() and gaps.max() <= every + (every + 1) // 2 and len(got) <= 50 // every + 2, got
    # a resumed fold: the log's low-res rows and unvalidated rows do not count
    rows = [{"epoch": "3", "val_metric": "0.6", "input_px": "64"}, {"epoch": "5", "val_metric": "0.7", "input_px": "112"},
            {"epoch": "6", "val_metric": "", "input_px": "112"}]
    assert _last_validated(rows, 112) == 5 and _last_validated(rows[:1], 112) is None


def test_amortized_epoch_seconds():
    from tgs_salt.train import amortized_epoch_s

    assert amortized_epoch_s(100.0, 9.0, [9.0], 1) == 100.0
    assert amortized_epoch_s(100.0, 9.0, [], 3) == 100.0
    assert amortized_epoch_s(100.0, 9.0, [6.0, 9.0], 3) == pytest.approx(91 + 7.5 / 3)
    assert amortized_epoch_s(91.0, 0.0, [1.0, 6.0, 9.0, 12.0], 3) == pytest.approx(91 + 9 / 3)


def test_time_plan_counts_a_full_size_epoch_at_its_share_of_validation():
    from tgs_salt import budget as B

    c = {"train_rate": 30.0, "eval_rate": 120.0, "n_train": 2400, "n_val": 600, "n_test": 1000, "n_folds": 1,
         "n_models": 1, "tta": True, "low_res_rate": 90.0, "low_res_share": 0.5, "low_res_validates": False}
    one, five = B.Costs(**c), B.Costs(**c, val_every=5)
    assert one.epoch_s == 2400 / 30 + 600 / 120 + B.EPOCH_OVERHEAD_S
    assert five.epoch_s == pytest.approx(2400 / 30 + 600 / 120 / 5 + B.EPOCH_OVERHEAD_S)
    assert five.low_res["relative_cost"] == round((2400 / 90 + B.EPOCH_OVERHEAD_S) / five.epoch_s, 4)
    more = B.plan_epochs(3600, 60, five, [60])["epochs"][0]
    assert more > B.plan_epochs(3600, 60, one, [60])["epochs"][0]


def test_time_plan_counts_unvalidated_low_res_epochs_cheaper():
    from tgs_salt import budget as B

    c = {"train_rate": 30.0, "eval_rate": 120.0, "n_train": 2400, "n_val": 600, "n_test": 1000, "n_folds": 1,
         "n_models": 1, "tta": True, "low_res_rate": 90.0, "low_res_share": 0.5}
    on, off = B.Costs(**c, low_res_validates=True), B.Costs(**c, low_res_validates=False)
    assert on.epoch_s == off.epoch_s == 2400 / 30 + 600 / 120 + B.EPOCH_OVERHEAD_S
    assert on.low_res["relative_cost"] == round((2400 / 90 + 5 + B.EPOCH_OVERHEAD_S) / on.epoch_s, 4)
    assert off.low_res["relative_cost"] == round((2400 / 90 + B.EPOCH_OVERHEAD_S) / off.epoch_s, 4)


def test_low_res_builder_keeps_the_padding_share():
    from tgs_salt.transforms import Geometry, InputBuilder

    b = InputBuilder(["image", "depth", "row"], Geometry(101, 112, "reflect")).at_size(64)
    assert (b.geo.resize, b.geo.pad_to) == (58, 64)
    x = b(torch.randint(0, 255, (2, 101, 101), dtype=torch.uint8), torch.tensor([100.0, 900.0]))
    assert x.shape == (2, 3, 64, 64)
    y = b.target(torch.ones(2, 101, 101, dtype=torch.bool))
    assert y.shape == (2, 1, 58, 58) and bool(y.all())


def test_crop_builder_takes_the_same_random_window_of_image_and_mask():
    """low_res_mode crop: each image's window lies inside the image (no padding), the mask's is the
    same window, every position is drawn about equally often, and a (epoch, batch) key always draws
    the same windows."""
    from tgs_salt.transforms import IMG_MEAN, IMG_STD, Geometry, InputBuilder

    full = InputBuilder(["image", "depth", "row"], Geometry(101, 112, "reflect"))
    crop = full.cropped(64, seed=5)
    n = 64
    rows = torch.arange(101).view(1, 101, 1).expand(n, 101, 101)
    cols = torch.arange(101).view(1, 1, 101).expand(n, 101, 101)
    img = (rows + 128 * (cols >= 50)).to(torch.uint8)       # the row, +128 right of column 50
    mask = cols >= 50
    x, y = crop.training_pair(img, mask, torch.full((n,), 300.0), key=(3, 7))
    assert x.shape == (n, 3, 64, 64) and y.shape == (n, 1, 64, 64)
    pixel = torch.round(x[:, 0] * IMG_STD * 255 + IMG_MEAN * 255).long()
    top = pixel[:, 0, 0] % 128
    assert (0 <= top).all() and (top <= 37).all()
    assert torch.equal(pixel[:, :, 0] % 128 - top[:, None], torch.arange(64).expand(n, 64))  # 64 image rows in order
    assert torch.equal(pixel >= 128, y[:, 0].bool())  # salt exactly where the image says
    offsets = crop.offsets(n, (3, 7))
    assert torch.equal(top, offsets[:, 0])
    assert torch.equal(y[:, 0, 0].float().argmax(1), 50 - offsets[:, 1])  # salt starts at column 50 of the image
    assert torch.equal(offsets, crop.offsets(n, (3, 7))) and not torch.equal(offsets, crop.offsets(n, (3, 8)))
    many = torch.cat([crop.offsets(1000, (e, 0)) for e in range(20)])  # 20000 windows
    counts = torch.bincount(many.flatten(), minlength=38).float()
    assert len(counts) == 38 and counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    for alone in (lambda: crop(img, torch.zeros(n)), lambda: crop.target(mask)):
        with pytest.raises(TypeError, match="training_pair"):
            alone()


def test_fold_follows_a_plan_changed_between_epochs(tmp_path, synth_dir):
    """The time plan's callback is asked after every epoch; a shorter plan takes effect at once."""
    train = {"batch_size": 8, "max_train_batches": 2, "select": "last",
             "stages": [{"loss": "bce_dice", "epochs": 3}, {"loss": "lovasz", "epochs": 2}]}
    cfg, data, folds = _setup(tmp_path, synth_dir, train=train)
    asked = []

    def calibrate(done, seconds, phase):
        asked.append(done)
        return [2, 1] if done == 1 else None

    done = train_fold(cfg, 0, tmp_path / "r", data, folds, device=torch.device("cpu"), calibrate=calibrate)
    log = pd.read_csv(tmp_path / "r" / "fold0" / "log.csv")
    assert asked == [1, 2, 3] and done["epochs_run"] == 3 and done["epochs_planned"] == 3
    assert log["stage"].tolist() == [0, 0, 1] and log["loss_name"].tolist() == ["bce_dice", "bce_dice", "lovasz"]


# ----------------------------------------------------------------------------- weight averaging

def test_ema_weights_are_validated_and_kept(tmp_path, synth_dir):
    """One step with train.ema: the kept weights are the average of the initial and the trained
    weights with the warmed-up decay 2/11, BatchNorm statistics included."""
    from tgs_salt.models import build_model

    train = {"batch_size": 8, "select": "last", "max_train_batches": 1, "stages": [{"loss": "bce_dice", "epochs": 1}]}
    cfg, data, folds = _setup(tmp_path, synth_dir, train=train)
    plain = train_fold(cfg, 0, tmp_path / "plain", data, folds, device=torch.device("cpu"))
    cfg_ema, _, _ = _setup(tmp_path, synth_dir, train=dict(train, ema=0.99))
    averaged = train_fold(cfg_ema, 0, tmp_path / "ema", data, folds, device=torch.device("cpu"))
    torch.manual_seed(cfg["train"]["seed"])  # fold 0's seed: the same initial weights as both runs
    init = build_model(cfg["model"], len(cfg["input"]["channels"])).state_dict()
    trained = torch.load(tmp_path / "plain" / "fold0" / "best.pt", weights_only=True)["model"]
    kept = torch.load(tmp_path / "ema" / "fold0" / "best.pt", weights_only=True)["model"]
    d = 2 / 11
    for k, v in kept.items():
        expect = d * init[k] + (1 - d) * trained[k] if v.dtype.is_floating_point else trained[k]
        assert torch.allclose(v, expect, atol=1e-6), k
    assert any(not torch.equal(v, trained[k]) for k, v in kept.items() if v.dtype.is_floating_point)
    assert averaged["kept_epoch"] == plain["kept_epoch"] == 0


# ----------------------------------------------------------------------------- paired comparison

def test_bootstrap_interval_covers_the_mean_with_the_right_width():
    from tgs_salt.compare import bootstrap_interval

    assert bootstrap_interval(np.full(50, 0.1)) == pytest.approx((0.1, 0.1))
    d = np.random.default_rng(3).normal(0.05, 0.2, 600)
    lo, hi = bootstrap_interval(d)
    se = d.std() / np.sqrt(len(d))
    assert lo < d.mean() < hi and (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_run_fold_file_found_in_this_checkout_when_its_path_is_gone(tmp_path, monkeypatch):
    """A run directory moved from another checkout scores against the same fold file here."""
    from tgs_salt.errors import UserError
    from tgs_salt.io_utils import sha1_of
    from tgs_salt.report import run_fold_file

    old = tmp_path / "elsewhere" / "folds" / "d-k5-seed42.csv"
    old.parent.mkdir(parents=True)
    old.write_text("id,fold\na,0\nb,1\n")
    facts = {"fold_file": str(old), "folds_sha1": sha1_of(old)}
    assert run_fold_file(facts) == old
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.setenv("TGS_FOLDS_DIR", str(here))
    (here / old.name).write_bytes(old.read_bytes())
    old.unlink()
    assert run_fold_file(facts) == here / old.name
    (here / old.name).write_text("id,fold\na,1\nb,0\n")
    with pytest.raises(UserError, match="differs from it"):
        run_fold_file(facts)
    (here / old.name).unlink()
    with pytest.raises(UserError, match="does not exist; put that file at"):
        run_fold_file(facts)


def _pair_scores(rng, ids, base, run_shift, image_effect, noise):
    """A (base, other) pair of per-image score dicts: other = base + image effect + a run-level shift."""
    other = base + image_effect + run_shift + rng.normal(0, noise, len(ids))
    return ({"ids": ids, "default": base, "nested": base, "nested_method": "m"},
            {"ids": ids, "default": other, "nested": other, "nested_method": "m"})


def test_pooled_interval_counts_the_spread_between_runs():
    from tgs_salt.compare import pooled
    from tgs_salt.errors import UserError

    rng = np.random.default_rng(0)
    n = 200
    ids = [f"i{k}" for k in range(n)]
    base = rng.uniform(0, 1, n)
    # the same gain in every pair: the pooled gain is the mean, and runs add nothing to the interval
    same = [_pair_scores(rng, ids, base, 0.0, np.full(n, 0.01), 0.0) for _ in range(3)]
    r = pooled(same, n_boot=200)["default_threshold"]
    assert r["gain"] == pytest.approx(0.01) and r["ci95"] == pytest.approx([0.01, 0.01])
    assert r["se_runs"] == pytest.approx(0, abs=1e-9) and r["pair_gains"] == pytest.approx([0.01] * 3)
    # two pairs whose runs moved every image by +0.05 and -0.03: the images alone say the gain (+0.01)
    # is certain; the pooled interval, with one degree of freedom for the runs, says it is not
    split = [_pair_scores(rng, ids, base, s, np.zeros(n), 0.0) for s in (0.05, -0.03)]
    r = pooled(split, n_boot=200)["nested"]
    assert r["gain"] == pytest.approx(0.01) and r["ci95_images_only"] == pytest.approx([0.01, 0.01])
    assert r["ci95"][0] < -0.2 and r["ci95"][1] > 0.2 and r["df"] == pytest.approx(1.0)
    # coverage: zero true gain, runs differing by more than the images resolve: the pooled 95% interval
    # covers 0 about 95% of the time over three pairs, the images-alone interval far less often
    covered = covered_images = 0
    trials = 300
    for _ in range(trials):
        pairs = [_pair_scores(rng, ids, base, rng.normal(0, 0.01), np.zeros(n), 0.05) for _ in range(3)]
        r = pooled(pairs, n_boot=200)["default_threshold"]
        covered += r["ci95"][0] <= 0 <= r["ci95"][1]
        covered_images += r["ci95_images_only"][0] <= 0 <= r["ci95_images_only"][1]
    assert 0.9 <= covered / trials <= 0.995 and covered_images / trials < 0.75
    with pytest.raises(UserError, match="at least two pairs"):
        pooled(same[:1])
    moved = {**same[1][1], "ids": ids[::-1]}
    with pytest.raises(UserError, match="pair 2's other holds out other images"):
        pooled([same[0], (same[1][0], moved)])

# ----------------------------------------------------------------------------- TensorBoard

def test_tensorboard_optional(tmp_path, synth_dir, monkeypatch):
    import sys
    import types

    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, step))

        def add_images(self, tag, grid, step, dataformats):
            calls.append(("images", tag, grid.shape, float(grid.min()), float(grid.max()), dataformats))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    cfg, data, folds = _setup(tmp_path, synth_dir, train={
        "batch_size": 8, "tensorboard": True, "max_train_batches": 2, "stages": [{"loss": "bce", "epochs": 2}]})
    train_fold(cfg, 0, tmp_path / "r", data, folds, device=torch.device("cpu"))
    assert calls[0] == ("init", str(tmp_path / "r" / "fold0" / "tb")) and calls[-1] == ("close",)
    assert sum(c[:3] == ("scalar", "val_metric", 2) for c in calls) == 1
    images = [c for c in calls if c[0] == "images"]
    assert len(images) == 2 and images[0][2] == (8, 3, 101, 101) and 0 <= images[0][3] and images[0][4] <= 1
    # an epoch that was not validated (train.low_res_validate): its scalars, no blanks, no grid
    from tgs_salt.tensorboard import TensorBoard

    calls.clear()
    tb = TensorBoard(tmp_path / "tb", True)
    tb.epoch(0, {"train_loss": "0.5", "val_loss": "", "val_metric": "", "val_iou": "", "lr": "1e-3"})
    assert [c[1] for c in calls if c[0] == "scalar"] == ["train_loss", "lr"]
    assert not [c for c in calls if c[0] == "images"]
    # asked for without the package: a clear error before any training
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match="pip install tensorboard"):
        train_fold(cfg, 0, tmp_path / "r2", data, folds, device=torch.device("cpu"))


# ----------------------------------------------------------------------------- shipped configs

@pytest.mark.parametrize("name", ["competition", "cpu_budget", "demo"])
def test_shipped_config_trains_shortened_on_cpu(name, tmp_path, synth_dir):
    """Each shipped recipe with everything it adopted (classifier head, loss stages, weight
    selection), shortened to one epoch per stage and two batches: trains, keeps weights, writes OOF."""
    cfg = C.load_config(name, ["model.encoder_weights=null", "train.batch_size=8", "train.val_batch_size=32",
                               "train.max_train_batches=2", "train.time_budget_minutes=null", "train.amp=false",
                               "train.channels_last=false"])
    for st in cfg["train"]["stages"]:
        st["epochs"] = 1
    data = load_train(synth_dir)
    folds = assign_folds(data.ids, data.masks, 3, 1)
    done = train_fold(cfg, 0, tmp_path / "r", data, folds, device=torch.device("cpu"))
    assert done["epochs_run"] == len(cfg["train"]["stages"]) and done["select"] == cfg["train"]["select"]
    with np.load(tmp_path / "r" / "fold0" / "oof.npz") as z:
        assert ("cls" in z.files) == cfg["model"]["cls_head"] and len(z["ids"]) == (folds == 0).sum()


def test_progress_line_counts_every_process(monkeypatch, caplog):
    """Without a terminal, a line every 30 s: images/s of all data-parallel processes (as the epoch's
    last line), ETA from the batches left."""
    import logging
    import time
    import types

    from tgs_salt import train

    clock = iter([1000.0, 1031.0, 1040.0])
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: next(clock), strftime=time.strftime,
                                                             localtime=time.localtime))
    caplog.set_level(logging.INFO, logger="tgs_salt.train")
    p = train.ProgressLog(fold=0, epoch=4, n_epochs=10, n_batches=75, enabled=True, world=2)
    p.update(done=31, loss=0.5, seen=31 * 16)    # 31 s in: 496 images here, as many in the other process
    p.update(done=40, loss=0.5, seen=40 * 16)    # 9 s later: no line
    (line,) = [r.getMessage() for r in caplog.records]
    assert "epoch 5/10: batch 31/75, loss 0.5000, 32.0 img/s" in line    # 2 x 496 / 31 s
    assert line.endswith(train._clock(1031.0 + 44 * 1.0))


def test_augment_cost_ignores_a_first_call_stall(monkeypatch):
    """The plan's per-image data cost is the best of several passes after unmeasured warm-up calls:
    a one-off stall (first-call initialisation, a busy moment) does not enter the plan."""
    import time as _time

    from tgs_salt import train as T

    calls = []

    class Slow:
        def __init__(self, images, *a):
            self.n = len(images)

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            calls.append(i)
            if len(calls) in (1, 10):  # a stall on the first call, and one in the first measured pass
                _time.sleep(0.2)
            return i

    monkeypatch.setattr(T, "AugmentedArrays", Slow)
    monkeypatch.setattr(T, "build_augment", lambda cfg: None)
    data = types.SimpleNamespace(images=np.zeros((100, 2, 2)), masks=np.zeros((100, 2, 2)), depths=np.zeros(100))
    cost = T._augment_cost({"augment": {}}, data, np.arange(100))
    assert cost < 0.2 / 32 / 4  # neither stall counted (either would add >= 6 ms per image)
    assert len(calls) == 4 + 3 * 32
