"""The bundle's network, loaded once from the bundle's own inference config and weights."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dicom_io.spool import private_directory, write_bytes_durably
from monai_bundle.scripts.metadata import FIELD_SLOTS, METADATA_WIDTH, encode_metadata
from monai_bundle.scripts.network import ScoringNetwork, load_bundle_network
from monai_bundle.scripts.saliency import saliency_from_feature_map, saliency_map
from monai_bundle.scripts.transforms import IMAGE_SIZE, preprocess_rgb
from plugin.domain import Demographics, Finding, ModelIdentity

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The bundle is incomplete or does not match its own network_data_format."""


def use_threads(threads: int) -> int:
    """Set torch's intra-op threads for scoring; 0 picks half the cores (at least one).

    torch's default (one thread per core) collapses when anything else wants a core: measured
    on 2 cores beside another busy process, one image took 7 s with 2 threads and 0.13 s with
    one (docs/performance.md). The service's listener and delivery threads need a core too.
    """
    if threads < 0:
        raise ValueError(f"threads must be 0 (automatic) or more, got {threads}")
    chosen = threads or max(1, (os.cpu_count() or 1) // 2)
    torch.set_num_threads(chosen)
    log.info("scoring with %d torch thread(s)", chosen)
    return chosen


@dataclass(frozen=True)
class Explanation:
    """What Grad-CAM needs of one scored image: the identity view's last feature map from the
    scoring pass (None: compute it again from the image) and the metadata it was scored with."""

    feature_map: torch.Tensor | None
    metadata: np.ndarray


TORCH = "torch"
ONNXRUNTIME = "onnxruntime"
RUNTIMES = (TORCH, ONNXRUNTIME)

# The image branch: a preprocessed batch -> (scoring features, identity view's feature map).
ImageBranch = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class OnnxImageBranch:
    """The network's image branch (every test-time view and the pooling) on ONNX Runtime.

    Measured 3x faster than eager torch per view on these CPU cores, features within 1e-5
    (docs/performance.md); the metadata branch, the head and Grad-CAM stay in torch. The export
    is cached under ``cache_dir`` keyed by the weights and the torch version, so only the first
    start after new weights pays for it (a few seconds).
    """

    session: Any

    @classmethod
    def export(
        cls, network: ScoringNetwork, key: str, cache_dir: Path | None, threads: int
    ) -> OnnxImageBranch:
        import onnxruntime

        cached = None if cache_dir is None else cache_dir / f"image-branch-{key}.onnx"
        if cached is not None and cached.is_file():
            model = cached.read_bytes()
        else:
            model = _exported(network)
            if cached is not None:
                private_directory(cached.parent)
                write_bytes_durably(model, cached)  # 0600 like everything under storage
            log.info("image branch exported to ONNX (%.1f MB)", len(model) / 1e6)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return cls(session)

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        features, feature_map = self.session.run(None, {"image": batch.contiguous().numpy()})
        return torch.from_numpy(features), torch.from_numpy(feature_map)


class _ScoringViews(nn.Module):
    def __init__(self, network: ScoringNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.network.scoring_features_and_map(image)


def _exported(network: ScoringNetwork) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and folding notes
        torch.onnx.export(
            _ScoringViews(network).eval(),
            (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),),
            buffer,
            dynamo=False,
            input_names=["image"],
            output_names=["features", "feature_map"],
            dynamic_axes={"image": {0: "n"}, "features": {0: "n"}, "feature_map": {0: "n"}},
            opset_version=17,
        )
    return buffer.getvalue()


@dataclass
class FusionModel:
    """Scores images with their demographics; one instance per process (weights load once)."""

    network: ScoringNetwork
    identity: ModelIdentity
    threshold: float
    image_branch: ImageBranch | None = None  # None: the network's own, in torch
    runtime: str = TORCH

    @classmethod
    def load(
        cls, bundle_dir: Path, runtime: str = TORCH, cache_dir: Path | None = None
    ) -> FusionModel:
        """``runtime``: where the image branch runs (``torch`` or ``onnxruntime``);
        ``cache_dir``: where the ONNX export is kept between starts (None: exported each time)."""
        if runtime not in RUNTIMES:
            raise ModelLoadError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        configs = bundle_dir / "configs"
        weights = bundle_dir / "models" / "model.pt"
        if not weights.is_file():
            raise ModelLoadError(f"{weights}: no weights (run `dermfusion train`)")
        meta = json.loads((configs / "metadata.json").read_text())
        _check_data_format(meta)
        network = load_bundle_network(bundle_dir).to(memory_format=torch.channels_last)
        operating_point_file = bundle_dir / "models" / "operating_point.json"
        operating_point = json.loads(operating_point_file.read_text())
        identity = ModelIdentity(
            name=meta["name"],
            version=meta["version"],
            weights_digest=weights_digest(weights, operating_point_file),
        )
        branch = None
        if runtime == ONNXRUNTIME:
            if "identity" not in network.test_time_views:
                raise ModelLoadError("onnxruntime needs the identity view among test_time_views")
            key = hashlib.sha256(
                f"{identity.weights_digest} {torch.__version__} {network.test_time_views}".encode()
            ).hexdigest()[:16]
            branch = OnnxImageBranch.export(network, key, cache_dir, torch.get_num_threads())
        return cls(
            network=network,
            identity=identity,
            threshold=float(operating_point["threshold"]),
            image_branch=branch,
            runtime=runtime,
        )

    def score(
        self, images: Sequence[np.ndarray], demographics: Sequence[Demographics]
    ) -> list[Finding]:
        """One Finding per (RGB image, demographics) pair, scored in one batch."""
        return [finding for finding, _ in self.score_explainable(images, demographics)]

    @torch.inference_mode()
    def score_explainable(
        self, images: Sequence[np.ndarray], demographics: Sequence[Demographics]
    ) -> list[tuple[Finding, Explanation]]:
        """``score``, and what ``explain`` needs to draw each image's Grad-CAM without running
        the backbone again.

        The image branch runs once per test-time view; the head runs again per known field with
        that field withheld, which gives each field's attribution at the cost of a few matmuls.
        """
        if len(images) != len(demographics):
            raise ValueError(f"{len(images)} images but {len(demographics)} demographics")
        if not images:
            return []
        batch = torch.stack([preprocess_rgb(rgb) for rgb in images])
        if self.image_branch is None:
            features, feature_maps = self.network.scoring_features_and_map(
                batch.contiguous(memory_format=torch.channels_last)
            )
        else:
            features, feature_maps = self.image_branch(batch)
        encoded = np.stack([_encode(d) for d in demographics])
        metadata = torch.from_numpy(encoded)
        probabilities = self._head(features, metadata)
        withheld = {}
        for name, (values, missing) in FIELD_SLOTS.items():
            without = metadata.clone()
            without[:, values] = 0.0
            without[:, missing] = 1.0
            withheld[name] = self._head(features, without)
        scored = []
        for i, d in enumerate(demographics):
            known = [n for n in FIELD_SLOTS if getattr(d, n).value is not None]
            finding = Finding(
                probability=probabilities[i],
                threshold=self.threshold,
                model=self.identity,
                attributions=tuple((n, probabilities[i] - withheld[n][i]) for n in known),
            )
            # a copy: one image's map must not keep the whole batch's tensor alive
            kept = None if feature_maps is None else feature_maps[i].clone()
            scored.append((finding, Explanation(kept, encoded[i])))
        return scored

    def _head(self, features: torch.Tensor, metadata: torch.Tensor) -> list[float]:
        return [float(p) for p in torch.sigmoid(self.network.head(features, metadata)).reshape(-1)]

    def saliency(self, rgb: np.ndarray, demographics: Demographics) -> np.ndarray:
        """Grad-CAM of the melanoma logit, 224x224 in [0, 1] (the network's view of the image)."""
        return self.explain(rgb, Explanation(None, _encode(demographics)))

    def explain(self, rgb: np.ndarray, explanation: Explanation) -> np.ndarray:
        """``saliency`` of a scored image: from the scoring pass's feature map when it was
        kept, else (e.g. after a restart) from the image again; the same map either way."""
        metadata = torch.from_numpy(explanation.metadata)
        if explanation.feature_map is None:
            return saliency_map(self.network, preprocess_rgb(rgb), metadata)
        return saliency_from_feature_map(self.network, explanation.feature_map, metadata)


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
