import json
import sys
import types

import numpy as np
import pytest
import torch

from conftest import run_cli
from helpers import tiny_config
from tgs_salt.errors import UserError
from tgs_salt.hardware import Precision
from tgs_salt.inference import predict_batch
from tgs_salt.postprocess import PostProcess, apply, decide, is_blank, nested_scores, split_groups, tune
from tgs_salt.predict import predict_test
from tgs_salt.submission import validate_submission
from tgs_salt.transforms import Geometry, InputBuilder

CPU = torch.device("cpu")
FP32 = Precision(None, False)


def _images(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 255, (n, 101, 101), dtype=np.uint8)), torch.tensor([100.0, 500.0][:n])


def test_tta_equivariant_model_unchanged():
    builder = InputBuilder(["image", "row"], Geometry(101, 128))
    img, dep = _images()

    def pixelwise(inp):
        return inp[:, :1] * 1.7

    with_tta, _ = predict_batch(pixelwise, builder, img, dep, CPU, FP32, tta=True)
    without, cls = predict_batch(pixelwise, builder, img, dep, CPU, FP32, tta=False)
    assert cls is None and with_tta.shape == (2, 101, 101)
    torch.testing.assert_close(with_tta, without)


def test_tta_flips_back_and_averages_the_classifier():
    builder = InputBuilder(["image"], Geometry(101, 128))
    img, dep = _images(1)
    x = builder(img, dep)

    def shift_right(inp):  # not flip-equivariant; its "salt logit" depends on the left column
        return torch.roll(inp, 1, dims=-1), inp[:, 0, :, :1].mean(dim=(1, 2)).unsqueeze(1)

    got, cls = predict_batch(shift_right, builder, img, dep, CPU, FP32, tta=True)
    crop = builder.geo.output_to_101
    right = crop(torch.sigmoid(torch.roll(x, 1, dims=-1)))[:, 0]
    left = crop(torch.sigmoid(torch.roll(x, -1, dims=-1)))[:, 0]
    torch.testing.assert_close(got, 0.5 * (right + left))
    assert not torch.allclose(got, right)
    expected = 0.5 * (torch.sigmoid(x[:, 0, :, 0].mean(1)) + torch.sigmoid(x[:, 0, :, -1].mean(1)))
    torch.testing.assert_close(cls, expected)


def test_pad_crop_contract_with_tta():
    """A pixelwise model through the real input builder: TTA changes nothing, the 101x101 image comes back."""
    for resize, pad in ((101, 128), (202, 256), (90, 96)):
        builder = InputBuilder(["image", "depth", "row"], Geometry(resize, pad))
        img = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (2, 101, 101), dtype=np.uint8))
        x = builder(img, torch.tensor([100.0, 500.0]))
        assert x.shape == (2, 3, pad, pad)

        def model(inp):
            return inp[:, :1] * 3.0

        with_tta, _ = predict_batch(model, builder, img, torch.tensor([100.0, 500.0]), CPU, FP32, True)
        without, _ = predict_batch(model, builder, img, torch.tensor([100.0, 500.0]), CPU, FP32, False)
        assert with_tta.shape == (2, 101, 101)
        torch.testing.assert_close(with_tta, without)
        if resize == 101:  # exact crop: recovers the normalised image
            expected = torch.sigmoid(3.0 * builder(img, torch.zeros(2))[:, 0, 13:114, 13:114])
            torch.testing.assert_close(with_tta, expected)


def test_shift_tta_pixelwise_model_unchanged():
    """A pixelwise model sees the same image at every offset: shift TTA (with and without the flip)
    returns what one view does, through the real input builder, for padded and resized inputs."""
    img, dep = _images()

    def model(inp):
        return inp[:, :1] * 2.0 + inp[:, -1:]  # the image and the row plane, which moves with the image

    for resize, pad, shift in ((101, 112, 3), (101, 112, 5), (101, 128, 13), (202, 256, 4), (90, 96, 3)):
        builder = InputBuilder(["image", "depth", "row"], Geometry(resize, pad))
        one, _ = predict_batch(model, builder, img, dep, CPU, FP32, tta=False)
        for tta in (False, True):
            got, _ = predict_batch(model, builder, img, dep, CPU, FP32, tta=tta, shift=shift)
            torch.testing.assert_close(got, one)


def test_shift_tta_averages_the_views_at_their_offsets():
    """A model that sees where the image sits in its canvas: the prediction is the mean of the three
    offsets (centre, +shift and -shift on both axes), each cropped at its own offset; the salt
    probabilities are averaged over the same views."""
    builder = InputBuilder(["image"], Geometry(101, 112))
    img, dep = _images(1)
    pos = torch.arange(112, dtype=torch.float32)
    ramp = 3 * torch.sin(pos / 2).view(1, 1, 1, 112) + torch.cos(pos / 3).view(1, 1, 112, 1)  # not linear

    def model(inp):  # canvas position matters: not shift-equivariant; the salt logit reads the corner
        return inp[:, :1] + ramp, inp[:, 0, :3, :3].mean(dim=(1, 2)).unsqueeze(1)

    got, cls = predict_batch(model, builder, img, dep, CPU, FP32, tta=False, shift=3)
    want, want_cls = [], []
    for before in (5, 8, 2):  # (112 - 101) // 2 = 5, then +3 and -3
        x = (img.float().unsqueeze(1) / 255.0 - 0.47) / 0.16
        x = torch.nn.functional.pad(x, (before, 11 - before, before, 11 - before), mode="reflect")
        want.append(torch.sigmoid(x + ramp)[:, 0, before:before + 101, before:before + 101])
        want_cls.append(torch.sigmoid(x[:, 0, :3, :3].mean(dim=(1, 2))))
    torch.testing.assert_close(got, torch.stack(want).mean(0))
    torch.testing.assert_close(cls, torch.stack(want_cls).mean(0))
    assert (got - want[0]).abs().max() > 0.1
    # with the flip too: six views, the flipped ones flipped back
    got6, _ = predict_batch(model, builder, img, dep, CPU, FP32, tta=True, shift=3)
    flipped = []
    for before in (5, 8, 2):
        x = (img.float().unsqueeze(1) / 255.0 - 0.47) / 0.16
        x = torch.nn.functional.pad(x, (before, 11 - before, before, 11 - before), mode="reflect").flip(-1)
        flipped.append(torch.sigmoid(x + ramp).flip(-1)[:, 0, before:before + 101, before:before + 101])
    torch.testing.assert_close(got6, torch.stack(want + flipped).mean(0))


def test_shift_must_fit_in_the_padding():
    assert (Geometry(101, 112, shift=3).before, Geometry(101, 112, shift=-3).after) == (8, 9)
    with pytest.raises(ValueError, match="does not fit"):
        Geometry(101, 112, shift=-6)
    with pytest.raises(ValueError, match="does not fit"):
        InputBuilder(["image"], Geometry(101, 104)).shifted(4)


class ConstModel:
    def __init__(self, value, cls=None):
        self.value = value

        self.cfg = {"model": {"cls_head": cls is not None}}
        self.cls = cls

    def probs(self, images, depths, tta=True, shift=0):
        c = None if self.cls is None else torch.full((len(images),), float(self.cls))
        return torch.full((len(images), 101, 101), float(self.value)), c


def test_ensemble_averaging_weights_runs_and_folds():
    images = np.zeros((5, 101, 101), np.uint8)
    depths = np.zeros(5, np.float32)
    ens = [([ConstModel(0.2), ConstModel(0.4)], None), ([ConstModel(0.9)], None)]
    out, cls = predict_test(ens, np.array([0.5, 0.5]), images, depths, torch.device("cpu"), batch_size=2)
    assert out.dtype == np.float16 and out.shape == (5, 101, 101) and cls is None
    np.testing.assert_allclose(out, 0.5 * 0.3 + 0.5 * 0.9, atol=1e-3)
    out, _ = predict_test(ens, np.array([0.75, 0.25]), images, depths, torch.device("cpu"), batch_size=3)
    np.testing.assert_allclose(out, 0.75 * 0.3 + 0.25 * 0.9, atol=1e-3)
    # salt probabilities are averaged the same way, when every model has a classifier
    ens = [([ConstModel(0.2, 0.1), ConstModel(0.4, 0.3)], None), ([ConstModel(0.9, 0.8)], None)]
    _, cls = predict_test(ens, np.array([0.75, 0.25]), images, depths, torch.device("cpu"), batch_size=3)
    np.testing.assert_allclose(cls, 0.75 * 0.2 + 0.25 * 0.8, atol=1e-6)
    ens[1][0].append(ConstModel(0.5))  # one model without a classifier: no salt probabilities
    assert predict_test(ens, np.array([0.5, 0.5]), images, depths, torch.device("cpu"), batch_size=3)[1] is None


def test_test_prediction_logs_its_progress(caplog):
    """Not only tqdm's bar (off when the output is not a terminal): a log line with the images done,
    images/s and the ETA every ``log_every`` seconds, none after the last batch."""
    import logging

    images, depths = np.zeros((7, 101, 101), np.uint8), np.zeros(7, np.float32)
    ens = [([ConstModel(0.2)], None)]
    with caplog.at_level(logging.INFO, logger="tgs_salt.predict"):
        predict_test(ens, np.array([1.0]), images, depths, torch.device("cpu"), batch_size=3, log_every=0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("predict: ")]
    assert [ln.split(",")[0] for ln in lines] == ["predict: 3 / 7 test images", "predict: 6 / 7 test images"]
    assert all("images/s, ETA " in ln for ln in lines)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tgs_salt.predict"):
        predict_test(ens, np.array([1.0]), images, depths, torch.device("cpu"), batch_size=3)  # every 30 s
    assert not [r for r in caplog.records if r.getMessage().startswith("predict: ")]


class ViewsModel(ConstModel):
    """Records the test-time views it is asked for."""

    def __init__(self, value):
        super().__init__(value)
        self.calls = set()

    def probs(self, images, depths, tta=True, shift=0):
        self.calls.add((tta, shift))
        return super().probs(images, depths, tta, shift)


def test_each_run_predicts_with_its_own_views():
    """Runs ensembled by `predict` keep the views of their own out-of-fold predictions: a run whose
    time plan dropped the shift views, beside one that kept them (or one whose canvas has no room
    for them), must not get the other's."""
    images, depths = np.zeros((4, 101, 101), np.uint8), np.zeros(4, np.float32)
    a, b, c = ViewsModel(0.2), ViewsModel(0.4), ViewsModel(0.6)
    ens = [([a, b], None), ([c], None)]
    out, _ = predict_test(ens, np.array([0.5, 0.5]), images, depths, torch.device("cpu"), batch_size=3,
                          views=[(True, 3), (True, 0)])
    assert a.calls == b.calls == {(True, 3)} and c.calls == {(True, 0)}
    np.testing.assert_allclose(out, 0.5 * 0.3 + 0.5 * 0.6, atol=1e-3)
    a.calls.clear()
    c.calls.clear()
    predict_test(ens, np.array([0.5, 0.5]), images, depths, torch.device("cpu"), batch_size=3, tta=False, shift=2)
    assert a.calls == c.calls == {(False, 2)}  # no per-run views: the same for every run, as before
    with pytest.raises(ValueError, match="1 test-time view settings for 2 runs"):
        predict_test(ens, np.array([0.5, 0.5]), images, depths, torch.device("cpu"), batch_size=3, views=[(True, 0)])


def test_postprocess_threshold_min_area_and_blank_images():
    probs = np.zeros((3, 101, 101), np.float32)
    probs[0, :10, :10] = 0.8     # 100 px
    probs[1, :3, :3] = 0.8       # 9 px: below min area
    probs[2, :50] = 0.8          # blank image: emptied whatever the model says
    images = np.random.default_rng(0).integers(0, 255, (3, 101, 101)).astype(np.uint8)
    images[2] = 97
    assert is_blank(images).tolist() == [False, False, True]
    m = apply(probs, PostProcess(0.5, 20), images)
    assert m[0].sum() == 100 and m[1].sum() == 0 and m[2].sum() == 0
    assert apply(probs, PostProcess(0.85, 0)).sum() == 0


def _salt_case(n=120, seed=0):
    """Truth: half the images empty. Probabilities: a fair mask on the salt images, and a
    confident false blob on a third of the empty ones, which a classifier knows to be empty."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, 101, 101), bool)
    probs = np.zeros((n, 101, 101), np.float32)
    salt = np.arange(n) % 2 == 0
    for i in np.flatnonzero(salt):
        h = int(rng.integers(20, 80))
        truth[i, :h] = True
        probs[i, :h] = 0.7
    false = ~salt & (np.arange(n) % 3 == 0)
    probs[false, 40:70, 40:70] = 0.9
    cls = np.where(salt, 0.8, 0.05).astype(np.float32)
    return probs, truth, cls, false


def test_classifier_threshold_empties_masks_and_is_tuned():
    probs, truth, cls, false = _salt_case()
    cfg = {"postprocess": {"thresholds": [0.05, 0.95, 19], "min_areas": [0, 10], "default_threshold": 0.5}}
    m = apply(probs, PostProcess(0.5, 0, 0.5), cls=cls)
    assert not m[false].any() and m[::2].any(axis=(1, 2)).all()
    assert apply(probs, PostProcess(0.5, 0, None), cls=cls)[false].all(axis=0)[50, 50]  # off: masks kept
    best, sweep = tune(probs, truth, cfg, cls)
    assert best.cls_threshold is not None and 0.05 < best.cls_threshold <= 0.8
    assert sweep["score_tuned"] == pytest.approx(1.0)
    plain, sweep_plain = tune(probs, truth, cfg)  # no classifier: the false blobs cost their images
    assert plain.cls_threshold is None and sweep_plain["score_tuned"] == pytest.approx(1 - false.mean())


def test_nested_scores_tune_on_the_other_groups_only():
    probs, truth, cls, false = _salt_case(n=90)
    cfg = {"postprocess": {"thresholds": [0.05, 0.95, 19], "min_areas": [0], "default_threshold": 0.5}}
    # group 1 holds the only images where the blobs are real salt: tuned on it alone, the
    # classifier cut would remove them, so its nested post-processing must come from group 0
    truth2, cls2 = truth.copy(), cls.copy()
    groups = (np.arange(90) >= 45).astype(int)
    special = false & (groups == 1)
    truth2[special, 40:70, 40:70] = True
    scores, chosen = nested_scores(probs, truth2, cfg, groups, cls2)
    assert [c["group"] for c in chosen] == [0, 1]
    assert chosen[1]["cls_threshold"] > 0.05  # learnt on group 0, where blobs are false
    assert scores[special].max() == 0.0       # so group 1's real blobs are emptied: an honest loss
    _, same = tune(probs, truth2, cfg, cls2)  # tuned on all the images it scores: optimistic
    assert scores.mean() < same["score_tuned"]
    groups1, how = split_groups(np.zeros(90, int))
    assert set(np.unique(groups1)) == {0, 1} and abs(groups1.sum() - 45) <= 1 and "half" in how
    assert split_groups(np.arange(90) % 5)[0].tolist() == (np.arange(90) % 5).tolist()


def test_decide_applies_tuning_only_where_it_wins_held_out():
    """postprocess.tune auto: under-confident salt (p = 0.35) is found only below the default 0.5, so
    the tuned threshold wins on held-out halves and is applied; with exact 0/1 probabilities every
    threshold scores alike, tuning gains nothing held out, and the untuned default stays."""
    rng = np.random.default_rng(0)
    truth = np.zeros((60, 101, 101), bool)
    truth[::2, 20:60, 30:80] = True
    probs = np.where(truth, 0.35, 0.05).astype(np.float32) + rng.uniform(0, 0.05, truth.shape).astype(np.float32)
    groups = np.arange(60) % 2
    cfg = {"postprocess": {"thresholds": [0.05, 0.95, 19], "min_areas": [0, 10], "default_threshold": 0.5,
                           "tune": "auto"}}
    pp, how = decide(probs, truth, cfg, groups)
    assert how["applied"] == "tuned" and 0.1 <= pp.threshold < 0.35 and how["score_applied"] == pytest.approx(1.0)
    assert how["sweep"]["score_default"] == pytest.approx(0.5) and "nested tuning 1.0000 > untuned 0.5000" in how["why"]
    exact = truth.astype(np.float32)
    pp, how = decide(exact, truth, cfg, groups)
    assert how["applied"] == "untuned" and pp == PostProcess(0.5, 0, None) and "<=" in how["why"]
    for mode, want in ((True, "tuned"), (False, "untuned")):
        forced = {"postprocess": {**cfg["postprocess"], "tune": mode}}
        assert decide(probs, truth, forced, groups)[1]["applied"] == want



def test_score_table_search_matches_a_sweep_per_classifier_cut():
    """ScoreTable.search (sums of per-image scores) finds what a threshold sweep over the pixels at
    every classifier cut finds (the search it replaced), on any subset of the images."""
    from tgs_salt.metric import per_image_scores, threshold_sweep
    from tgs_salt.postprocess import CLS_GRID, ScoreTable

    probs, truth, cls, _ = _salt_case(n=90)
    probs = np.clip(probs + np.random.default_rng(1).uniform(-0.3, 0.3, probs.shape), 0, 1).astype(np.float32)
    th, areas = np.round(np.linspace(0.05, 0.95, 19), 6), np.array([0, 10, 150])
    table = ScoreTable(probs, truth, th, areas, cls)
    for sel in (np.ones(90, bool), np.arange(90) % 3 != 0, np.arange(90) < 30):
        best, best_score = None, -1.0
        for c in CLS_GRID:
            p = probs[sel] if not c else np.where((cls[sel] < c)[:, None, None], 0, probs[sel])
            grid = threshold_sweep(p, truth[sel], th, areas)
            a, k = np.unravel_index(int(np.argmax(grid)), grid.shape)
            if grid[a, k] > best_score + 1e-12:
                best, best_score, best_grid = PostProcess(float(th[k]), int(areas[a]), float(c)), grid[a, k], grid
        pp, score, grid = table.search(sel)
        assert pp == best and score == pytest.approx(best_score) and np.allclose(grid, best_grid)
        scored = per_image_scores(apply(probs[sel], pp, cls=cls[sel]), truth[sel]).mean()
        assert scored == pytest.approx(score)
    no_cls = ScoreTable(probs, truth, th, areas)
    pp, score, grid = no_cls.search()
    assert pp.cls_threshold is None and np.allclose(grid, threshold_sweep(probs, truth, th, areas))


def test_tune_params_restrict_the_search_to_what_they_name():
    """postprocess.tune_params: the classifier cut alone keeps the default threshold and no minimum
    area, and makes the choice the full search makes among those settings; the threshold alone keeps
    the classifier's cut at 0.5. The policy scores and the decision follow the restricted search."""
    from tgs_salt.postprocess import CLS_GRID, policy_scores, score_table

    probs, truth, cls, _ = _salt_case(n=90)
    probs = np.clip(probs + np.random.default_rng(1).uniform(-0.3, 0.3, probs.shape), 0, 1).astype(np.float32)
    base = {"thresholds": [0.05, 0.95, 19], "min_areas": [0, 10, 150], "default_threshold": 0.5, "tune": True}
    full = {"postprocess": base}
    cut = {"postprocess": {**base, "tune_params": ["cls_cut"]}}
    t_full, t_cut = score_table(probs, truth, full, cls), score_table(probs, truth, cut, cls)
    assert t_cut.th.tolist() == [0.5] and t_cut.areas.tolist() == [0] and t_cut.cuts() == list(CLS_GRID)
    for sel in (np.ones(90, bool), np.arange(90) % 3 != 0):
        grids = t_full.grids(sel)[:, :1, list(t_full.th).index(0.5)]  # min area 0, threshold 0.5
        pp, score, _ = t_cut.search(sel)
        assert (pp.threshold, pp.min_area) == (0.5, 0) and score == pytest.approx(grids.max())
        assert pp.cls_threshold == CLS_GRID[int(np.argmax(grids[:, 0]))]
    th_only = score_table(probs, truth, {"postprocess": {**base, "tune_params": ["threshold"]}}, cls)
    assert th_only.cuts() == [0.5] and th_only.areas.tolist() == [0] and len(th_only.th) == 19
    assert th_only.search()[0].cls_threshold == 0.5
    groups = np.arange(90) % 2
    pp, how = decide(probs, truth, cut, groups, cls)
    assert how["applied"] == "tuned" and (pp.threshold, pp.min_area) == (0.5, 0)
    scores, chosen = policy_scores(probs, truth, cut, groups, cls)
    assert all((c["threshold"], c["min_area"]) == (0.5, 0) for c in chosen)
    assert not np.array_equal(scores, policy_scores(probs, truth, full, groups, cls)[0])


def test_policy_scores_make_the_choice_held_out():
    """postprocess.policy_scores: each group gets what auto picks from the other groups alone, so
    no group's truth takes part in its own choice; where every group agrees with the whole, the
    figure is the applied one's."""
    from tgs_salt.postprocess import policy_scores

    rng = np.random.default_rng(0)
    truth = np.zeros((80, 101, 101), bool)
    truth[np.arange(80) % 4 < 2, 20:60, 30:80] = True  # salt in half of each group's images
    probs = np.where(truth, 0.35, 0.05).astype(np.float32) + rng.uniform(0, 0.05, truth.shape).astype(np.float32)
    groups = np.arange(80) % 2
    cfg = {"postprocess": {"thresholds": [0.05, 0.95, 19], "min_areas": [0, 10], "default_threshold": 0.5,
                           "tune": "auto"}}
    _, how = decide(probs, truth, cfg, groups)
    assert [c["applied"] for c in how["policy_postprocess"]] == ["tuned", "tuned"]
    assert how["score_policy"] == pytest.approx(how["score_applied"]) == pytest.approx(1.0)
    exact = truth.astype(np.float32)
    _, how = decide(exact, truth, cfg, groups)
    assert [c["applied"] for c in how["policy_postprocess"]] == ["untuned", "untuned"]
    assert how["score_policy"] == how["score_applied"] == how["sweep"]["score_default"]
    # group 0's truth changed: its choice is unchanged (made on group 1), its score is not
    scores, chosen = policy_scores(probs, truth, cfg, groups)
    truth2 = truth.copy()
    truth2[groups == 0] = ~truth2[groups == 0]
    scores2, chosen2 = policy_scores(probs, truth2, cfg, groups)
    assert chosen2[0] == chosen[0] and chosen2[1] != chosen[1]
    assert scores2[groups == 0].mean() < scores[groups == 0].mean()
    # the forced modes: true is the nested figure, false the untuned one
    nested, _ = nested_scores(probs, truth, cfg, groups)
    assert np.array_equal(policy_scores(probs, truth, {"postprocess": {**cfg["postprocess"], "tune": True}},
                                         groups)[0], nested)
    untuned_scores = policy_scores(probs, truth, {"postprocess": {**cfg["postprocess"], "tune": False}}, groups)[0]
    assert untuned_scores.mean() == pytest.approx(0.5)
    # folds as groups: the choice for each comes from the others' own nested split by fold
    three = np.arange(80) % 3
    _, chosen3 = policy_scores(probs, truth, cfg, three)
    assert [c["group"] for c in chosen3] == [0, 1, 2] and all(c["applied"] == "tuned" for c in chosen3)

@pytest.fixture(scope="module")
def predicted(tmp_path_factory, synth_dir):
    tmp = tmp_path_factory.mktemp("pred")
    # with shift TTA (predict.tta_shift): the OOF pass and the test prediction take 6 views
    cfg = tiny_config(tmp, train={"stages": [{"loss": "bce_dice", "epochs": 1}]}, predict={"tta_shift": 3})
    run_dir = tmp / "run"
    r = run_cli("train", "--config", cfg, "--data-dir", synth_dir, "--run-dir", run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    sub = tmp / "sub.csv"
    r = run_cli("predict", "--run-dir", run_dir, "--data-dir", synth_dir, "--out", sub)
    assert r.returncode == 0, r.stderr[-2000:]
    return run_dir, sub, r


def test_predict_writes_a_valid_submission(predicted, synth_dir):
    run_dir, sub, r = predicted
    assert r.stdout.strip().splitlines()[-1] == str(sub)
    v = validate_submission(sub, synth_dir / "sample_submission.csv")
    assert v.ok and v.rows == 20
    with np.load(run_dir / "test_probs.npz") as z:
        assert z["probs"].dtype == np.float16 and z["probs"].shape == (20, 101, 101)
    info = json.loads((run_dir / "submission.json").read_text())
    assert info["models"] == 2 and info["postprocess"]["cls_threshold"] is None
    assert set(info["postprocess"]) == {"threshold", "min_area", "cls_threshold"}
    cv = json.loads((run_dir / "cv.json").read_text()) if (run_dir / "cv.json").exists() else None
    assert info["postprocess_applied"] in ("tuned", "untuned") and "tuning" in info["postprocess_why"]
    if info["postprocess_applied"] == "untuned":
        assert info["postprocess"]["threshold"] == 0.5 and info["postprocess"]["min_area"] == 0
    if cv is not None:  # cv and predict make the same decision from the same OOF predictions
        assert cv["applied"] == info["postprocess_applied"] and cv["applied_postprocess"] == info["postprocess"]


def test_oof_and_test_predictions_take_the_shift_tta_views(predicted, synth_dir):
    """Training's OOF pass and the test prediction both average the 6 views ``predict.tta_shift``
    asks for: the OOF file matches the kept weights' 6-view probabilities, not their 2-view ones."""
    from tgs_salt.data import load_train
    from tgs_salt.data.folds import folds_for
    from tgs_salt.inference import FoldModel, predict_arrays

    run_dir, _, r = predicted
    assert "x 6 TTA views" in r.stderr
    data = load_train(synth_dir)
    facts = json.loads((run_dir / "run.json").read_text())
    held = np.flatnonzero(folds_for(data.ids, __import__("pathlib").Path(facts["fold_file"])) == 0)
    m = FoldModel(run_dir / "fold0" / "best.pt", CPU)
    with np.load(run_dir / "fold0" / "oof.npz") as z:
        order = {i: k for k, i in enumerate(z["ids"])}
        oof = z["probs"].astype(np.float32)[[order[i] for i in data.ids[held]]]
    args = (m.model, m.builder, data.images[held], data.depths[held], CPU, m.precision, True, 16)
    six, _ = predict_arrays(*args, shift=3)
    two, _ = predict_arrays(*args)
    # a one-epoch model is nearly flat: compare as stored (float16), pixel by pixel
    same_six = (oof == six.astype(np.float16).astype(np.float32)).mean()
    same_two = (oof == two.astype(np.float16).astype(np.float32)).mean()
    assert same_six > 0.99 and same_two < 0.9, (same_six, same_two)


def test_fold_model_drops_a_bf16_choice_this_cpu_would_emulate(predicted, tmp_path, monkeypatch, caplog):
    """A checkpoint whose run picked bf16 by itself on a native-bf16 CPU, loaded on an AVX2-only one:
    predict runs this CPU's rule (fp32), says so, and keeps bf16 where it is native."""
    import logging

    from tgs_salt import hardware as H
    from tgs_salt.inference import FoldModel
    from tgs_salt.rundir import load_checkpoint, save_checkpoint

    run_dir, _, _ = predicted
    ck = load_checkpoint(run_dir / "fold0" / "best.pt")
    ck["config"]["train"]["amp"] = "auto"
    ck["precision"] = {"dtype": "bfloat16", "channels_last": False, "reason": "fastest of 4 measured", "rates": {}}
    save_checkpoint(ck, tmp_path / "bf16.pt")
    ck["config"]["train"]["amp"] = True  # bf16 set in the config: obeyed anywhere
    save_checkpoint(ck, tmp_path / "bf16_set.pt")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(H, "cpu_flags", lambda limit=None: {"avx2", "fma"})
    with caplog.at_level(logging.INFO, logger="tgs_salt.inference"):
        assert FoldModel(tmp_path / "bf16.pt", CPU).precision.name == "fp32+channels_last"
    assert "the training run's bf16+NCHW would be emulated here" in caplog.text
    assert FoldModel(tmp_path / "bf16_set.pt", CPU).precision.name == "bf16+NCHW"
    monkeypatch.setattr(H, "cpu_flags", lambda limit=None: {"avx2", "fma", "avx512f", "avx512_bf16"})
    assert FoldModel(tmp_path / "bf16.pt", CPU).precision.name == "bf16+NCHW"


def test_predict_ensemble_of_runs_and_cv(predicted, synth_dir, tmp_path):
    run_dir, _, _ = predicted
    r = run_cli("cv", "--run-dir", run_dir, "--run-dir", run_dir, "--weights", "1,3", "--no-plots",
                env={"TGS_RUNS_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    single = run_cli("cv", "--run-dir", run_dir, "--no-plots")
    # the same run twice is the run itself
    assert r.stdout.strip().splitlines()[-2] == single.stdout.strip().splitlines()[-2]
    r = run_cli("predict", "--run-dir", run_dir, "--run-dir", run_dir, "--weights", "1", "--data-dir", synth_dir)
    assert r.returncode != 0 and "--weights" in r.stderr


def test_predict_ensemble_of_runs_with_different_views(predicted, synth_dir, tmp_path):
    """Two runs, one with the 6 shift views and one with the 2 flip views (as when its time plan
    dropped them): each run's models predict with its own views, and the submission validates."""
    import shutil

    import yaml

    run_dir, _, _ = predicted
    flip_only = tmp_path / "flip_only"
    shutil.copytree(run_dir, flip_only)
    cfg_path = flip_only / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["predict"]["tta_shift"] = 0
    cfg_path.write_text(yaml.safe_dump(cfg))
    sub = tmp_path / "two_runs.csv"
    r = run_cli("predict", "--run-dir", run_dir, "--run-dir", flip_only, "--data-dir", synth_dir, "--out", sub,
                env={"TGS_RUNS_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "x 2/6 TTA views" in r.stderr
    assert validate_submission(sub, synth_dir / "sample_submission.csv").ok
    info = json.loads((tmp_path / f"ensemble-{run_dir.name}+flip_only" / "submission.json").read_text())
    assert info["views"] == [6, 2] and info["runs"] == [str(run_dir), str(flip_only)]


def _as_if_older(cfg: dict) -> dict:
    """A config as a run made before three keys existed, with one key removed since."""
    del cfg["predict"]["tta_shift"], cfg["postprocess"]["tune"], cfg["model"]["cls_head"]
    cfg["train"]["an_option_removed_since"] = 1
    return cfg


def test_runs_from_before_newer_keys_still_load(predicted, synth_dir, tmp_path):
    """A run whose config.yaml and checkpoints lack keys added since (and hold one removed since)
    reads with today's defaults for the missing keys: the 2 flip views, not its own 6."""
    import shutil

    import torch
    import yaml

    from tgs_salt.config import DEFAULTS, for_reading

    run_dir = tmp_path / "older"
    shutil.copytree(predicted[0], run_dir)
    cfg_path = run_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(_as_if_older(yaml.safe_load(cfg_path.read_text()))))
    for ck_path in run_dir.glob("fold*/*.pt"):
        ck = torch.load(ck_path, weights_only=True)
        ck["config"] = _as_if_older(ck["config"])
        torch.save(ck, ck_path)
    got = for_reading(yaml.safe_load(cfg_path.read_text()))
    assert got["predict"]["tta_shift"] == DEFAULTS["predict"]["tta_shift"] == 0
    assert got["postprocess"]["tune"] == "auto" and got["model"]["cls_head"] is False
    assert got["train"]["an_option_removed_since"] == 1 and got["train"]["lr"] == 3e-3  # its own values kept
    r = run_cli("predict", "--run-dir", run_dir, "--data-dir", synth_dir, "--out", tmp_path / "sub.csv")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "x 2 TTA views" in r.stderr
    assert validate_submission(tmp_path / "sub.csv", synth_dir / "sample_submission.csv").ok
    r = run_cli("cv", "--run-dir", run_dir, "--no-plots")
    assert r.returncode == 0, r.stderr[-2000:]


def test_predict_untrained_fold_error(synth_dir, tmp_path):
    cfg = tiny_config(tmp_path, train={"stages": [{"loss": "bce", "epochs": 1}], "max_train_batches": 1},
                      folds={"k": 3, "seed": 1, "train_folds": [0, 1]})
    r = run_cli("train", "--config", cfg, "--data-dir", synth_dir, "--run-dir", tmp_path / "r", "--fold", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("predict", "--run-dir", tmp_path / "r", "--data-dir", synth_dir)
    assert r.returncode != 0 and "fold 1" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- submit

class FakeApi:
    def __init__(self, error=None):
        self.error, self.sent = error, []

    def authenticate(self):
        pass

    def competition_submit(self, file_name, message, competition):
        if self.error:
            raise self.error
        self.sent.append((file_name, message, competition))
        return types.SimpleNamespace(message="Successfully submitted")


@pytest.fixture
def valid_sub(tmp_path):
    sample = tmp_path / "sample.csv"
    sample.write_text("id,rle_mask\na,1 1\nb,1 1\n")
    sub = tmp_path / "sub.csv"
    sub.write_text("id,rle_mask\na,1 5\nb,\n")
    return sub, sample


def _with_api(monkeypatch, api):
    monkeypatch.setitem(sys.modules, "kaggle", types.SimpleNamespace(api=api))
    monkeypatch.setenv("KAGGLE_USERNAME", "u")
    monkeypatch.setenv("KAGGLE_KEY", "k")


def test_submit_success_and_dry_run(monkeypatch, valid_sub):
    from tgs_salt.submit import submit

    sub, sample = valid_sub
    api = FakeApi()
    _with_api(monkeypatch, api)
    assert "dry run" in submit(sub, "msg", sample, dry_run=True) and api.sent == []
    out = submit(sub, "msg", sample)
    assert "Successfully submitted" in out
    assert api.sent == [(str(sub), "msg", "tgs-salt-identification-challenge")]


def test_submit_errors(monkeypatch, valid_sub, tmp_path):
    from tgs_salt.submit import submit

    sub, sample = valid_sub
    _with_api(monkeypatch, FakeApi(RuntimeError("403 Client Error: Forbidden for url")))
    with pytest.raises(UserError) as e:
        submit(sub, "m", sample)
    assert "rules" in str(e.value)
    _with_api(monkeypatch, FakeApi(ConnectionError("Connection refused")))
    with pytest.raises(UserError) as e:
        submit(sub, "m", sample)
    assert "network" in str(e.value)
    for v in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(v)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "none"))
    with pytest.raises(UserError) as e:
        submit(sub, "m", sample)
    assert "kaggle.json" in str(e.value)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,rle_mask\na,1 5\n")
    r = run_cli("submit", bad, "-m", "x", "--sample", sample, "--dry-run")
    assert r.returncode != 0 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_real_data_end_to_end(shared_data, tmp_path):
    """A few batches on the real subset, then a submission for its 1000 test images that validates
    against its sample_submission.csv (skipped without ../shared/tgs-salt)."""
    cfg = tiny_config(tmp_path, train={"stages": [{"loss": "bce_dice", "epochs": 1}], "max_train_batches": 3,
                                       "val_batch_size": 128},
                      folds={"k": 5, "seed": 42, "train_folds": [2]}, predict={"batch_size": 250})
    run_dir = tmp_path / "run"
    r = run_cli("train", "--config", cfg, "--data-dir", shared_data, "--run-dir", run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(run_dir / "fold2" / "oof.npz") as z:
        assert len(z["ids"]) in (600, 601)
    sub = tmp_path / "sub.csv"
    r = run_cli("predict", "--run-dir", run_dir, "--data-dir", shared_data, "--out", sub)
    assert r.returncode == 0, r.stderr[-2000:]
    v = validate_submission(sub, shared_data / "sample_submission.csv")
    assert v.ok and v.rows == 1000


# ----------------------------------------------------------------------------- pseudo-labels

def _fake_source(tmp_path, probs, cls=None, pp=None, folds=(0,), sha="abc"):
    src = tmp_path / "src"
    src.mkdir()
    ids = np.array([f"t{i}" for i in range(len(probs))])
    np.savez(src / "test_probs.npz", ids=ids, probs=probs.astype(np.float16), **({} if cls is None else {"cls": cls}))
    (src / "submission.json").write_text(json.dumps({"postprocess": pp or {"threshold": 0.5, "min_area": 0,
                                                                             "cls_threshold": None}}))
    (src / "run.json").write_text(json.dumps({"folds_sha1": sha}))
    for k in folds:
        (src / f"fold{k}").mkdir()
        (src / f"fold{k}" / "done.json").write_text("{}")
    return src, ids


def test_pseudo_labels_keep_confident_images_with_the_submission_masks(tmp_path):
    from tgs_salt.data.kaggle_io import TestSet
    from tgs_salt.pseudo import confidence, load_pseudo

    rng = np.random.default_rng(0)
    probs = np.zeros((4, 101, 101), np.float32)
    probs[0, :50] = 0.98                          # sure: salt on top
    probs[1] = rng.uniform(0.3, 0.7, (101, 101))   # unsure
    probs[2] = 0.01                               # sure: empty
    probs[3, :, :60] = 0.95                       # sure salt, but the classifier is unsure (0.6)
    cls = np.array([0.99, 0.5, 0.01, 0.6], np.float32)
    assert confidence(probs)[[0, 2]].min() > 0.95 and confidence(probs)[1] < 0.3
    src, ids = _fake_source(tmp_path, probs, cls, {"threshold": 0.5, "min_area": 0, "cls_threshold": 0.3})
    images = rng.integers(0, 255, (5, 101, 101), dtype=np.uint8)
    test = TestSet(np.array(["t3", "x", "t0", "t1", "t2"]), images, np.arange(5, dtype=np.float32))
    ps = load_pseudo(src, test, 0.9)
    assert ps.ids.tolist() == ["t0", "t2"] and ps.facts["images"] == 2 and ps.facts["non_empty"] == 1
    assert (ps.images[0] == images[2]).all() and ps.depths.tolist() == [2.0, 4.0]   # matched by id
    assert ps.masks[0][:50].all() and not ps.masks[0][50:].any() and not ps.masks[1].any()
    assert len(load_pseudo(src, test, 0.0)) == 4
    # whether a fold's held-out images taught the models behind the labels
    assert not ps.fold_facts("abc", 0)["leaks_held_out"]
    assert ps.fold_facts("abc", 1)["leaks_held_out"] and ps.fold_facts("other", 0)["leaks_held_out"]
    with pytest.raises(UserError, match="lower train.pseudo_confidence"):
        load_pseudo(src, test, 1.0)
    with pytest.raises(UserError, match="not test images of this data"):
        load_pseudo(src, TestSet(np.array(["t0"]), images[:1], np.zeros(1, np.float32)), 0.5)
    (src / "submission.json").unlink()
    with pytest.raises(UserError, match="submission.json is missing"):
        load_pseudo(src, test, 0.5)


def test_train_with_pseudo_labels_from_a_finished_run(predicted, synth_dir, tmp_path):
    run_dir, _, _ = predicted
    cfg = tiny_config(tmp_path, train={"stages": [{"loss": "bce", "epochs": 1}], "max_train_batches": 2,
                                       "pseudo_labels": str(run_dir), "pseudo_confidence": 0.0})
    out = tmp_path / "pl"
    r = run_cli("train", "--config", cfg, "--data-dir", synth_dir, "--run-dir", out, "--fold", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    done = json.loads((out / "fold0" / "done.json").read_text())
    pl = done["pseudo_labels"]
    assert pl["images"] == pl["of"] == 20 and pl["from"] == str(run_dir)
    assert pl["leaks_held_out"]  # the source's fold-1 model trained on fold 0's held-out images
    assert "CV is optimistic" in r.stderr
    facts = json.loads((out / "run.json").read_text())
    assert facts["pseudo_labels_sha1"] == pl["test_probs_sha1"]
    # the same run directory as the source, or a source never predicted: clear errors
    r = run_cli("train", "--config", cfg, "--data-dir", synth_dir, "--run-dir", run_dir, "--fold", "0",
                "--set", f"train.pseudo_labels={run_dir}")
    assert r.returncode != 0 and "is the run directory being trained" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", "--config", cfg, "--data-dir", synth_dir, "--run-dir", tmp_path / "x", "--fold", "0",
                "--set", f"train.pseudo_labels={tmp_path}")
    assert r.returncode != 0 and "test_probs.npz is missing" in r.stderr and "Traceback" not in r.stderr
