"""Training of the first FusionNet: frozen ImageNet backbone, fusion head on cached features.

Run through the bundle (``configs/train.json``) or ``dermfusion train``; same seed, same weights.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from monai_bundle.scripts.data import Cases, encode_frame, isic_weights, load_cases, split_by_group
from monai_bundle.scripts.evaluation import (
    auc_with_interval,
    expected_calibration_error,
    operating_point,
    threshold_for_sensitivity,
)
from monai_bundle.scripts.features import VIEWS, image_features
from monai_bundle.scripts.metadata import drop_fields, encode_missing
from monai_bundle.scripts.network import FusionNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadInputs:
    """What a head fit reads, row-aligned with ``cases.frame``: loaded once, shared by folds."""

    cases: Cases
    features: dict[str, np.ndarray]
    metadata: np.ndarray
    labels: np.ndarray


class FrozenBackboneTrainer:
    """Trains the metadata branch and fusion head; the EfficientNet-Lite0 backbone stays ImageNet.

    Validation is disjoint by lesion (HAM10000: one image per lesion) and by patient (ISIC 2020).
    The operating threshold is the highest one reaching ``sensitivity_target`` on validation.
    """

    def __init__(
        self,
        *,
        data_root: str,
        cache_dir: str,
        output_dir: str,
        seed: int = 0,
        val_fraction: float = 0.2,
        epochs: int = 30,
        batch_size: int = 256,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        p_field_drop: float = 0.3,
        p_all_drop: float = 0.2,
        sensitivity_target: float = 0.95,
        max_images: int | None = None,
        views: list[str] | None = None,
    ) -> None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if not 0 < sensitivity_target < 1:
            raise ValueError(f"sensitivity_target must be in (0, 1), got {sensitivity_target}")
        self.data_root = data_root
        self.cache_dir = cache_dir
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.val_fraction = val_fraction
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.p_field_drop = p_field_drop
        self.p_all_drop = p_all_drop
        self.sensitivity_target = sensitivity_target
        self.max_images = max_images
        self.views = list(views or VIEWS)

    def run(self) -> dict[str, Any]:
        torch.manual_seed(self.seed)
        cases = load_cases(self.data_root)
        if self.max_images is not None:
            cases = self._subsample(cases)
        frame = cases.frame
        is_val = split_by_group(cases, self.val_fraction, self.seed)
        network = FusionNet(imagenet_init=True)
        inputs = self.head_inputs(cases, network)
        features, metadata, labels = inputs.features, inputs.metadata, inputs.labels
        log.info(
            "training on %d images (%d melanoma), validating on %d (%d melanoma)",
            (~is_val).sum(),
            labels[~is_val].sum(),
            is_val.sum(),
            labels[is_val].sum(),
        )
        self._fit_head(network, features, metadata, labels, ~is_val)
        report = self._validate(network, features["identity"], metadata, frame, is_val)
        self._save(network, report)
        return report

    def fresh_network(self) -> FusionNet:
        """An untrained head on the ImageNet backbone, initialised exactly as ``run`` does."""
        torch.manual_seed(self.seed)
        return FusionNet(imagenet_init=True)

    def head_inputs(self, cases: Cases, network: FusionNet | None = None) -> HeadInputs:
        """Cached features, encoded metadata and labels of ``cases``, so folds share one cache.

        ``network`` only computes features on a cache miss; a fresh one is built if none is given.
        """
        frame = cases.frame
        features = image_features(
            network if network is not None else self.fresh_network(),
            list(frame.image),
            self.views,
            self.cache_dir,
        )
        metadata = encode_frame(frame)
        labels = frame.label.to_numpy().astype(np.float32)
        return HeadInputs(cases, features, metadata, labels)

    def fit_fresh_head(self, inputs: HeadInputs, is_train: np.ndarray) -> FusionNet:
        """A new head trained by this recipe on the rows ``is_train`` selects (cross-validation).

        Same initialisation, seed and hyperparameters as ``run``; nothing is written to disk.
        """
        network = self.fresh_network()
        self._fit_head(network, inputs.features, inputs.metadata, inputs.labels, is_train)
        return network

    def _subsample(self, cases: Cases) -> Cases:
        """A small stratified subset (half melanoma) for smoke runs."""
        rng = np.random.default_rng(self.seed)
        frame = cases.frame
        picked: list[int] = []
        for label in (0, 1):
            rows = frame.index[frame.label == label].to_numpy()
            picked += rng.choice(rows, min(len(rows), self.max_images // 2), replace=False).tolist()
        return Cases(frame.loc[sorted(picked)].reset_index(drop=True))

    def _fit_head(
        self,
        network: FusionNet,
        features: dict[str, np.ndarray],
        metadata: np.ndarray,
        labels: np.ndarray,
        is_train: np.ndarray,
    ) -> None:
        x = torch.from_numpy(np.concatenate([features[v][is_train] for v in self.views]))
        m = torch.from_numpy(np.concatenate([metadata[is_train]] * len(self.views)))
        y = torch.from_numpy(np.concatenate([labels[is_train]] * len(self.views)))
        params = [*network.metadata_branch.parameters(), *network.classifier.parameters()]
        optimiser = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        steps_per_epoch = math.ceil(len(y) / self.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=self.learning_rate, total_steps=self.epochs * steps_per_epoch
        )
        loss_fn = nn.BCEWithLogitsLoss()
        # Dropout draws from the global generator, which feature extraction may or may not have
        # used (cache miss or hit): re-seed so the weights depend on the seed alone.
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        network.train()
        progress = tqdm(range(self.epochs), desc="fusion head", unit="epoch")
        for _ in progress:
            order = torch.randperm(len(y), generator=generator)
            total = 0.0
            for start in range(0, len(y), self.batch_size):
                idx = order[start : start + self.batch_size]
                meta = drop_fields(m[idx], self.p_field_drop, self.p_all_drop, generator)
                loss = loss_fn(network.head(x[idx], meta).squeeze(1), y[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                total += float(loss) * len(idx)
            progress.set_postfix(loss=f"{total / len(y):.4f}")
        network.eval()

    @torch.inference_mode()
    def _probabilities(
        self, network: FusionNet, features: np.ndarray, metadata: np.ndarray
    ) -> np.ndarray:
        logits = network.head(torch.from_numpy(features), torch.from_numpy(metadata))
        return torch.sigmoid(logits).squeeze(1).numpy()

    def _validate(
        self,
        network: FusionNet,
        features: np.ndarray,
        metadata: np.ndarray,
        frame: Any,
        is_val: np.ndarray,
    ) -> dict[str, Any]:
        no_metadata = encode_missing(len(frame))
        labels = frame.label.to_numpy()
        with_meta = self._probabilities(network, features, metadata)
        image_only = self._probabilities(network, features, no_metadata)
        threshold = threshold_for_sensitivity(
            labels[is_val], with_meta[is_val], self.sensitivity_target
        )
        report: dict[str, Any] = {
            "seed": self.seed,
            "validation": "lesion-disjoint (HAM10000) and patient-disjoint (ISIC 2020) hold-out",
            "n_train": int((~is_val).sum()),
            "sensitivity_target": self.sensitivity_target,
            "threshold": threshold,
            "subsets": {},
        }
        weights = isic_weights(frame)
        subsets = {
            "all": is_val,
            "ham10000": is_val & (frame.source == "ham10000").to_numpy(),
            "isic2020": is_val & (frame.source == "isic2020").to_numpy(),
        }
        for name, mask in subsets.items():
            if labels[mask].min() == labels[mask].max():
                continue
            entry: dict[str, Any] = {}
            for mode, probs in (("with_metadata", with_meta), ("no_metadata", image_only)):
                w = weights[mask] if name == "isic2020" else None
                entry[mode] = {
                    **auc_with_interval(labels[mask], probs[mask], seed=self.seed),
                    **operating_point(labels[mask], probs[mask], threshold, w),
                    "ece": expected_calibration_error(labels[mask], probs[mask], w),
                }
            report["subsets"][name] = entry
        log.info("validation: %s", json.dumps(report["subsets"], indent=1))
        return report

    def _save(self, network: FusionNet, report: dict[str, Any]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(network.state_dict(), self.output_dir / "model.pt")
        (self.output_dir / "operating_point.json").write_text(
            json.dumps(
                {"threshold": report["threshold"], "sensitivity_target": self.sensitivity_target},
                indent=2,
            )
            + "\n"
        )
        (self.output_dir / "validation_metrics.json").write_text(
            json.dumps(report, indent=2) + "\n"
        )
        log.info(
            "wrote model.pt, operating_point.json and validation_metrics.json to %s",
            self.output_dir,
        )
