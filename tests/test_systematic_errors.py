"""bench/systematic_errors.py: the score lost per kind of image, from hand-made per-image scores;
bench/stripe_completion.py: its column completion, on hand-made masks; bench/record_run.py: the CPU
kind a recorded run trained under."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    """bench/<name>.py imported as a module (the scripts import bench/common.py)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


@pytest.fixture(scope="module")
def summarize():
    return bench_module("systematic_errors").summarize


def test_score_lost_splits_by_kind_and_finds_what_every_run_misses(summarize):
    masks = np.zeros((5, 10, 10), bool)
    masks[1, :1] = True      # 10% salt: coverage bin 10-20%
    masks[2, :5] = True      # 50%: bin 50-60%
    masks[3] = True          # 100%: bin 90-100%
    masks[4, 0, :5] = True   # 5%: bin 0-10%
    scores = np.array([[0.0, 0.0, 0.5, 1.0, 0.0],    # run 1: a false positive on the empty image
                       [1.0, 0.0, 0.7, 0.0, 0.0]])   # run 2: not on it, the full mask missed
    r = summarize(["e", "a", "b", "c", "d"], scores, masks, ["r1", "r2"])
    assert r["mean_score"] == pytest.approx(scores.mean(), abs=1e-4)
    run1, run2 = r["per_run"]
    assert run1["empty truth, salt predicted"] == pytest.approx(1 / 5)
    assert run1["salt, scored 0"] == pytest.approx(2 / 5) and run1["salt, partly right"] == pytest.approx(0.5 / 5)
    assert run2["empty truth, salt predicted"] == 0 and run2["salt, scored 0"] == pytest.approx(3 / 5)
    for run, s in zip(r["per_run"], scores, strict=True):  # the kinds add up to all the score lost
        lost = run["empty truth, salt predicted"] + run["salt, scored 0"] + run["salt, partly right"]
        assert lost == pytest.approx(1 - s.mean(), abs=2e-4)
    every = r["scored_0_by_every_run"]
    assert every["images"] == 2 and every["empty_truth"] == 0
    assert [x["id"] for x in every["with_salt"]] == ["a", "d"]
    bins = {b["bin"]: b for b in r["by_coverage"]}
    assert bins["empty"]["scored_0_per_run"] == 0.5 and bins["empty"]["scored_0_by_every_run"] == 0
    assert bins["90-100%"]["scored_0_per_run"] == 0.5 and bins["0-10%"]["scored_0_by_every_run"] == 1
    assert bins["20-30%"]["n"] == 0 and bins["20-30%"]["mean_score"] is None
    stripe = r["stripe_masks"]  # salt in whole rows is no stripe mask, nor is the full one
    assert stripe["n"] == 0 and stripe["mean_score"] is None
    masks[2] = False
    masks[2][:, :5] = True  # columns 0-4 all salt: a stripe mask
    r = summarize(["e", "a", "b", "c", "d"], scores, masks, ["r1", "r2"])
    assert r["stripe_masks"] == {"n": 1, "mean_score": 0.6, "score_lost_of_all": pytest.approx(0.4 / 5),
                                 "scored_0_per_run": 0.0}


def test_scores_a_result_did_not_keep_are_a_clear_error(tmp_path):
    """Results recorded before the choice's own held-out score was kept have no 'policy' scores:
    --score policy on them exits 1 naming the file, before any data is read, and writes nothing."""
    import json
    import subprocess

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"per_image": {"ids": ["a", "b"], "default": [1.0, 0.0], "nested": [1.0, 0.0],
                                             "nested_method": "halves"}}))
    p = subprocess.run([sys.executable, str(BENCH / "systematic_errors.py"), "x_test", str(old),
                        "--data-dir", str(tmp_path / "absent"), "--score", "policy"],
                       capture_output=True, text=True, cwd=BENCH, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"error: {old}: keeps no per-image 'policy' scores" in p.stderr
    assert not list((BENCH / "results").glob("systematic_errors_x_test*"))


@pytest.fixture(scope="module")
def stripe_completion():
    return bench_module("stripe_completion")


def test_column_completion_fills_only_near_vertical_masks(stripe_completion):
    pred = np.zeros((3, 10, 10), bool)
    pred[0, :, 2:5] = True
    pred[0, 9, 4] = False            # a stripe with one pixel missing: completed
    pred[0, :2, 7] = True            # and a column only 2/10 salt: emptied by the completion
    pred[1, 3:6, 3:6] = True         # a blob: its completion (no column half salt) is empty, IoU 0: kept
    done, hit = stripe_completion.complete(pred, 0.9)
    assert hit.tolist() == [True, False, False]          # the empty mask is left alone too
    expect = np.zeros((10, 10), bool)
    expect[:, 2:5] = True
    assert np.array_equal(done[0], expect)
    assert np.array_equal(done[1], pred[1]) and not done[2].any()
    # the same stripe is kept as predicted at a stricter level: its completion differs by 3 of 32 pixels
    assert not stripe_completion.complete(pred, 0.95)[1][0]


def test_record_run_names_the_cpu_kind_the_run_trained_under(monkeypatch):
    from tgs_salt import hardware as H

    run_hardware = bench_module("record_run").run_hardware
    recorder = {"cpu": "AMD EPYC", "cpu_kind": "AVX-512 bf16", "native_bf16": True, "cores": 2}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # the label a limited run writes, from the code that writes it
    limited = H.cpu_kind({"avx2", "fma", "avx512f", "avx512_bf16"})
    assert limited == "AVX2 only (ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 bf16 CPU)"
    assert H.kind_limit(limited) == "AVX2" and H.kind_limit("AVX-512 bf16") == ""
    hw = run_hardware(recorder, {"cpu_kind": limited})
    assert hw["cpu_kind"] == limited and hw["isa_limit"] == "AVX2" and hw["native_bf16"] is False
    assert hw["recorded_under"] == "AVX-512 bf16" and hw["cpu"] == "AMD EPYC" and hw["cores"] == 2
    # recorded under a limit, the run without one: the limit is the recorder's, not the run's
    under = {**recorder, "cpu_kind": limited, "native_bf16": False, "isa_limit": "AVX2"}
    hw = run_hardware(under, {"cpu_kind": "AMX bf16"})
    assert hw["cpu_kind"] == "AMX bf16" and hw["native_bf16"] is True and "isa_limit" not in hw
    # the same kind, or no precision.json (a GPU run, an old run): the recorder's block unchanged
    assert run_hardware(recorder, {"cpu_kind": "AVX-512 bf16"}) is recorder
    assert run_hardware(recorder, None) is recorder


def test_result_file_names_say_when_the_isa_was_limited(monkeypatch):
    from tgs_salt import hardware as H

    kind_tag = bench_module("common").kind_tag
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(H, "cpu_flags", lambda *a, **k: {"avx2", "fma", "avx512f", "avx512_bf16"})
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert kind_tag() == "avx512" and kind_tag("cuda") == "gpu"
    # limited to AVX2, the same CPU measures as an AVX2 one: its file must not take a genuine AVX2 host's name
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert H.cpu_kind().startswith("AVX2 only") and kind_tag() == "avx2isa"
    # a genuine AVX2 host keeps the plain name, limited or not (the limit takes nothing from it)
    monkeypatch.setattr(H, "cpu_flags", lambda *a, **k: {"avx2", "fma"})
    assert kind_tag() == "avx2"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert kind_tag() == "avx2"
