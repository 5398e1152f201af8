"""Every training image decoded once into memory, and augmented on the fly in batches.

Decoding a JPEG costs more than augmenting it, and an epoch reads every image: the images are
resized to the network's input once (exactly as ``transforms.preprocess_rgb`` resizes them when
scoring) and kept as one uint8 tensor (7.8k images at 224 px: 1.2 GB).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from monai_bundle.scripts.network import denormalised, imagenet_normalised
from monai_bundle.scripts.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

_MEAN = torch.from_numpy(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.from_numpy(IMAGENET_STD).view(1, 3, 1, 1)


def _decode(path: str, size: int) -> np.ndarray:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb).transpose(2, 0, 1).copy()


def decoded_images(
    paths: Sequence[str], size: int, cache_dir: str | Path | None, workers: int = 1
) -> torch.Tensor:
    """N x 3 x size x size uint8, cached on disk under a key of the paths and the size.

    ``workers`` > 1 decodes in that many processes (a machine with many cores, e.g. before
    several training runs share one cache: decode once, then start them)."""
    key = hashlib.sha256(("\n".join(paths) + f"\n{size}").encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"images-{size}-{key}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        return torch.from_numpy(np.load(cache))
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            decoded = pool.map(_decode, paths, [size] * len(paths), chunksize=64)
            for i, image in enumerate(decoded):
                out[i] = image
    else:
        for i, path in enumerate(paths):
            out[i] = _decode(path, size)
    log.info("decoded %d images at %d px", len(paths), size)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(".partial.npy")
        np.save(partial, out)
        partial.replace(cache)
    return torch.from_numpy(out)


def normalised(batch: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W → ImageNet-normalised float, as the network expects."""
    return (batch.float() / 255.0 - _MEAN) / _STD


class Augmenter:
    """Random views of a uint8 batch, drawn from a ``torch.Generator`` (same seed, same views).

    Random resized crop (scale and framing vary between clinics), flips and 90° turns plus a
    free rotation (dermoscopy has no up), brightness/contrast/saturation/gamma (cameras), and
    hair and ruler marks drawn on some images (occluders that differ between patients, not
    diagnoses). The field-of-view mask and colour constancy are inside the network.
    """

    def __init__(
        self,
        crop_scale: tuple[float, float] = (0.4, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        max_rotation_degrees: float = 45.0,
        jitter: float = 0.2,
        p_hair: float = 0.15,
        p_ruler: float = 0.1,
    ) -> None:
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.max_rotation = math.radians(max_rotation_degrees)
        self.jitter = jitter
        self.p_hair = p_hair
        self.p_ruler = p_ruler

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = batch.shape
        u = torch.rand(n, 12, generator=generator)
        rgb = batch.float() / 255.0
        rgb = torch.stack([self._crop(rgb[i], u[i, :4], height, width) for i in range(n)])
        rgb = self._rotate(rgb, u[:, 4])
        flip_h, flip_v, turns = u[:, 5] < 0.5, u[:, 6] < 0.5, (u[:, 7] * 4).long().clamp(max=3)
        rgb[flip_h] = rgb[flip_h].flip(-1)
        rgb[flip_v] = rgb[flip_v].flip(-2)
        for k in (1, 2, 3):
            rgb[turns == k] = torch.rot90(rgb[turns == k], k, dims=(-2, -1))
        rgb = self._colour(rgb, u[:, 8:11])
        out = (rgb - _MEAN) / _STD
        hair = torch.nonzero(u[:, 11] < self.p_hair).flatten()
        ruler = torch.nonzero(
            (u[:, 11] >= self.p_hair) & (u[:, 11] < self.p_hair + self.p_ruler)
        ).flatten()
        if len(hair):
            out[hair] = with_hair(out[hair])
        if len(ruler):
            out[ruler] = with_ruler(out[ruler])
        return out

    def _crop(self, image: torch.Tensor, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        low, high = self.crop_scale
        area = low + (high - low) * float(u[0])
        narrow, wide = (math.log(r) for r in self.crop_ratio)
        ratio = math.exp(narrow + (wide - narrow) * float(u[1]))
        rows = min(height, round(math.sqrt(area / ratio) * height))
        columns = min(width, round(math.sqrt(area * ratio) * width))
        top = int(float(u[2]) * (height - rows + 1))
        left = int(float(u[3]) * (width - columns + 1))
        crop = image[:, top : top + rows, left : left + columns].unsqueeze(0)
        return nn.functional.interpolate(
            crop, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )[0]

    def _rotate(self, rgb: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        angle = (u * 2 - 1) * self.max_rotation
        cos, sin = torch.cos(angle), torch.sin(angle)
        zero = torch.zeros_like(angle)
        theta = torch.stack(
            [torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1
        )
        grid = nn.functional.affine_grid(theta, list(rgb.shape), align_corners=False)
        return nn.functional.grid_sample(
            rgb, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )

    def _colour(self, rgb: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        scale = 1 + (u * 2 - 1) * self.jitter  # brightness, contrast, saturation
        view = (-1, 1, 1, 1)
        rgb = (rgb * scale[:, 0].view(view)).clamp(0, 1)
        mean = rgb.mean(dim=(1, 2, 3), keepdim=True)
        rgb = ((rgb - mean) * scale[:, 1].view(view) + mean).clamp(0, 1)
        grey = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        rgb = ((rgb - grey) * scale[:, 2].view(view) + grey).clamp(0, 1)
        return rgb


def _to_canvas(image: torch.Tensor) -> Image.Image:
    """One normalised 3xHxW image as an 8-bit PIL image to draw on."""
    rgb = denormalised(image).permute(1, 2, 0).numpy()
    return Image.fromarray((rgb * 255).round().astype(np.uint8), mode="RGB")


def _from_canvas(canvas: Image.Image) -> torch.Tensor:
    array = np.asarray(canvas, dtype=np.float32) / 255.0
    return imagenet_normalised(torch.from_numpy(array.transpose(2, 0, 1).copy()))


def _image_seed(image: torch.Tensor) -> int:
    """A seed that depends on the image alone, so an augmented view is the same every run."""
    return int(hashlib.sha256(image.numpy().tobytes()).hexdigest()[:8], 16)


def with_hair(batch: torch.Tensor) -> torch.Tensor:
    """Dark, thin, curved strands drawn over each image (DullRazor's problem, in reverse).

    Hair is the commonest occluder in dermoscopy and differs between patients, not diagnoses;
    training on hairy copies teaches the head that strands are not evidence.
    """
    out = []
    for image in batch:
        rng = np.random.default_rng(_image_seed(image))
        canvas = _to_canvas(image)
        draw = ImageDraw.Draw(canvas)
        size = canvas.size[0]
        for _ in range(int(rng.integers(4, 14))):
            start, bend, end = rng.uniform(-0.1, 1.1, (3, 2)) * size
            t = np.linspace(0, 1, 24)[:, None]
            points = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end
            shade = int(rng.integers(10, 70))
            draw.line(
                [tuple(p) for p in points],
                fill=(shade, int(shade * 0.8), int(shade * 0.6)),
                width=int(rng.integers(1, 3)),
            )
        out.append(_from_canvas(canvas))
    return torch.stack(out)


def with_ruler(batch: torch.Tensor) -> torch.Tensor:
    """A millimetre scale with tick marks near one edge, as many clinics photograph one.

    Rulers are placed next to suspicious lesions more often than next to banal ones, which
    makes them a shortcut to melanoma; ruled copies of every image take that away.
    """
    out = []
    for image in batch:
        rng = np.random.default_rng(_image_seed(image) + 1)
        canvas = _to_canvas(image)
        size = canvas.size[0]
        mask = Image.new("L", canvas.size, 0)
        draw = ImageDraw.Draw(mask)
        along = float(rng.uniform(0.75, 0.92)) * size  # distance of the scale from the top
        start, length = rng.uniform(0.05, 0.3) * size, rng.uniform(0.4, 0.6) * size
        step = float(rng.uniform(4.0, 8.0))
        draw.line([(start, along), (start + length, along)], fill=255, width=1)
        for index, x in enumerate(np.arange(start, start + length + 0.1, step)):
            tick = 6 if index % 5 == 0 else 3
            draw.line([(x, along - tick), (x, along)], fill=255, width=1)
        if rng.random() < 0.5:  # a vertical scale instead, near the right edge
            mask = mask.transpose(Image.Transpose.ROTATE_90)
        shade = int(rng.integers(0, 60))
        ink = Image.new("RGB", canvas.size, (shade, shade, shade))
        out.append(_from_canvas(Image.composite(ink, canvas, mask)))
    return torch.stack(out)
