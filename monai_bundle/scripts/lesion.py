"""Classical lesion segmentation and size measurement for dermoscopy images.

No lesion masks exist to train on, so this is a deterministic pipeline: shades-of-gray colour
constancy, a blurred lesion-contrast channel with thin dark hairs suppressed, removal of the
dark dermoscope vignette, an Otsu threshold, and the dark component nearest the image centre
with its holes filled. It measures size (area, equivalent-circle diameter); it is not a
diagnostic and says nothing about the lesion's nature.

``scipy`` is a dependency of the pinned scikit-learn, so ``scipy.ndimage`` is always present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

# Work on a copy whose longer side is at most this; the mask is scaled back to the input.
WORK_SIZE = 256
SHADES_OF_GRAY_POWER = 6.0
# Vignette: border-connected pixels darker than this fraction of the median skin brightness.
VIGNETTE_FRACTION = 0.35
# Components smaller than this fraction of the working image are noise (hair ends, pores).
MIN_COMPONENT_FRACTION = 0.002


@dataclass
class LesionMeasurement:
    """A lesion mask over the input image and its size; mm values need a known pixel spacing."""

    mask: np.ndarray
    area_pixels: int
    area_fraction: float
    area_mm2: float | None
    diameter_mm: float | None


def _check_rgb(rgb: object) -> np.ndarray:
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"expected an HxWx3 uint8 RGB numpy array, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB values, got dtype {rgb.dtype}")
    if min(rgb.shape[:2]) < 16:
        raise ValueError(f"image {rgb.shape[1]}x{rgb.shape[0]} is too small to segment")
    return rgb


def _check_spacing(spacing: tuple[float, float] | None) -> tuple[float, float] | None:
    if spacing is None:
        return None
    if len(spacing) != 2:
        raise ValueError(f"pixel spacing must be (row, column) in mm, got {spacing!r}")
    row, column = float(spacing[0]), float(spacing[1])
    if not (math.isfinite(row) and math.isfinite(column) and row > 0 and column > 0):
        raise ValueError(f"pixel spacing must be two positive mm values, got {spacing!r}")
    return row, column


def _shades_of_gray(image: np.ndarray, power: float = SHADES_OF_GRAY_POWER) -> np.ndarray:
    """Divide out the illuminant colour (Minkowski p-norm estimate) so skin tone is comparable."""
    illuminant = np.power(np.mean(np.power(image, power), axis=(0, 1)), 1.0 / power)
    illuminant = np.maximum(illuminant, 1e-6)
    scale = illuminant.mean() / illuminant
    return np.clip(image * scale, 0.0, 1.0)


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (between-class variance maximised over a histogram)."""
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-9:
        return high
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight_low = np.cumsum(counts).astype(np.float64)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1.0)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1.0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _border_labels(labels: np.ndarray) -> np.ndarray:
    edges = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return np.unique(edges[edges > 0])


def _lesion_mask(rgb: np.ndarray) -> np.ndarray:
    """Lesion mask at the working resolution (the steps are in the module docstring)."""
    height, width = rgb.shape[:2]
    scale = min(1.0, WORK_SIZE / max(height, width))
    image = Image.fromarray(rgb)
    if scale < 1.0:
        size = (max(16, round(width * scale)), max(16, round(height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    work = np.asarray(image, dtype=np.float64) / 255.0
    rows, cols = work.shape[:2]
    brightness = work.mean(axis=2)

    # Dermoscope vignette: very dark regions reaching the image border.
    skin_level = float(np.median(brightness))
    very_dark = ndimage.uniform_filter(brightness, size=5) < VIGNETTE_FRACTION * skin_level
    dark_labels, _ = ndimage.label(very_dark)
    vignette = np.isin(dark_labels, _border_labels(dark_labels))
    vignette = ndimage.binary_dilation(vignette, iterations=2)

    # Lesion contrast: melanin absorbs blue most, so use the (colour-corrected) blue channel
    # mixed with brightness; a grey closing removes dark hairs thinner than the element.
    balanced = _shades_of_gray(work)
    contrast = 0.5 * balanced[..., 2] + 0.5 * balanced.mean(axis=2)
    hair = max(3, round(min(rows, cols) / 40))
    contrast = ndimage.grey_closing(contrast, size=(hair, hair))
    contrast = ndimage.gaussian_filter(contrast, sigma=min(rows, cols) / 100)

    inside = ~vignette
    if inside.sum() < 0.05 * inside.size:
        return np.zeros((rows, cols), dtype=bool)
    threshold = _otsu_threshold(contrast[inside])
    dark = (contrast < threshold) & inside
    dark = ndimage.binary_opening(dark, iterations=2)

    labels, count = ndimage.label(dark)
    if count == 0:
        return np.zeros((rows, cols), dtype=bool)
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index)
    candidates = set(index[areas >= MIN_COMPONENT_FRACTION * labels.size].tolist())
    central = candidates - set(_border_labels(labels).tolist())
    if central:
        candidates = central
    if not candidates:
        return np.zeros((rows, cols), dtype=bool)
    # Distance from the image centre to each component's nearest pixel (0 if it covers it).
    centre = np.zeros((rows, cols), dtype=bool)
    centre[rows // 2, cols // 2] = True
    distance = ndimage.distance_transform_edt(~centre)
    nearest = min(
        candidates,
        key=lambda label: (float(distance[labels == label].min()), -float(areas[label - 1])),
    )
    mask = ndimage.binary_fill_holes(labels == nearest)
    return np.asarray(mask, dtype=bool)


def measure_lesion(
    rgb: np.ndarray, pixel_spacing_mm: tuple[float, float] | None = None
) -> LesionMeasurement:
    """Segment the lesion in an HxWx3 uint8 RGB image and measure it.

    ``pixel_spacing_mm`` is DICOM PixelSpacing order, (row, column) in mm per pixel of ``rgb``;
    without it only pixel measures are given (mm fields are None).
    """
    _check_rgb(rgb)
    spacing = _check_spacing(pixel_spacing_mm)
    height, width = rgb.shape[:2]
    small = _lesion_mask(rgb)
    if small.shape != (height, width):
        scaled = Image.fromarray(small.astype(np.uint8) * 255).resize(
            (width, height), Image.Resampling.BILINEAR
        )
        mask = np.asarray(scaled) >= 128
    else:
        mask = small
    area = int(mask.sum())
    area_mm2 = None if spacing is None else area * spacing[0] * spacing[1]
    diameter = None if area_mm2 is None else 2.0 * math.sqrt(area_mm2 / math.pi)
    return LesionMeasurement(
        mask=mask,
        area_pixels=area,
        area_fraction=area / float(height * width),
        area_mm2=area_mm2,
        diameter_mm=diameter,
    )
