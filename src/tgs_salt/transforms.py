"""Input geometry, input channels, augmentation, and the geometry of shift TTA.

The pad/crop contract: a 101x101 image is resized to ``resize`` (101 keeps it), padded to
``pad_to`` for the network, and the network output is cropped back to the ``resize`` region
(for the loss) and resized to 101x101 (for the metric, post-processing and RLE).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

IMG_MEAN, IMG_STD = 0.47, 0.16         # train-set statistics of image / 255
DEPTH_MEAN, DEPTH_STD = 506.0, 209.0   # train-set statistics of z


class Geometry:
    def __init__(self, resize: int = 101, pad_to: int = 128, pad_mode: str = "reflect", shift: int = 0):
        self.resize, self.pad_to, self.pad_mode = resize, pad_to, pad_mode
        total = pad_to - resize
        self.before = total // 2 + shift  # ``shift`` moves the image down and right inside the padding
        self.after = total - self.before
        if self.before < 0 or self.after < 0:
            raise ValueError(f"a {shift:+d} px shift does not fit in the {total} px of padding ({resize} -> {pad_to})")

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        """(..., pad_to, pad_to) -> (..., resize, resize)."""
        b = self.before
        return t[..., b:b + self.resize, b:b + self.resize]

    def to_101(self, t: torch.Tensor) -> torch.Tensor:
        """Cropped (B, 1, resize, resize) maps back to 101x101 (bilinear)."""
        if self.resize == 101:
            return t
        return F.interpolate(t, size=(101, 101), mode="bilinear", align_corners=False)

    def output_to_101(self, out: torch.Tensor) -> torch.Tensor:
        """Network-sized maps (B, 1, pad_to, pad_to) -> (B, 1, 101, 101)."""
        return self.to_101(self.crop(out))


class InputBuilder:
    """Turns uint8 images (B, 101, 101) and depths (B,) into network input (B, C, pad_to, pad_to)."""

    def __init__(self, channels: list[str], geometry: Geometry):
        self.channels = list(channels)
        self.geo = geometry

    @classmethod
    def from_config(cls, cfg: dict) -> InputBuilder:
        """The builder of a config's ``input`` section (channels and geometry)."""
        i = cfg["input"]
        return cls(i["channels"], Geometry(i["resize"], i["pad_to"], i["pad_mode"]))

    def at_size(self, size: int) -> InputBuilder:
        """The same input at network size ``size`` instead of ``pad_to``: the image is resized so that
        it fills the same share of the input (progressive resizing trains at a lower resolution first)."""
        g = self.geo
        return InputBuilder(self.channels, Geometry(max(1, round(g.resize * size / g.pad_to)), size, g.pad_mode))

    def cropped(self, size: int, seed: int) -> CropBuilder:
        """Training input of random ``size`` x ``size`` windows of this full-resolution input (see
        :class:`CropBuilder`): the low-resolution phase's other mode, the image kept at its scale."""
        return CropBuilder(self, size, seed)

    def shifted(self, shift: int) -> InputBuilder:
        """The same input with the image moved ``shift`` pixels down and right inside the padding
        (shift TTA: the network sees it at another offset; ``geo.crop`` takes it back out)."""
        g = self.geo
        return InputBuilder(self.channels, Geometry(g.resize, g.pad_to, g.pad_mode, shift))

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    def training_pair(self, images: torch.Tensor, masks: torch.Tensor, depths: torch.Tensor,
                      key: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
        """Network input and loss target of a training batch (``key``: epoch and batch, for
        builders that draw random numbers)."""
        return self(images, depths), self.target(masks)

    def __call__(self, images: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
        g = self.geo
        x = images.float().unsqueeze(1) / 255.0
        x = (x - IMG_MEAN) / IMG_STD
        if g.resize != 101:
            x = F.interpolate(x, size=(g.resize, g.resize), mode="bilinear", align_corners=False)
        pad = (g.before, g.after, g.before, g.after)
        if any(pad):
            mode = {"reflect": "reflect", "edge": "replicate", "constant": "constant"}[g.pad_mode]
            x = F.pad(x, pad, mode=mode)
        b, size = x.shape[0], g.pad_to
        # row coordinate: -1 at the top of the true region, +1 at its bottom, linear beyond
        rows = (torch.arange(size, dtype=torch.float32, device=x.device) - g.before) / max(g.resize - 1, 1) * 2 - 1
        row_plane = rows.view(1, 1, size, 1).expand(b, 1, size, size)
        planes = []
        for c in self.channels:
            if c == "image":
                planes.append(x)
            elif c == "depth":
                z = (depths.float().to(x.device) - DEPTH_MEAN) / DEPTH_STD
                planes.append(z.view(b, 1, 1, 1).expand(b, 1, size, size))
            elif c == "row":
                planes.append(row_plane)
            elif c == "image_x_row":
                planes.append(x * row_plane)
        return torch.cat(planes, dim=1).contiguous()

    def target(self, masks: torch.Tensor) -> torch.Tensor:
        """Bool masks (B, 101, 101) -> float targets (B, 1, resize, resize)."""
        t = masks.float().unsqueeze(1)
        if self.geo.resize != 101:
            t = (F.interpolate(t, size=(self.geo.resize,) * 2, mode="bilinear", align_corners=False) > 0.5).float()
        return t


class CropBuilder(InputBuilder):
    """Random ``size`` x ``size`` windows of a full-resolution input, each inside the image (no
    padding) and the same window for the input and its mask; one window per image, drawn from
    (seed, epoch, batch) so that a resumed run draws what an uninterrupted one would. Its geometry
    has no padding, so the loss covers the whole window. Only for training: calling it or
    ``target`` alone has no window to use."""

    def __init__(self, full: InputBuilder, size: int, seed: int):
        if size > full.geo.resize:
            raise ValueError(f"a {size} px window does not fit in the {full.geo.resize} px image")
        super().__init__(full.channels, Geometry(size, size, full.geo.pad_mode))
        self.full, self.size, self.seed = full, size, int(seed)

    def __call__(self, images, depths):
        raise TypeError("CropBuilder makes training pairs only: use training_pair")

    def target(self, masks):
        raise TypeError("CropBuilder makes training pairs only: use training_pair")

    def offsets(self, n: int, key: tuple[int, int]) -> torch.Tensor:
        """(n, 2) top-left corners (row, column) in the image, uniform over the positions that fit."""
        state = np.random.SeedSequence([self.seed, *(int(k) for k in key)]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(state))
        return torch.randint(0, self.full.geo.resize - self.size + 1, (n, 2), generator=g)

    def training_pair(self, images, masks, depths, key=(0, 0)):
        x, y = self.full(images, depths), self.full.target(masks)
        b, s = self.full.geo.before, self.size
        xs, ys = [], []
        for i, (r, c) in enumerate(self.offsets(len(x), key).tolist()):
            xs.append(x[i, :, b + r:b + r + s, b + c:b + c + s])
            ys.append(y[i, :, r:r + s, c:c + s])
        return torch.stack(xs), torch.stack(ys)


def build_augment(a: dict, strict: bool = False, record: bool = False):
    """Albumentations pipeline on the 101x101 uint8 image and mask (None when all off).
    ``record`` lists the transforms that fired in each result's ``applied_transforms``."""
    import albumentations as A
    import cv2

    ops = []
    if a["hflip"] > 0:
        ops.append(A.HorizontalFlip(p=a["hflip"]))
    if a["vflip"] > 0:
        ops.append(A.VerticalFlip(p=a["vflip"]))
    if a["affine_p"] > 0:
        ops.append(A.Affine(scale=(1 - a["scale"], 1 + a["scale"]), translate_percent=(-a["shift"], a["shift"]),
                            rotate=(-a["rotate"], a["rotate"]), border_mode=cv2.BORDER_REFLECT_101,
                            p=a["affine_p"]))
    if a["brightness_contrast_p"] > 0:
        ops.append(A.RandomBrightnessContrast(brightness_limit=a["brightness"], contrast_limit=a["contrast"],
                                              p=a["brightness_contrast_p"]))
    if not ops:
        return None
    return A.Compose(ops, strict=strict, seed=0, save_applied_params=record)


def seed_augment(augment, seed: int, epoch: int, index: int) -> None:
    """Seed ``augment`` (an albumentations Compose) for sample ``index`` of ``epoch``.

    Each transform gets its own generator from SeedSequence((seed, epoch, index)). Compose's own
    ``set_random_seed`` gives every child the *same* seed, so that with equal probabilities all
    transforms fire together or not at all (measured: only the patterns all-off and all-on occur).
    """
    transforms = list(augment.transforms)
    states = np.random.SeedSequence([seed, epoch, index]).generate_state(len(transforms) + 1)
    augment.set_random_seed(int(states[0]))  # the Compose's own draws (and, for now, every child's)
    for t, s in zip(transforms, states[1:]):
        t.set_random_seed(int(s))          # then one independent stream per transform


class AugmentedArrays(torch.utils.data.Dataset):
    """In-memory (images, masks, depths) with per-sample-seeded augmentation.

    The key of an item is ``epoch * len(self) + i`` (see :class:`EpochKeySampler`): sample ``i`` of
    epoch ``e`` is augmented with seed (seed, e, i), the same whatever the worker count, rank or
    resume point. The epoch travels with the key because DataLoader workers hold their own copy of
    the dataset (persistent workers keep it for the whole run), so an attribute set on the
    main process's copy would never reach them. A key below ``len(self)`` is sample ``key`` of epoch 0.
    """

    def __init__(self, images, masks, depths, augment=None, seed: int = 0):
        self.images, self.masks, self.depths = images, masks, depths
        self.augment, self.seed = augment, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int):
        epoch, i = divmod(int(key), len(self))
        img, mask = self.images[i], self.masks[i]
        if self.augment is not None:
            seed_augment(self.augment, self.seed, epoch, i)
            out = self.augment(image=img, mask=mask.astype(np.uint8))
            img, mask = out["image"], out["mask"].astype(bool)
        return torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(np.ascontiguousarray(mask)), \
            torch.tensor(self.depths[i], dtype=torch.float32)


class EpochKeySampler(torch.utils.data.Sampler):
    """Wraps an index sampler (e.g. DistributedSampler) so that it yields ``epoch * n + i``."""

    def __init__(self, sampler, n: int):
        self.sampler, self.n, self.epoch = sampler, n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        base = self.epoch * self.n
        return (base + int(i) for i in self.sampler)


def epoch_draw(empty: np.ndarray, fraction: float) -> int:
    """How many images an epoch draws when it keeps ``fraction`` of the empty-mask ones
    (``train.empty_fraction``): every image with salt, and that share of the empty ones (rounded).
    The rule the sampler and the time plan share."""
    n_empty = int(np.count_nonzero(empty))
    return len(empty) - n_empty + round(fraction * n_empty)


class EmptySubsampler(torch.utils.data.Sampler):
    """Each epoch every image with salt and a fresh random ``fraction`` of the empty-mask ones
    (``empty``: a bool per sample), shuffled, from a generator seeded by (seed, epoch): the same
    draw on every rank and after a resume. Rank ``rank`` of ``world`` takes every world-th index
    of the shuffled draw, cut to the same length on every rank (DistributedSampler's drop_last).
    An empty-mask image costs as much as any other while the classifier and the empty-truth term
    learn from a few; fewer of them make an epoch cheaper, the time going to the images with salt."""

    def __init__(self, empty: np.ndarray, fraction: float, seed: int, world: int = 1, rank: int = 0):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction {fraction!r}: in (0, 1]")
        self.empty_idx, self.salt_idx = np.flatnonzero(empty), np.flatnonzero(~np.asarray(empty, bool))
        self.k = epoch_draw(np.asarray(empty, bool), fraction) - len(self.salt_idx)
        self.seed, self.world, self.rank, self.epoch = seed, world, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.salt_idx) + self.k) // self.world

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        drawn = np.concatenate([self.salt_idx, rng.choice(self.empty_idx, self.k, replace=False)])
        order = rng.permutation(drawn)
        return iter(order[self.rank::self.world][:len(self)].tolist())

