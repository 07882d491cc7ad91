"""Model registry: segmentation-models-pytorch architectures plus two from-scratch baselines.

``build_model(cfg["model"], in_channels)`` returns a module mapping (B, C, H, W) to logits
(B, 1, H, W), or to ``(logits, salt logits (B, 1))`` with ``model.cls_head`` (an empty /
non-empty classifier on the deepest features, trained jointly; see ``split_output``).
Unknown names fail with the list of valid ones.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch
from torch import nn

from tgs_salt.errors import UserError

log = logging.getLogger(__name__)
SMP_ARCHS = ("Unet", "UnetPlusPlus", "FPN", "Linknet", "MAnet", "PAN", "PSPNet", "DeepLabV3",
             "DeepLabV3Plus", "UPerNet")
PLAIN_ARCHS = ("plain_unet", "plain_unet_strided", "fcn")
WEIGHTS_HELP = ("set model.encoder_weights to a local weights file (for resnet34, torchvision's "
                "resnet34-b627a593.pth or an smp encoder state dict; for tu-<name>, timm's checkpoint of that "
                "model), or to null to train from scratch "
                "(e.g. --set model.encoder_weights=null)")


def split_output(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mask logits, classification logits or None) of a model's output."""
    if isinstance(out, (tuple, list)):
        return out[0], out[1]
    return out, None


def arch_names() -> tuple[str, ...]:
    return SMP_ARCHS + PLAIN_ARCHS


def _smp():
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import segmentation_models_pytorch as smp

    return smp


def _offline_when_nothing_to_fetch(weights) -> None:
    """No hub weights wanted: set HF_HUB_OFFLINE (read when smp first imports the hub client)
    so that nothing waits on the network."""
    if weights in (None, "null"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def encoder_names() -> list[str]:
    return sorted(_smp().encoders.get_encoder_names())


def local_weights(weights) -> bool:
    """Whether ``model.encoder_weights`` names a local weights file (not imagenet, not null)."""
    return weights not in (None, "null", "imagenet")


def _check_encoder(m: dict, key: str, where: str) -> None:
    name = str(m[key])
    if name.startswith("tu-"):  # smp's universal encoder over any timm model with features_only
        import timm
        if not timm.is_model(name[3:]):
            raise UserError(f"config {where}: model.{key} = {name!r}: no timm model {name[3:]!r} "
                            "(tu-<name> takes a name from timm.list_models(), e.g. tu-resnet10t)")
        return
    names = encoder_names()
    if name not in names:
        raise UserError(f"config {where}: model.{key} = {name!r} is not an smp encoder; valid: {', '.join(names)} "
                        "or tu-<any timm model>")


def stem_width_unused(m: dict) -> str | None:
    """Why ``model.stem_width`` does not apply to model config ``m``, or None when it does. It is timm's
    ``stem_width`` of a ResNet with a deep stem (resnet10t, resnet18d, ...), for an smp arch's ``tu-``
    encoder trained from scratch (ImageNet or local weights fit the stem they were trained with; timm's
    plain 7x7 stem, tu-resnet18's, would ignore it). Like the light decoder's keys it is set in
    ``cpu_budget`` and left out, with a log line, where it does not apply, so that ``--set
    model.encoder=resnet18`` or ``model.encoder_weights=imagenet`` still work on that config. Built on the
    meta device to ask timm whether the encoder has such a stem."""
    name = str(m["encoder"])
    if m["arch"] not in SMP_ARCHS or not name.startswith("tu-"):
        return f"arch {m['arch']}, encoder {name} (not a tu- timm encoder)"
    if m["encoder_weights"] not in (None, "null"):
        return f"encoder weights {m['encoder_weights']} (they fit the encoder's own stem)"
    import timm
    import torch
    try:
        with torch.device("meta"):
            net = timm.create_model(name[3:], pretrained=False, stem_width=int(m["stem_width"]))
    except TypeError:
        net = None
    if not isinstance(getattr(net, "conv1", None), torch.nn.Sequential):
        return f"encoder {name} (no deep stem whose width it sets)"
    return None


def check_model_config(m: dict, where: str = "config") -> None:
    if m["arch"] not in arch_names():
        raise UserError(f"config {where}: model.arch = {m['arch']!r}; valid: {', '.join(arch_names())}")
    if m["arch"] in SMP_ARCHS:
        _offline_when_nothing_to_fetch(m["encoder_weights"])
        _check_encoder(m, "encoder", where)
    if m.get("larger_encoder") is not None:  # used only with an smp arch and no local weights file (budget.larger_encoder)
        _check_encoder(m, "larger_encoder", where)
    if m["norm"] not in ("batch", "group"):
        raise UserError(f"config {where}: model.norm = {m['norm']!r}; allowed: batch, group")
    if m["norm"] == "group" and m["arch"] not in PLAIN_ARCHS:
        raise UserError(f"config {where}: model.norm group is for the plain baselines ({', '.join(PLAIN_ARCHS)}); "
                        "smp models use batch norm")
    if m["decoder_attention"] == "scse" and min(m["decoder_channels"]) < 16:
        raise UserError(f"config {where}: decoder_attention scse squeezes channels by 16, so every "
                        f"model.decoder_channels must be >= 16 (got {m['decoder_channels']})")
    for key in ("hypercolumn", "deep_supervision"):
        if m.get(key) and m["arch"] != "Unet":
            raise UserError(f"config {where}: model.{key} is for arch Unet (got {m['arch']})")
    if m.get("zero_init_residual") and (m["arch"] not in SMP_ARCHS or m["encoder_weights"] not in (None, "null")):
        raise UserError(f"config {where}: model.zero_init_residual is for smp ResNet encoders trained from scratch "
                        f"(model.encoder_weights: null; got arch {m['arch']}, encoder_weights {m['encoder_weights']!r})")
    if m["cls_head"] and m["arch"] == "fcn":
        raise UserError(f"config {where}: model.cls_head is not available for fcn; use a U-Net")
    w = m["encoder_weights"]
    if w not in (None, "imagenet") and not Path(str(w)).expanduser().is_file():
        raise UserError(f"config {where}: model.encoder_weights = {w!r} is neither imagenet, null nor an "
                        f"existing file; {WEIGHTS_HELP}")


# ----------------------------------------------------------------------------- baselines

def _norm(kind: str, c: int) -> nn.Module:
    # group norm does not depend on the batch: small per-GPU batches train as one large batch would
    return nn.BatchNorm2d(c) if kind == "batch" else nn.GroupNorm(min(8, c), c)


def _block(cin: int, cout: int, norm: str = "batch") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(norm, cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), _norm(norm, cout), nn.ReLU(inplace=True))


class PlainUNet(nn.Module):
    """The original U-Net shape (4 downsamplings), max-pool or strided-convolution downsampling."""

    def __init__(self, in_channels: int, base: int = 32, strided: bool = False, norm: str = "batch",
                 cls_head: bool = False):
        super().__init__()
        ch = [base * 2 ** i for i in range(5)]
        self.enc = nn.ModuleList([_block(in_channels, ch[0], norm)] +
                                 [_block(ch[i], ch[i + 1], norm) for i in range(4)])
        self.down = nn.ModuleList([
            nn.Conv2d(ch[i], ch[i], 3, stride=2, padding=1) if strided else nn.MaxPool2d(2) for i in range(4)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in range(4)])
        self.dec = nn.ModuleList([_block(ch[i] * 2, ch[i], norm) for i in range(4)])
        self.head = nn.Conv2d(ch[0], 1, 1)
        self.cls = nn.Linear(ch[4], 1) if cls_head else None

    def forward(self, x):
        skips = []
        for i in range(4):
            x = self.enc[i](x)
            skips.append(x)
            x = self.down[i](x)
        x = self.enc[4](x)
        label = self.cls(x.mean(dim=(2, 3))) if self.cls is not None else None
        for i in reversed(range(4)):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.head(x) if label is None else (self.head(x), label)


class PlainFCN(nn.Module):
    """A fully convolutional network without skip connections (FCN-32s-like, bilinear upsampling)."""

    def __init__(self, in_channels: int, base: int = 32, norm: str = "batch"):
        super().__init__()
        ch = [base * 2 ** i for i in range(5)]
        layers, cin = [], in_channels
        for c in ch:
            layers += [_block(cin, c, norm), nn.MaxPool2d(2)]
            cin = c
        self.features = nn.Sequential(*layers[:-1])  # 4 poolings
        self.head = nn.Conv2d(cin, 1, 1)

    def forward(self, x):
        size = x.shape[-2:]
        return nn.functional.interpolate(self.head(self.features(x)), size=size, mode="bilinear",
                                         align_corners=False)


# ----------------------------------------------------------------------------- smp

class UnetSideDecoder(nn.Module):
    """An smp U-Net decoder with side outputs from every block (reuses its center and blocks).

    ``hypercolumn``: every block's output feeds the head: each earlier block's output is mapped
    by a 1x1 convolution to the last block's width at its own resolution, upsampled (bilinear) and
    added to the last block's output, then BatchNorm + ReLU. Since a 1x1 convolution commutes
    with bilinear upsampling, this is the concat-then-1x1 hypercolumn at a fraction of the cost
    (nothing wide is ever built at full resolution).

    ``deep_supervision``: in training, each earlier block also gives mask logits at its own
    resolution (a 1x1 convolution), left in ``side_logits`` for the training loss (the winners'
    deep supervision); ``take_side_logits`` collects them. Nothing is added at inference.

    ``stem_skip`` False: the block at half the input resolution gets no skip connection from the
    encoder's stem (``build_model`` builds that block without its input channels). With
    ``model.half_res_head`` the decoder comes without its full-size block and ``channels`` are the
    remaining blocks' widths (``build_model``)."""

    def __init__(self, decoder: nn.Module, channels: list[int], hypercolumn: bool, deep_supervision: bool,
                 stem_skip: bool = True):
        super().__init__()
        self.decoder = decoder
        self.stem_skip = stem_skip
        early = channels[:-1]
        self.hyper = nn.ModuleList(nn.Conv2d(c, channels[-1], 1, bias=False) for c in early) if hypercolumn else None
        self.fuse = nn.Sequential(nn.BatchNorm2d(channels[-1]), nn.ReLU(inplace=True)) if hypercolumn else None
        self.side = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in early) if deep_supervision else None
        self.side_logits: list[torch.Tensor] | None = None

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        shapes = [f.shape[2:] for f in features][::-1]
        feats = features[1:][::-1]
        skips = feats[1:] if self.stem_skip else feats[1:-1]  # feats[-1]: the stem's output, at half resolution
        x = self.decoder.center(feats[0])
        outs = []
        for i, block in enumerate(self.decoder.blocks):
            x = block(x, *shapes[i + 1], skip_connection=skips[i] if i < len(skips) else None)
            outs.append(x)
        last = outs[-1]
        if self.side is not None and self.training:
            self.side_logits = [head(o) for head, o in zip(self.side, outs[:-1])]
        if self.hyper is None:
            return last
        size = last.shape[2:]
        for proj, o in zip(self.hyper, outs[:-1]):
            last = last + nn.functional.interpolate(proj(o), size=size, mode="bilinear", align_corners=False)
        return self.fuse(last)


def take_side_logits(model: nn.Module) -> list[torch.Tensor] | None:
    """The deep-supervision logits of the last training forward pass (then forgotten), or None."""
    dec = getattr(model, "decoder", None)
    if not isinstance(dec, UnetSideDecoder) or dec.side_logits is None:
        return None
    out, dec.side_logits = dec.side_logits, None
    return out


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_local_weights(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read encoder weights {path}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module.").removeprefix("encoder."): v for k, v in state.items()}
    enc = model.encoder
    own = enc.state_dict()
    if not any(k in own for k in state) and all(k.startswith("model.") for k in own):
        state = {f"model.{k}": v for k, v in state.items()}  # a timm checkpoint for smp's universal encoder
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(matched) < 0.9 * len(own):
        raise UserError(f"encoder weights {path} match only {len(matched)} of {len(own)} encoder tensors; "
                        f"is it a {type(enc).__name__} checkpoint? {WEIGHTS_HELP}")
    enc.load_state_dict(matched, strict=False)
    log.info("loaded %d encoder tensors from %s", len(matched), path)


def build_model(m: dict, in_channels: int) -> nn.Module:
    arch = m["arch"]
    if arch == "plain_unet":
        return PlainUNet(in_channels, m["base_channels"], strided=False, norm=m["norm"], cls_head=m.get("cls_head", False))
    if arch == "plain_unet_strided":
        return PlainUNet(in_channels, m["base_channels"], strided=True, norm=m["norm"], cls_head=m.get("cls_head", False))
    if arch == "fcn":
        return PlainFCN(in_channels, m["base_channels"], norm=m["norm"])
    if arch not in SMP_ARCHS:
        raise UserError(f"unknown model.arch {arch!r}; valid: {', '.join(arch_names())}")
    weights = m["encoder_weights"]
    if weights == "imagenet" and not os.environ.get("HF_HUB_OFFLINE") and not _hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # fail at once below instead of stalling on the network
    _offline_when_nothing_to_fetch(weights)
    smp = _smp()
    cls = getattr(smp, arch)
    kwargs = {"encoder_name": m["encoder"], "classes": 1, "activation": None,
              "encoder_depth": m.get("encoder_depth", 5)}
    if m.get("stem_width") is not None:  # smp passes it on to timm.create_model (tu- encoders)
        why = stem_width_unused(m)
        if why:
            log.info("model.stem_width applies to tu- timm ResNets with a deep stem trained from scratch: "
                     "not used with %s", why)
        else:
            kwargs["stem_width"] = int(m["stem_width"])
    if arch in ("Unet", "UnetPlusPlus"):
        kwargs["decoder_channels"] = tuple(m["decoder_channels"])
        kwargs["decoder_attention_type"] = m["decoder_attention"]
    if m.get("cls_head"):  # empty / non-empty logit from the deepest encoder features (avg pool + linear)
        kwargs["aux_params"] = {"classes": 1, "pooling": "avg", "dropout": None, "activation": None}
    local = local_weights(weights)
    try:
        model = cls(encoder_weights=None if local else weights, in_channels=3 if local else in_channels, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # hub errors come in many types
        if weights == "imagenet":
            raise UserError(f"could not get ImageNet weights for encoder {m['encoder']} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}). Offline? {WEIGHTS_HELP}") from None
        raise
    if local:
        _load_local_weights(model, Path(str(weights)).expanduser())
        if in_channels != 3:  # the first convolution's weights spread over the channels (smp's way)
            if hasattr(model.encoder, "set_in_channels"):
                model.encoder.set_in_channels(in_channels, pretrained=True)
            else:  # smp's universal encoder (tu-<timm model>) has no set_in_channels
                from segmentation_models_pytorch.encoders._utils import patch_first_conv
                patch_first_conv(model.encoder, in_channels, pretrained=True)
    # the light decoder (cpu_budget's) is the Unet's; with another arch, like encoder_depth or decoder_channels
    # with a plain baseline, the keys do not apply (so that --set model.arch=... works on cpu_budget)
    stem_skip, half_res_head = m.get("stem_skip", True), bool(m.get("half_res_head"))
    if arch != "Unet" and (not stem_skip or half_res_head):
        log.info("model.stem_skip / model.half_res_head apply to arch Unet only: not used with %s", arch)
        stem_skip, half_res_head = True, False
    if m.get("hypercolumn") or m.get("deep_supervision") or not stem_skip or half_res_head:
        channels = list(m["decoder_channels"])
        if not stem_skip:  # the block at half resolution, rebuilt without the stem's channels
            from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock
            i = len(channels) - 2
            model.decoder.blocks[i] = UnetDecoderBlock(channels[i - 1], 0, channels[i],
                                                       attention_type=m["decoder_attention"])
        if half_res_head:  # logits at half resolution, upsampled (bilinear): no decoder block at full size
            del model.decoder.blocks[len(model.decoder.blocks) - 1]
            channels = channels[:-1]
            model.segmentation_head = nn.Sequential(
                nn.Conv2d(channels[-1], 1, 3, padding=1),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        model.decoder = UnetSideDecoder(model.decoder, channels, bool(m.get("hypercolumn")),
                                        bool(m.get("deep_supervision")), stem_skip)
    _drop_unused_stages(model, kwargs["encoder_depth"], in_channels)
    if m.get("zero_init_residual"):
        zero_init_residual(model.encoder, m["encoder"])
    return model


def zero_init_residual(encoder: nn.Module, name: str = "encoder") -> int:
    """Zero the scale of the last batch norm of every ResNet residual block (torchvision's
    ``zero_init_residual``, which smp does not expose): each block starts as its shortcut alone
    (the identity where there is no downsampling). Draws no random numbers, so the rest of the
    initialisation is unchanged. Returns the number of blocks; a UserError when the encoder has none."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    blocks = [b for b in encoder.modules() if isinstance(b, (BasicBlock, Bottleneck))]
    if not blocks:
        raise UserError(f"model.zero_init_residual: encoder {name} has no ResNet residual blocks")
    with torch.no_grad():
        for b in blocks:
            (b.bn3 if isinstance(b, Bottleneck) else b.bn2).weight.zero_()
    return len(blocks)


def _drop_unused_stages(model: nn.Module, depth: int, in_channels: int) -> None:
    """smp builds an encoder's deepest stages even when ``encoder_depth`` skips them. ResNet
    stages (layer3, layer4) are replaced by parameterless identities; any other encoder weights that
    get no gradient (found by one backward pass on a small input) are frozen. Either way no
    optimizer, EMA step or DDP gradient reduction waits on weights that never get a gradient
    (DDP would fail on them)."""
    if depth >= 5:
        return
    enc = model.encoder
    for stage in range(max(depth, 1), 5):  # layer4 is the 5th downsampling, layer3 the 4th
        if isinstance(getattr(enc, f"layer{stage}", None), nn.Module):
            setattr(enc, f"layer{stage}", nn.Identity())
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_channels, 2 ** depth * 2, 2 ** depth * 2)
    out = model(x)
    sum(o.float().sum() for o in (out if isinstance(out, (tuple, list)) else [out])).backward()
    unused = [p for p in model.encoder.parameters() if p.grad is None]
    for p in unused:
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if unused:
        log.info("encoder_depth %d: %d weight tensors of the deeper stages frozen (never used)", depth, len(unused))
