"""Grad-CAM saliency for FusionNet's melanoma logit, and a PNG overlay for reviewers.

The map answers "which parts of the image pushed the melanoma logit up more than the rest of
it" for one case with its metadata. The backbone runs without autograd; only the pooled head is
differentiated, with respect to the last feature map (``torch.autograd.grad``), so the shared,
loaded network (the service scores with it from other threads) is never copied, hooked, put in
another mode or given a ``.grad``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from monai_bundle.scripts.metadata import METADATA_WIDTH
from monai_bundle.scripts.network import ScoringNetwork
from monai_bundle.scripts.transforms import IMAGE_SIZE

# Weight of the colour map at saliency 1 in ``overlay_rgb``; it falls linearly to 0 at saliency 0.
OVERLAY_ALPHA = 0.45


def _check_inputs(image: torch.Tensor, metadata: torch.Tensor) -> None:
    if tuple(image.shape) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"image must be a preprocessed 3x{IMAGE_SIZE}x{IMAGE_SIZE} tensor, got "
            f"{tuple(image.shape)}"
        )
    if tuple(metadata.shape) != (METADATA_WIDTH,):
        raise ValueError(
            f"metadata must be an encoded vector of {METADATA_WIDTH}, got {tuple(metadata.shape)}"
        )


def saliency_map(
    network: ScoringNetwork, image: torch.Tensor, metadata: torch.Tensor
) -> np.ndarray:
    """Grad-CAM of the melanoma logit as a 224x224 float32 map in [0, 1] (1 = most salient).

    ``image`` is one ``preprocess_rgb`` output, ``metadata`` one ``encode_metadata`` vector.
    Each location's evidence is the gradient-weighted sum of the feature channels there, taken
    relative to the image's own mean (``A - mean(A)``): a whole-network model puts most images'
    evidence below zero in absolute terms (the head's bias and calibration shift the logit), so
    plain Grad-CAM's ReLU would blank the map of most lesions. Only evidence above the image's
    average is kept; a featureless image gives an all-zero map, not stretched noise.
    """
    _check_inputs(image, metadata)
    # Callers may sit inside FusionModel.score's inference_mode; the head needs autograd.
    with torch.inference_mode(False), torch.no_grad():
        x = image.detach().clone().float().unsqueeze(0)
        feature_map = network.feature_map(x.contiguous(memory_format=torch.channels_last))
    return saliency_from_feature_map(network, feature_map[0], metadata)


def saliency_from_feature_map(
    network: ScoringNetwork, feature_map: torch.Tensor, metadata: torch.Tensor
) -> np.ndarray:
    """``saliency_map`` from the image's last feature map (C x h x w) as scoring computed it
    (``FusionNet.scoring_features_and_map``): only the head is run again, with autograd."""
    if feature_map.ndim != 3:
        raise ValueError(f"feature_map must be C x h x w, got {tuple(feature_map.shape)}")
    if tuple(metadata.shape) != (METADATA_WIDTH,):
        raise ValueError(
            f"metadata must be an encoded vector of {METADATA_WIDTH}, got {tuple(metadata.shape)}"
        )
    # Inference-mode tensors cannot enter autograd: a plain copy can.
    with torch.inference_mode(False), torch.enable_grad():
        feature_map = feature_map.detach().clone().float().unsqueeze(0).requires_grad_(True)
        meta = metadata.detach().clone().float().reshape(1, -1)
        logit = network.head(feature_map.mean(dim=(2, 3)), meta)
        (gradient,) = torch.autograd.grad(logit.sum(), feature_map)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    centred = feature_map.detach() - feature_map.detach().mean(dim=(2, 3), keepdim=True)
    raw = nn.functional.relu((weights * centred).sum(dim=1, keepdim=True))
    heat = (
        nn.functional.interpolate(
            raw, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
        )[0, 0]
        .numpy()
        .astype(np.float32)
    )
    high = float(heat.max())
    if not np.isfinite(high) or high <= 1e-12:
        return np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    return np.clip(heat / high, 0.0, 1.0).astype(np.float32)


def jet_colours(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map (blue → cyan → yellow → red) for values in [0, 1], as uint8 RGB."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # where R, G, B peak
    rgb = np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)
    return np.round(rgb * 255.0).astype(np.uint8)


def overlay_rgb(rgb: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """The source image, at its own size and colours, tinted by the map, as HxWx3 uint8.

    The 224x224 map is stretched bilinearly to the image's HxW (the network saw the image
    squashed to 224x224, so stretching back lines the map up with the source pixels). Each pixel
    is blended as ``(1 - w) * source + w * jet(s)`` with ``w = OVERLAY_ALPHA * s``: the tint grows
    with the evidence, so where the map is 0 the pixel is the source's own (the reviewer sees the
    lesion's true colours where the model found nothing), and the most salient pixels keep
    ``1 - OVERLAY_ALPHA`` of their own colour under the red.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    if saliency.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"saliency must be {IMAGE_SIZE}x{IMAGE_SIZE}, got {saliency.shape}")
    heat = _stretch(saliency, rgb.shape[0], rgb.shape[1])
    weight = (OVERLAY_ALPHA * heat)[..., None]
    colours = jet_colours(heat).astype(np.float32)
    blended = (1.0 - weight) * rgb.astype(np.float32) + weight * colours
    # At s = 0 this is 1.0 * source + 0.0 * colour, exact in float32: the source pixel itself.
    return np.round(blended).clip(0, 255).astype(np.uint8)


def _stretch(saliency: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The map resized bilinearly to rows x columns, kept in [0, 1] (float32)."""
    heat = np.clip(np.nan_to_num(saliency.astype(np.float32), nan=0.0), 0.0, 1.0)
    if heat.shape == (rows, columns):
        return heat
    resized = Image.fromarray(heat).resize((columns, rows), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def overlay_png(rgb: np.ndarray, saliency: np.ndarray, path: Path) -> None:
    """Write ``overlay_rgb`` as a PNG: the source image at its own size, tinted by the map."""
    Image.fromarray(overlay_rgb(rgb, saliency)).save(Path(path), format="PNG")
