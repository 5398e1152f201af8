"""The bundle's network, loaded once from the bundle's own inference config and weights."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from monai_bundle.scripts.metadata import FIELD_SLOTS, METADATA_WIDTH, encode_metadata
from monai_bundle.scripts.network import load_bundle_network
from monai_bundle.scripts.saliency import saliency_map
from monai_bundle.scripts.transforms import IMAGE_SIZE, preprocess_rgb
from plugin.domain import Demographics, Finding, ModelIdentity


class ModelLoadError(RuntimeError):
    """The bundle is incomplete or does not match its own network_data_format."""


@dataclass
class FusionModel:
    """Scores images with their demographics; one instance per process (weights load once)."""

    network: torch.nn.Module
    identity: ModelIdentity
    threshold: float

    @classmethod
    def load(cls, bundle_dir: Path) -> FusionModel:
        configs = bundle_dir / "configs"
        weights = bundle_dir / "models" / "model.pt"
        if not weights.is_file():
            raise ModelLoadError(f"{weights}: no weights (run `dermfusion train`)")
        meta = json.loads((configs / "metadata.json").read_text())
        _check_data_format(meta)
        network = load_bundle_network(bundle_dir).to(memory_format=torch.channels_last)
        operating_point_file = bundle_dir / "models" / "operating_point.json"
        operating_point = json.loads(operating_point_file.read_text())
        return cls(
            network=network,
            identity=ModelIdentity(
                name=meta["name"],
                version=meta["version"],
                weights_digest=weights_digest(weights, operating_point_file),
            ),
            threshold=float(operating_point["threshold"]),
        )

    @torch.inference_mode()
    def score(
        self, images: Sequence[np.ndarray], demographics: Sequence[Demographics]
    ) -> list[Finding]:
        """One Finding per (RGB image, demographics) pair, scored in one batch.

        The image branch runs once per test-time view; the head runs again per known field with
        that field withheld, which gives each field's attribution at the cost of a few matmuls.
        """
        if len(images) != len(demographics):
            raise ValueError(f"{len(images)} images but {len(demographics)} demographics")
        if not images:
            return []
        batch = torch.stack([preprocess_rgb(rgb) for rgb in images])
        features = self.network.scoring_features(
            batch.contiguous(memory_format=torch.channels_last)
        )
        metadata = torch.from_numpy(np.stack([_encode(d) for d in demographics]))
        probabilities = self._head(features, metadata)
        withheld = {}
        for name, (values, missing) in FIELD_SLOTS.items():
            without = metadata.clone()
            without[:, values] = 0.0
            without[:, missing] = 1.0
            withheld[name] = self._head(features, without)
        findings = []
        for i, d in enumerate(demographics):
            known = [n for n in FIELD_SLOTS if getattr(d, n).value is not None]
            findings.append(
                Finding(
                    probability=probabilities[i],
                    threshold=self.threshold,
                    model=self.identity,
                    attributions=tuple((n, probabilities[i] - withheld[n][i]) for n in known),
                )
            )
        return findings

    def _head(self, features: torch.Tensor, metadata: torch.Tensor) -> list[float]:
        return [float(p) for p in torch.sigmoid(self.network.head(features, metadata)).reshape(-1)]

    def saliency(self, rgb: np.ndarray, demographics: Demographics) -> np.ndarray:
        """Grad-CAM of the melanoma logit, 224x224 in [0, 1] (the network's view of the image)."""
        return saliency_map(
            self.network, preprocess_rgb(rgb), torch.from_numpy(_encode(demographics))
        )


def weights_digest(*files: Path) -> str:
    """sha256 over what decides a score: the weights and the operating point."""
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _encode(d: Demographics) -> np.ndarray:
    return encode_metadata(
        None if d.age.value is None else float(d.age.value),
        None if d.sex.value is None else str(d.sex.value),
        None if d.site.value is None else str(d.site.value),
    )


def _check_data_format(meta: dict) -> None:  # type: ignore[type-arg]
    """Refuse a bundle whose declared inputs differ from what this code feeds the network."""
    inputs = meta["network_data_format"]["inputs"]
    image, metadata = inputs["image"], inputs["metadata"]
    if image["num_channels"] != 3 or image["spatial_shape"] != [IMAGE_SIZE, IMAGE_SIZE]:
        raise ModelLoadError(
            f"bundle expects image {image['num_channels']}x{image['spatial_shape']}, "
            f"code provides 3x[{IMAGE_SIZE}, {IMAGE_SIZE}]"
        )
    if metadata["num_channels"] != METADATA_WIDTH:
        raise ModelLoadError(
            f"bundle expects {metadata['num_channels']} metadata channels, code provides "
            f"{METADATA_WIDTH}"
        )
