import pytest
import torch
import yaml

from tgs_salt import config as C
from tgs_salt.errors import UserError
from tgs_salt.losses import LOSSES, bce, dice, get_loss, lovasz_hinge, lovasz_symmetric
from tgs_salt.models import UnetSideDecoder, build_model, take_side_logits


def write_cfg(tmp_path, body: dict):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


R18 = ["model.encoder=resnet18"]  # cpu_budget trains tu-resnet10t; these tests look inside a ResNet18


def test_shipped_configs_load():
    for name in ("competition", "cpu_budget", "demo"):
        cfg = C.load_config(name)
        assert cfg["name"] == name
        assert cfg["augment"]["vflip"] == 0.0
        assert "depth" in cfg["input"]["channels"]


def test_unknown_key_lists_allowed(tmp_path):
    with pytest.raises(UserError) as e:
        C.load_config(str(write_cfg(tmp_path, {"train": {"epochz": 3}})))
    assert "epochz" in str(e.value) and "batch_size" in str(e.value)


@pytest.mark.parametrize("body,needle", [
    ({"model": {"arch": "Unett"}}, "plain_unet"),
    ({"model": {"encoder": "resnet35"}}, "resnet34"),
    ({"model": {"encoder_weights": "/no/such/file.pth"}}, "null"),
    ({"train": {"stages": [{"loss": "nope", "epochs": 1}]}}, "lovasz"),
    ({"train": {"stages": [{"loss": "bce + x*dice", "epochs": 1}]}}, "weight 'x' of dice"),
    ({"train": {"stages": [{"loss": "bce + -1*dice", "epochs": 1}]}}, "must be positive"),
    ({"train": {"ema": 1.5}}, "train.ema"),
    ({"train": {"stages": [{"loss": "bce", "epochs": 0}]}}, "positive"),
    ({"train": {"optimizer": "lion"}}, "adamw"),
    ({"input": {"channels": ["image", "colour"]}}, "image_x_row"),
    ({"input": {"pad_to": 100}}, "multiple of 32"),
    ({"input": {"resize": 8}}, "input.resize = 8"),
    ({"input": {"resize": 130}}, "input.pad_to = 128; a multiple of 32 (2^5 for model.encoder_depth 5) and >= input.resize"),
    ({"input": {"pad_to": 112}}, "multiple of 32 (2^5 for model.encoder_depth 5)"),
    ({"model": {"encoder_depth": 4}, "input": {"pad_to": 112}}, "needs one per encoder stage: model.encoder_depth = 4"),
    ({"model": {"encoder_depth": 6}}, "model.encoder_depth = 6; 3, 4 or 5"),
    ({"augment": {"hflip": 2}}, "augment.hflip = 2; a number >= 0 and <= 1"),
    ({"train": {"low_res_size": 48}}, "train.low_res_size = 48; null or a multiple of 32 below input.pad_to (128)"),
    ({"train": {"low_res_size": 128}}, "below input.pad_to"),
    ({"train": {"low_res_fraction": 1.5}}, "train.low_res_fraction"),
    ({"train": {"mid_res_size": 96}}, "train.mid_res_size = 96; null or a multiple of 32 between train.low_res_size (None"),
    ({"train": {"low_res_size": 64, "mid_res_size": 80}}, "train.mid_res_size = 80"),
    ({"train": {"low_res_size": 64, "mid_res_size": 128}}, "and input.pad_to (128)"),
    ({"train": {"low_res_size": 64, "mid_res_size": 96, "low_res_mode": "crop"}}, "resize mode"),
    ({"train": {"low_res_size": 64, "mid_res_size": 96, "low_res_fraction": 0.6, "mid_res_fraction": 0.5}},
     "train.low_res_fraction 0.6 + train.mid_res_fraction 0.5 is more than all the epochs"),
    ({"train": {"empty_fraction": 0}}, "train.empty_fraction"),
    ({"model": {"zero_init_residual": True, "encoder_weights": "imagenet"}}, "model.zero_init_residual is for smp"),
    ({"model": {"zero_init_residual": True, "arch": "plain_unet"}}, "model.zero_init_residual is for smp"),
    ({"model": {"stem_width": 2}}, "model.stem_width = 2"),
    ({"train": {"empty_fraction": 1.5}}, "train.empty_fraction"),
    ({"train": {"small_mask_weight": 0}}, "train.small_mask_weight = 0; a number > 0"),
    ({"train": {"small_mask_coverage": 1.5}}, "train.small_mask_coverage"),
    ({"train": {"small_mask_coverage": 0}}, "train.small_mask_coverage"),
    ({"train": {"low_res_mode": "zoom"}}, "train.low_res_mode"),
    ({"train": {"val_every": 0}}, "train.val_every = 0"),
    ({"train": {"val_every": 1.5}}, "train.val_every"),
    ({"predict": {"tta_shift": 14}}, "predict.tta_shift = 14; at most 13 px"),
    ({"predict": {"tta_shift": -1}}, "predict.tta_shift"),
    ({"input": {"pad_to": 112}, "model": {"encoder_depth": 4}, "predict": {"tta_shift": 6}}, "at most 5 px"),
    ({"input": {"resize": 101, "pad_to": 160}, "train": {"low_res_size": 128, "low_res_mode": "crop"}},
     "the window must fit in the 101 px image"),
])
def test_bad_values_name_the_choices(tmp_path, body, needle):
    with pytest.raises(UserError) as e:
        C.load_config(str(write_cfg(tmp_path, body)))
    assert needle in str(e.value)


def test_overrides_and_unknown_config_name():
    cfg = C.load_config("demo", ["train.batch_size=8", "model.encoder_weights=null"])
    assert cfg["train"]["batch_size"] == 8 and cfg["model"]["encoder_weights"] is None
    with pytest.raises(UserError) as e:
        C.load_config("nope")
    assert "cpu_budget" in str(e.value)
    with pytest.raises(UserError):
        C.load_config("demo", ["train.batch_size"])
    # scaled down to 90 px in a 96 px canvas: the 3 px TTA shift still fits in the padding
    cfg = C.load_config("cpu_budget", ["input.resize=90", "input.pad_to=96"])
    assert (cfg["input"]["resize"], cfg["input"]["pad_to"], cfg["predict"]["tta_shift"]) == (90, 96, 3)


@pytest.mark.parametrize("arch", ["plain_unet", "plain_unet_strided", "fcn"])
def test_plain_baselines_shapes(arch):
    for norm in ("batch", "group"):
        m = build_model(dict(C.DEFAULTS["model"], arch=arch, base_channels=8, norm=norm), 3)
        assert m(torch.zeros(2, 3, 128, 128)).shape == (2, 1, 128, 128)
        assert any(isinstance(x, torch.nn.GroupNorm if norm == "group" else torch.nn.BatchNorm2d)
                   for x in m.modules())


def test_smp_unet_with_scse_and_local_weights(tmp_path):
    with pytest.raises(UserError) as e:
        C.load_config("cpu_budget", ["model.decoder_attention=scse", "model.encoder_depth=5", "input.pad_to=128",
                                     "model.decoder_channels=[128,64,32,16,8]"])   # a narrow decoder: 8 channels
    assert ">= 16" in str(e.value)
    cfg = C.load_config("cpu_budget", [*R18, "model.decoder_attention=scse", "model.decoder_channels=[64,32,32,16,16]",
                                       "model.encoder_depth=5", "input.pad_to=128"])["model"]
    m = build_model(cfg, 3).eval()
    mask, salt = m(torch.zeros(1, 3, 128, 128))  # cpu_budget has the classifier head
    assert mask.shape == (1, 1, 128, 128) and salt.shape == (1, 1)
    # a local encoder weights file (as a user without internet would give) is loaded
    w = tmp_path / "enc.pth"
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v
             for k, v in m.encoder.state_dict().items()}
    torch.save(state, w)
    m2 = build_model(dict(cfg, encoder_weights=str(w)), 4)
    assert m2.encoder.layer1[0].conv1.weight.flatten()[0].item() == 0.5
    assert m2.eval()(torch.zeros(1, 4, 128, 128))[0].shape == (1, 1, 128, 128)
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(3)}, bad)
    with pytest.raises(UserError) as e:
        build_model(dict(cfg, encoder_weights=str(bad)), 3)
    assert "match only" in str(e.value)
    # smp's universal encoder (cpu_budget's tu-resnet10t) has no set_in_channels: its first convolution is
    # spread over 4 channels as smp does (3/4 of the 3-channel weights each)
    tu = C.load_config("cpu_budget")["model"]
    assert tu["encoder"].startswith("tu-")
    # timm's own resnet10t (cpu_budget's stem_width is left out with weights: they fit timm's stem)
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v
             for k, v in build_model(dict(tu, stem_width=None), 3).encoder.state_dict().items()}
    torch.save(state, w)
    m3 = build_model(dict(tu, encoder_weights=str(w)), 4).eval()
    first = next(mod for mod in m3.encoder.modules() if isinstance(mod, torch.nn.Conv2d))
    assert first.in_channels == 4 and first.weight.shape[1] == 4
    assert torch.allclose(first.weight, torch.full_like(first.weight, 0.375))
    assert m3(torch.zeros(1, 4, 112, 112))[0].shape == (1, 1, 112, 112)
    # a timm checkpoint of the model (keys without the universal encoder's "model." prefix) loads too
    torch.save({k.removeprefix("model."): v for k, v in state.items()}, w)
    first = next(mod for mod in build_model(dict(tu, encoder_weights=str(w)), 3).encoder.modules()
                 if isinstance(mod, torch.nn.Conv2d))
    assert torch.equal(first.weight, torch.full_like(first.weight, 0.5))


def test_losses_known_values():
    y = torch.zeros(2, 1, 8, 8)
    y[0, :, :4] = 1
    perfect = (y * 2 - 1) * 20
    assert bce(perfect, y) < 1e-6
    assert dice(perfect, y) < 0.35  # the empty image's soft Dice is smoothed, not undefined
    assert lovasz_hinge(perfect, y) < 1e-3
    assert lovasz_symmetric(perfect, y) < 1e-3
    wrong = -perfect
    assert lovasz_hinge(wrong, y) > 1 and bce(wrong, y) > 1
    for fn in LOSSES.values():
        x = torch.randn(2, 1, 8, 8, requires_grad=True)
        loss = fn(x, y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    with pytest.raises(UserError) as e:
        get_loss("focal")
    assert "lovasz" in str(e.value)


def test_symmetric_lovasz_is_the_mean_of_both_hinges():
    """One sort serves both halves: value and gradient equal the definition, with an empty and a
    full mask in the batch and ties in the logits."""
    torch.manual_seed(0)
    y = (torch.rand(4, 1, 101, 101) > 0.6).float()
    y[1], y[2] = 0, 1
    x = torch.randn(4, 1, 101, 101)
    x[3, :, :50] = 0.25  # ties
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = lovasz_symmetric(a, y)
    want = 0.5 * (lovasz_hinge(b, y) + lovasz_hinge(-b, 1 - y))
    got.backward()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-9)
    assert float(lovasz_symmetric(x, y)) != pytest.approx(float(lovasz_hinge(x, y)), rel=1e-3)


def test_weighted_sum_of_losses():
    x, y = torch.randn(3, 1, 8, 8), (torch.rand(3, 1, 8, 8) > 0.5).float()
    assert get_loss("bce") is bce
    assert float(get_loss(" bce + 0.5*lovasz_symmetric ")(x, y)) == pytest.approx(
        float(bce(x, y) + 0.5 * lovasz_symmetric(x, y)), rel=1e-6)
    assert float(get_loss("2*dice")(x, y)) == pytest.approx(2 * float(dice(x, y)), rel=1e-6)
    with pytest.raises(UserError, match="unknown loss 'focal' in 'bce\\+focal'"):
        get_loss("bce+focal")


@pytest.mark.parametrize("name", [*LOSSES, "bce + 0.5*lovasz_symmetric"])
def test_weighted_loss_counts_an_image_of_weight_2_as_if_it_were_in_the_batch_twice(name):
    """With ``weight`` the per-image losses are averaged with those weights: weight (2, 1, 1, 1)
    gives the loss, and the gradient, of the batch with its first image twice; all ones give the
    unweighted loss; a weight on one image moves the loss towards that image's."""
    torch.manual_seed(1)
    y = (torch.rand(4, 1, 16, 16) > 0.5).float()
    y[1] = 0
    y[2, :, 5:7, 5:7] = 1
    y[2, :, 7:, :] = 0
    x = torch.randn(4, 1, 16, 16)
    fn = get_loss(name)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = fn(a, y, torch.tensor([2.0, 1.0, 1.0, 1.0]))
    want = fn(torch.cat([b[:1], b]), torch.cat([y[:1], y]))
    got.backward()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-8)
    assert fn(x, y, torch.ones(4)).item() == pytest.approx(fn(x, y).item(), rel=1e-5)
    alone = [fn(x[i:i + 1], y[i:i + 1]).item() for i in range(4)]
    heavy = fn(x, y, torch.tensor([1.0, 1.0, 100.0, 1.0])).item()
    assert abs(heavy - alone[2]) < abs(fn(x, y).item() - alone[2])


def test_small_mask_weights_pick_the_masks_by_coverage():
    """train.small_mask_weight w: masks covering more than 0 and at most small_mask_coverage of
    the image weigh w (coverage 0.01 and exactly 0.1 here), empty and larger ones 1; w = 1 is no
    weighting at all (None: the unweighted losses). batch_loss passes the weights to the mask loss."""
    from tgs_salt.train import batch_loss, small_mask_weights
    from tgs_salt.transforms import Geometry

    y = torch.zeros(4, 1, 10, 10)
    y[1, :, :2, :5] = 1  # 0.1
    y[2, :, :5, :5] = 1  # 0.25
    y[3, :, :1, :1] = 1  # 0.01
    t = {"small_mask_weight": 3.0, "small_mask_coverage": 0.1}
    assert small_mask_weights(y, t).tolist() == [1.0, 3.0, 1.0, 3.0]
    assert small_mask_weights(y, dict(t, small_mask_coverage=0.25)).tolist() == [1.0, 3.0, 3.0, 3.0]
    assert small_mask_weights(y, dict(t, small_mask_weight=1.0)) is None
    x = torch.randn(4, 1, 10, 10)
    geo = Geometry(10, 10)
    loss = batch_loss(x, None, None, y, geo, lovasz_symmetric, bce, dict(t, side_loss_weight=0.1))
    assert loss.item() == pytest.approx(lovasz_symmetric(x, y, torch.tensor([1.0, 3.0, 1.0, 3.0])).item(), rel=1e-6)
    assert loss.item() != pytest.approx(lovasz_symmetric(x, y).item(), rel=1e-3)


def test_ema_averages_weights_and_copies_counters():
    from tgs_salt.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    ema = EMA(model, decay=0.5)
    start = [p.detach().clone() for p in model.parameters()]
    assert ema.module is not model and all(not p.requires_grad for p in ema.module.parameters())
    decays = []
    for _ in range(50):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model(torch.randn(4, 1, 5, 5))  # moves BatchNorm statistics and its batch counter
        decays.append(ema.current_decay())
        ema.update()
    # the decay warms up, then holds
    assert decays[0] == pytest.approx(0.1) and decays[-1] == 0.5 and decays == sorted(decays)
    # the average trails the weights (which moved +1 per step) by decay / (1 - decay) = 1 step
    lag = [float((p.detach() - e).mean()) for p, e in zip(model.parameters(), ema.module.parameters(), strict=True)]
    assert all(0.9 < v < 1.1 for v in lag), lag
    assert all(float((e - s).mean()) > 30 for e, s in zip(ema.module.parameters(), start, strict=True))
    assert int(ema.module[1].num_batches_tracked) == 50
    rm = ema.module[1].running_mean
    assert not torch.equal(rm, model[1].running_mean) and torch.isfinite(rm).all()
    # state round trip
    other = EMA(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 50 and all(torch.equal(a, b) for a, b in zip(
        other.module.state_dict().values(), ema.module.state_dict().values(), strict=True))


def test_augmentations_valid_under_strict_and_deterministic():
    import numpy as np

    from tgs_salt.transforms import AugmentedArrays, build_augment

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 101, 101), dtype=np.uint8)
    masks = rng.random((4, 101, 101)) > 0.5
    for name in ("competition", "cpu_budget", "demo"):
        aug = build_augment(C.load_config(name)["augment"], strict=True)  # invalid arguments raise
        assert "VerticalFlip" not in repr(aug)
        ds = AugmentedArrays(images, masks, np.zeros(4, np.float32), aug, seed=5)
        img, mask, _ = ds[1]
        assert img.shape == (101, 101) and mask.shape == (101, 101) and mask.dtype == torch.bool
        a = ds[3 * 4 + 2]  # key = epoch * len + index: sample 2 of epoch 3
        b = ds[3 * 4 + 2]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # per-sample seeding
        epoch3 = [ds[3 * 4 + i][0] for i in range(4)]
        assert any(not torch.equal(ds[4 * 4 + i][0], epoch3[i]) for i in range(4))  # a new draw each epoch


def test_timm_universal_encoder():
    """model.encoder tu-<timm model> (smp's universal encoder) builds with cpu_budget's light decoder, the
    classifier head and depth 4, every weight trains; a name timm does not know is a UserError."""
    cfg = C.load_config("cpu_budget", ["model.encoder=tu-resnet10t"])
    m = build_model(cfg["model"], 3)
    assert sum(p.numel() for p in m.parameters()) < 0.6 * sum(
        p.numel() for p in build_model(C.load_config("cpu_budget", R18)["model"], 3).parameters())
    mask, salt = m(torch.zeros(2, 3, 112, 112))
    assert mask.shape == (2, 1, 112, 112) and salt.shape == (2, 1)
    (mask.sum() + salt.sum()).backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    with pytest.raises(UserError, match="no timm model 'resnet999t'"):
        C.load_config("cpu_budget", ["model.encoder=tu-resnet999t"])


def test_stem_width_narrows_the_timm_stem_only():
    """model.stem_width 16 builds resnet10t's deep stem as 3 -> 12 -> 16 -> 32 (timm's tiered stem: 24, 32,
    64 by default), with fewer FLOPs; the rest of the encoder keeps its widths (layer1's first block gets
    a 1x1 projection from the stem's 32 channels), the model trains, and the output shapes are unchanged."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(m):
        with FlopCounterMode(display=False) as fc:
            m(torch.zeros(1, 3, 112, 112))
        return fc.get_total_flops()

    base = build_model(C.load_config("cpu_budget", ["model.stem_width=null"])["model"], 3)  # timm's own: 32
    cfg = C.load_config("cpu_budget")  # cpu_budget sets 16
    assert cfg["model"]["stem_width"] == 16
    m = build_model(cfg["model"], 3)
    stem = [c.out_channels for c in m.encoder.model.conv1 if isinstance(c, torch.nn.Conv2d)]
    assert stem == [12, 16, 32] and [c.out_channels for c in base.encoder.model.conv1
                                     if isinstance(c, torch.nn.Conv2d)] == [24, 32, 64]
    assert m.encoder.model.layer1[0].downsample is not None and base.encoder.model.layer1[0].downsample is None
    assert m.encoder.model.layer3[0].conv2.weight.shape == base.encoder.model.layer3[0].conv2.weight.shape
    assert flops(m.eval()) < 0.85 * flops(base.eval())
    mask, salt = m.train()(torch.zeros(2, 3, 112, 112))
    assert mask.shape == (2, 1, 112, 112) and salt.shape == (2, 1)
    (mask.sum() + salt.sum()).backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    # where it does not apply it is left out (--set model.encoder=... on cpu_budget still works), and says why
    from tgs_salt.models import stem_width_unused

    assert stem_width_unused(cfg["model"]) is None
    for sets, why in ((R18, "not a tu- timm encoder"), (["model.encoder=tu-resnet18"], "no deep stem"),
                      (["model.encoder=tu-efficientnet_b0"], "no deep stem"),
                      (["model.arch=plain_unet"], "not a tu- timm encoder")):
        assert why in stem_width_unused(C.load_config("cpu_budget", sets)["model"])
    assert "encoder weights imagenet" in stem_width_unused(dict(cfg["model"], encoder_weights="imagenet"))
    r18 = build_model(C.load_config("cpu_budget", ["model.encoder=tu-resnet18"])["model"], 3)
    assert r18.encoder.model.conv1.out_channels == 64  # timm's plain stem, as without the key


def test_shallower_encoder_on_a_smaller_input():
    """encoder_depth 4 (no deepest stage) runs on 112 px, 0.77x the pixels of 128, with fewer FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = C.load_config("cpu_budget", [*R18, "model.encoder_depth=4", "model.decoder_channels=[64,32,16,8]",
                                       "input.pad_to=112"])
    m4 = build_model(cfg["model"], 3).eval()
    m5 = build_model(C.load_config("cpu_budget", [*R18, "model.encoder_depth=5", "input.pad_to=128",
                                                  "model.decoder_channels=[128,64,32,16,8]"])["model"], 3).eval()
    assert isinstance(m4.encoder.layer4, torch.nn.Identity) and not isinstance(m5.encoder.layer4, torch.nn.Identity)
    assert all(p.requires_grad for p in m4.parameters())
    # an encoder whose unused stages are not ResNet layers: those weights are frozen, the rest train
    mb = build_model(dict(cfg["model"], encoder="mobilenet_v2"), 3)
    frozen = [n for n, p in mb.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("encoder.") for n in frozen)
    mask, salt = mb(torch.zeros(2, 3, 112, 112))
    (mask.sum() + salt.sum()).backward()
    assert all(p.grad is not None for p in mb.parameters() if p.requires_grad)
    with torch.no_grad():
        mask, salt = m4(torch.zeros(2, 3, 112, 112))
        assert mask.shape == (2, 1, 112, 112) and salt.shape == (2, 1)
        flops = []
        for m, size in ((m4, 112), (m5, 128)):
            with FlopCounterMode(display=False) as fc:
                m(torch.zeros(1, 3, size, size))
            flops.append(fc.get_total_flops())
    assert flops[0] < 0.65 * flops[1]
    # the plain baselines downsample 4 times: 112 is enough for them
    assert C.load_config("demo", ["input.pad_to=112"])["input"]["pad_to"] == 112


def test_zero_init_residual_starts_blocks_as_identity_and_changes_nothing_else():
    """Only the last batch-norm scale of each residual block differs from the default initialisation
    at the same seed (no random number drawn), so an A/B of the option compares that alone."""
    from tgs_salt.models import zero_init_residual

    cfg = C.load_config("cpu_budget", [*R18, "model.zero_init_residual=true"])
    torch.manual_seed(0)
    base = build_model(dict(cfg["model"], zero_init_residual=False), 3).state_dict()
    torch.manual_seed(0)
    zeroed = build_model(cfg["model"], 3)
    changed = {k for k, v in zeroed.state_dict().items() if not torch.equal(v, base[k])}
    # encoder_depth 4 keeps layer1-3 of resnet18: 3 stages of 2 blocks
    assert changed == {f"encoder.layer{i}.{j}.bn2.weight" for i in (1, 2, 3) for j in (0, 1)}
    assert all(not zeroed.state_dict()[k].any() for k in changed)
    assert all(base[k].abs().min() > 0 for k in changed)
    # each block then returns relu(shortcut(x)); layer1[0] does not downsample: the identity on x >= 0
    block = zeroed.encoder.layer1[0].eval()
    x = torch.rand(2, 64, 8, 8)
    assert torch.equal(block(x), x)
    with pytest.raises(UserError, match="no ResNet residual blocks"):
        zero_init_residual(build_model(dict(cfg["model"], encoder="mobilenet_v2", zero_init_residual=False), 3).encoder,
                           "mobilenet_v2")


FULL_DECODER = ["model.stem_skip=true", "model.half_res_head=false"]  # cpu_budget's decoder is the light one


def test_hypercolumn_decoder_fuses_every_block():
    cfg = C.load_config("cpu_budget", ["model.hypercolumn=true", "model.encoder_depth=5", "input.pad_to=128",
                                       "model.decoder_channels=[128,64,32,16,8]", *FULL_DECODER])["model"]
    m = build_model(cfg, 3)
    assert isinstance(m.decoder, UnetSideDecoder) and m.decoder.side is None
    assert [p.in_channels for p in m.decoder.hyper] == [128, 64, 32, 16]
    seen = []
    hooks = [b.register_forward_hook(lambda mod, i, o: seen.append(o.shape[-1])) for b in m.decoder.decoder.blocks]
    mask, salt = m(torch.randn(2, 3, 128, 128))
    assert mask.shape == (2, 1, 128, 128) and seen == [8, 16, 32, 64, 128]
    (mask.mean() + salt.mean()).backward()
    assert all(p.grad is not None for p in m.parameters())  # every block reaches the loss directly
    assert take_side_logits(m) is None  # no deep supervision asked for
    for h in hooks:
        h.remove()
    with pytest.raises(UserError, match="hypercolumn is for arch Unet"):
        C.load_config("cpu_budget", ["model.hypercolumn=true", "model.arch=FPN"])


def test_hypercolumn_equals_concat_then_1x1():
    """Projecting each block's output at its own resolution, then upsampling and adding, is the
    textbook hypercolumn (upsample all, concatenate, 1x1 conv) with the last block's part the identity."""
    torch.manual_seed(0)
    low, last = torch.randn(2, 6, 7, 7), torch.randn(2, 4, 28, 28)
    proj = torch.nn.Conv2d(6, 4, 1, bias=False)
    cheap = last + torch.nn.functional.interpolate(proj(low), size=(28, 28), mode="bilinear", align_corners=False)
    wide = torch.nn.Conv2d(10, 4, 1, bias=False)
    with torch.no_grad():
        wide.weight.copy_(torch.cat([proj.weight, torch.eye(4)[:, :, None, None]], 1))
    up = torch.nn.functional.interpolate(low, size=(28, 28), mode="bilinear", align_corners=False)
    assert torch.allclose(cheap, wide(torch.cat([up, last], 1)), atol=1e-5)


def test_deep_supervision_side_logits_in_training_only():
    cfg = C.load_config("cpu_budget", ["model.deep_supervision=true", *FULL_DECODER])["model"]
    m = build_model(cfg, 3)
    assert [h.in_channels for h in m.decoder.side] == cfg["decoder_channels"][:-1] and m.decoder.hyper is None
    m.train()
    m(torch.randn(2, 3, 112, 112))
    side = take_side_logits(m)
    assert [s.shape[-1] for s in side] == [14, 28, 56] and all(s.shape[:2] == (2, 1) for s in side)
    assert take_side_logits(m) is None  # taken once
    sum(s.mean() for s in side).backward()
    assert all(h.weight.grad is not None for h in m.decoder.side)
    assert all(p.requires_grad for p in m.decoder.parameters())  # not frozen by the encoder_depth probe
    m.eval()
    with torch.no_grad():
        m(torch.randn(2, 3, 112, 112))
    assert take_side_logits(m) is None  # nothing at inference
    with pytest.raises(UserError, match="deep_supervision is for arch Unet"):
        C.load_config("cpu_budget", ["model.deep_supervision=true", "model.arch=FPN"])


@pytest.mark.parametrize("stem_skip,half_res_head", [(False, False), (True, True), (False, True)])
def test_light_decoder_options(stem_skip, half_res_head):
    """model.stem_skip false: the half-resolution block sees no stem features (built without their
    channels); model.half_res_head: no block at full size, the head's logits upsampled to it."""
    sets = [f"model.stem_skip={str(stem_skip).lower()}", f"model.half_res_head={str(half_res_head).lower()}"]
    cfg = C.load_config("cpu_budget", [*R18, *sets])["model"]
    base = build_model(C.load_config("cpu_budget", [*R18, *FULL_DECODER])["model"], 3)
    m = build_model(cfg, 3)
    blocks = m.decoder.decoder.blocks
    assert len(blocks) == len(base.decoder.blocks) - half_res_head
    half = blocks[len(cfg["decoder_channels"]) - 2]  # the block at half the input resolution
    stem = base.encoder.bn1.num_features  # 64 channels from the ResNet stem
    assert half.conv1[0].in_channels == cfg["decoder_channels"][-3] + (stem if stem_skip else 0)
    seen = []
    hooks = [b.register_forward_hook(lambda mod, i, o: seen.append(o.shape[-1])) for b in blocks]
    m.train()
    mask, salt = m(torch.randn(2, 3, 112, 112))
    assert mask.shape == (2, 1, 112, 112) and salt.shape == (2, 1)
    assert seen == [14, 28, 56] + ([] if half_res_head else [112])
    (mask.mean() + salt.mean()).backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    for h in hooks:
        h.remove()
    if half_res_head:  # a constant logit map at half size stays constant once upsampled
        head = m.segmentation_head
        with torch.no_grad():
            y = head[1](torch.full((1, 1, 56, 56), 0.3))
        assert y.shape[-1] == 112 and torch.allclose(y, torch.full_like(y, 0.3))
    for arch in ("FPN", "plain_unet"):  # the Unet's options: other archs build as without them
        other = C.load_config("cpu_budget", sets + [f"model.arch={arch}"])["model"]
        plain = C.load_config("cpu_budget", FULL_DECODER + [f"model.arch={arch}"])["model"]
        assert [p.shape for p in build_model(other, 3).parameters()] == [p.shape for p in build_model(plain, 3).parameters()]
