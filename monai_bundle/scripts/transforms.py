"""Image preprocessing shared by training, the bundle's inference config and the service.

Everything that scores an image goes through ``preprocess_rgb`` so that a DICOM file and the
JPEG it was made from give the same probability.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform
from PIL import Image

IMAGE_SIZE = 224
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as an HxWx3 uint8 RGB array."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def preprocess_rgb(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB → 3x224x224 float, squashed like the training data, ImageNet-normalised."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    image = Image.fromarray(rgb)
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    array = (np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class LoadDermoscopyd(MapTransform):
    """Replace a path under each key with the preprocessed image tensor."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = preprocess_rgb(load_rgb(out[key]))
        return out
