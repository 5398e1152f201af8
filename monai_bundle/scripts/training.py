"""Training of FusionNet: fusion head, and optionally the top backbone blocks, on cached inputs.

Run through the bundle (``configs/train.json``) or ``dermfusion train``; same seed, same weights.
The recipe: cached multi-view features (mask, colour constancy and block taps as the network
options say), the ISIC 2020 table's metadata prior, metadata dropout, then a Platt calibration
fitted on validation at the real ISIC 2020 prevalence. With ``fine_tuned_from`` set in the network
options, blocks from that index onwards are fine-tuned too, starting from cached output maps of
the block below: the frozen lower blocks, most of a forward pass, run once per image and view.
With ``image_only_companion`` in the network options, an image-only model is trained beside the
fusion model by the same recipe (every field always missing) and shipped inside the network.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn
from tqdm import tqdm

from monai_bundle.scripts.data import (
    DIAGNOSIS_CLASSES,
    NO_DIAGNOSIS_CLASS,
    Cases,
    diagnosis_targets,
    encode_frame,
    isic_patients,
    isic_weights,
    load_cases,
    split_by_group,
)
from monai_bundle.scripts.evaluation import (
    auc_difference_with_interval,
    auc_with_interval,
    expected_calibration_error,
    operating_point,
    sigmoid,
    threshold_for_sensitivity,
)
from monai_bundle.scripts.features import block_maps, image_features
from monai_bundle.scripts.metadata import drop_fields, encode_missing
from monai_bundle.scripts.network import VIEWS, FusionNet, with_image_only_companion
from monai_bundle.scripts.priors import fit_metadata_prior, isic_table

log = logging.getLogger(__name__)

# image features, metadata, melanoma labels, diagnosis targets, row weights (None: all equal)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]

# Whose validation cases the Platt calibration is fitted on. ISIC 2020 rows are always reweighted
# to the table's 2% prevalence; "all" adds the HAM10000 rows (about 8% melanoma) at weight 1.
CALIBRATION_POPULATIONS = ("isic2020", "all")
CALIBRATION_FOLDS = 2


@dataclass(frozen=True)
class HeadInputs:
    """What a head fit reads, row-aligned with ``cases.frame``: loaded once, shared by folds."""

    cases: Cases
    features: dict[str, np.ndarray]
    metadata: np.ndarray
    labels: np.ndarray
    diagnoses: np.ndarray  # ``diagnosis_targets``: index into DIAGNOSIS_CLASSES or none
    prior_weight: np.ndarray | None
    maps: dict[str, np.ndarray] | None = None  # per view: output of block fine_tuned_from - 1


class FusionTrainer:
    """Trains the metadata branch and fusion head, and the top backbone blocks if asked to.

    Blocks below ``network.fine_tuned_from`` (all of them when unset) keep their ImageNet weights;
    the BatchNorm statistics of the fine-tuned ones stay ImageNet's too (small, mixed batches).

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
        backbone_learning_rate: float = 1e-4,
        weight_decay: float = 1e-4,
        p_field_drop: float = 0.3,
        p_all_drop: float = 0.2,
        diagnosis_loss_weight: float = 0.0,
        weight_averaging_epochs: int = 0,
        clinic_prevalence_weighting: bool = False,
        max_row_weight: float = 10.0,
        sensitivity_target: float = 0.95,
        max_images: int | None = None,
        views: list[str] | None = None,
        network: dict[str, Any] | None = None,
        calibrate_on: str | None = None,
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
        self.backbone_learning_rate = backbone_learning_rate
        self.weight_decay = weight_decay
        self.p_field_drop = p_field_drop
        self.p_all_drop = p_all_drop
        classes = (network or {}).get("diagnosis_classes", 0)
        if classes not in (0, len(DIAGNOSIS_CLASSES)):
            raise ValueError(f"diagnosis_classes must be 0 or {len(DIAGNOSIS_CLASSES)}")
        if bool(classes) != (diagnosis_loss_weight > 0):
            # a diagnosis head without its loss would ship untrained weights, and the loss
            # needs the head
            raise ValueError("diagnosis_loss_weight > 0 if and only if diagnosis_classes is set")
        self.diagnosis_loss_weight = diagnosis_loss_weight
        if not 0 <= weight_averaging_epochs <= epochs:
            raise ValueError(
                f"weight_averaging_epochs must be in 0..epochs, got {weight_averaging_epochs}"
            )
        self.weight_averaging_epochs = weight_averaging_epochs
        if max_row_weight < 1:
            raise ValueError(f"max_row_weight must be at least 1, got {max_row_weight}")
        self.clinic_prevalence_weighting = clinic_prevalence_weighting
        self.max_row_weight = max_row_weight
        self.sensitivity_target = sensitivity_target
        self.max_images = max_images
        self.views = list(views or VIEWS)
        self.network_options = dict(network or {})
        test_views = self.network_options.get("test_time_views", ["identity"])
        if not set(test_views) <= set(self.views):
            raise ValueError(f"test_time_views {test_views} must be among the views {self.views}")
        self.test_time_views = list(test_views)
        if calibrate_on not in (None, *CALIBRATION_POPULATIONS):
            raise ValueError(f"calibrate_on must be one of {CALIBRATION_POPULATIONS} or null")
        if calibrate_on and not self.network_options.get("calibrated"):
            raise ValueError("calibrate_on needs a network built with calibrated=True")
        self.calibrate_on = calibrate_on
        self.fine_tuned_from: int | None = self.network_options.get("fine_tuned_from")
        self.image_only_companion = bool(self.network_options.get("image_only_companion"))

    def run(self) -> dict[str, Any]:
        torch.manual_seed(self.seed)
        cases = load_cases(self.data_root)
        if self.max_images is not None:
            cases = self._subsample(cases)
        frame = cases.frame
        is_val = split_by_group(cases, self.val_fraction, self.seed)
        network = self.fresh_network()
        inputs = self.head_inputs(cases, network)
        labels = inputs.labels
        log.info(
            "training on %d images (%d melanoma), validating on %d (%d melanoma)",
            (~is_val).sum(),
            labels[~is_val].sum(),
            is_val.sum(),
            labels[is_val].sum(),
        )
        self._fit_head(network, inputs, ~is_val)
        network = self._with_companion(network, inputs, ~is_val)
        scoring = self.scoring_features(inputs, network)
        if self.fine_tuned_from is not None:
            # validation exactly as the service scores it: the whole network from the image
            # (the cached maps are float16), and the evaluation report reads the same cache
            scoring[is_val] = self._end_to_end_features(network, list(frame.image[is_val]))
        calibration = self._calibrate(network, scoring, inputs.metadata, frame, is_val)
        report = self._validate(network, scoring, inputs.metadata, frame, is_val)
        report["image_only_model"] = self._image_only_ablation(inputs, scoring, network, is_val)
        if network.diagnosis_classes:
            report["diagnosis_head"] = _diagnosis_validation(
                network, scoring[is_val], inputs.diagnoses[is_val]
            )
        if calibration is not None:
            report["calibration"] = calibration
        self._save(network, report)
        return report

    def fresh_network(self) -> FusionNet:
        """An untrained head on the ImageNet backbone, initialised exactly as ``run`` does.

        Without the image-only companion: fusion model and companion are trained apart, then
        joined (``_with_companion``).
        """
        torch.manual_seed(self.seed)
        options = {k: v for k, v in self.network_options.items() if k != "image_only_companion"}
        return FusionNet(imagenet_init=True, **options)

    def _with_companion(
        self, fusion: FusionNet, inputs: HeadInputs, is_train: np.ndarray
    ) -> FusionNet:
        """``fusion`` joined with an image-only model trained by this recipe on the same rows;
        ``fusion`` itself where the options ask for no companion."""
        if not self.image_only_companion:
            return fusion
        log.info("training the image-only companion (every field missing)")
        image_only = self.fresh_network()
        self._fit_head(image_only, _without_metadata(inputs), is_train)
        return with_image_only_companion(fusion, image_only, self.network_options)

    def head_inputs(self, cases: Cases, network: FusionNet | None = None) -> HeadInputs:
        """Cached features, encoded metadata and labels of ``cases``, so folds share one cache.

        ``network`` only computes features on a cache miss; a fresh one is built if none is given.
        """
        frame = cases.frame
        network = network if network is not None else self.fresh_network()
        features = image_features(network, list(frame.image), self.views, self.cache_dir)
        maps = None
        if self.fine_tuned_from is not None:
            below = self.fine_tuned_from - 1
            cached = block_maps(network, list(frame.image), self.views, [below], self.cache_dir)
            maps = {view: cached[(view, below)] for view in self.views}
        metadata = encode_frame(frame)
        labels = frame.label.to_numpy().astype(np.float32)
        diagnoses = diagnosis_targets(frame)
        prior = None
        if self.network_options.get("metadata_prior"):
            # never learn the prior from a patient whose images validate this recipe
            is_val = split_by_group(cases, self.val_fraction, self.seed)
            held_out = isic_patients(frame.group[is_val])
            prior = fit_metadata_prior(isic_table(self.data_root, held_out), self.seed)
        return HeadInputs(cases, features, metadata, labels, diagnoses, prior, maps)

    def scoring_features(self, inputs: HeadInputs, network: FusionNet) -> np.ndarray:
        """Features as scoring sees them: averaged over the test-time views.

        Cached as they are for a frozen backbone; through ``network``'s fine-tuned top blocks
        from the cached maps otherwise.
        """
        if self.fine_tuned_from is None:
            return np.mean([inputs.features[v] for v in self.test_time_views], axis=0)
        return np.mean([self._tuned_features(network, inputs, v) for v in self.test_time_views], 0)

    def _end_to_end_features(self, network: FusionNet, paths: list[str]) -> np.ndarray:
        cached = image_features(network, paths, self.test_time_views, self.cache_dir)
        return np.mean([cached[v] for v in self.test_time_views], axis=0)

    @torch.inference_mode()
    def _tuned_features(self, network: FusionNet, inputs: HeadInputs, view: str) -> np.ndarray:
        network.eval()
        chunks = [
            np.arange(i, min(i + 256, len(inputs.labels)))
            for i in range(0, len(inputs.labels), 256)
        ]
        only_view = [view]
        return np.concatenate(
            [
                self._view_features(
                    network, inputs, rows, np.zeros(len(rows), int), only_view
                ).numpy()
                for rows in chunks
            ]
        )

    def _view_features(
        self,
        network: FusionNet,
        inputs: HeadInputs,
        rows: np.ndarray,
        view_index: np.ndarray,
        views: list[str],
    ) -> torch.Tensor:
        """Features of ``rows``, row i seen in ``views[view_index[i]]``, via the top blocks."""
        assert inputs.maps is not None and self.fine_tuned_from is not None
        columns = network.tap_columns()
        first = self.fine_tuned_from
        frozen_taps = network.taps_below(first)
        x = torch.empty((len(rows), *inputs.maps[views[0]].shape[1:]), dtype=torch.float32)
        width = {n: columns[n].stop - columns[n].start for n in frozen_taps}
        frozen = {n: torch.empty(len(rows), width[n]) for n in frozen_taps}
        for k, view in enumerate(views):
            picked = np.flatnonzero(view_index == k)
            if len(picked) == 0:
                continue
            source = rows[picked]
            x[picked] = torch.from_numpy(np.asarray(inputs.maps[view][source], dtype=np.float32))
            for n in frozen_taps:
                frozen[n][picked] = torch.from_numpy(inputs.features[view][source, columns[n]])
        return network.features_from_block(x, first, frozen)

    def fit_fresh_head(self, inputs: HeadInputs, is_train: np.ndarray) -> FusionNet:
        """A new head (and top blocks, if fine-tuned) trained by this recipe on the rows
        ``is_train`` selects (cross-validation).

        Same initialisation, seed and hyperparameters as ``run``; nothing is written to disk.
        """
        network = self.fresh_network()
        self._fit_head(network, inputs, is_train)
        return self._with_companion(network, inputs, is_train)

    def _subsample(self, cases: Cases) -> Cases:
        """A small stratified subset (half melanoma) for smoke runs."""
        rng = np.random.default_rng(self.seed)
        frame = cases.frame
        picked: list[int] = []
        for label in (0, 1):
            rows = frame.index[frame.label == label].to_numpy()
            picked += rng.choice(rows, min(len(rows), self.max_images // 2), replace=False).tolist()
        return Cases(frame.loc[sorted(picked)].reset_index(drop=True))

    def _fit_head(self, network: FusionNet, inputs: HeadInputs, is_train: np.ndarray) -> None:
        if inputs.prior_weight is not None:
            network.set_metadata_prior(inputs.prior_weight)
        fusion = [*network.metadata_branch.parameters(), *network.classifier.parameters()]
        diagnosis = (
            [*network.diagnosis_classifier.parameters()] if network.diagnosis_classes else []
        )
        if not network.metadata_residual:
            self._fit_jointly(network, inputs, is_train, fusion + diagnosis)
            return
        # the image path first, as the image-only model (with nothing known the metadata
        # correction is exactly zero, so only the image path learns), then the correction on
        # top of its settled features
        blind = _without_metadata(inputs)
        image_path = [*network.image_classifier.parameters(), *diagnosis]
        settled = [network.backbone, network.classifier, network.metadata_branch]
        self._fit_jointly(network, blind, is_train, image_path, settled)
        if self.fine_tuned_from is None:
            features = inputs.features
        else:
            features = {v: self._tuned_features(network, inputs, v) for v in self.views}
        settled = [network.backbone, network.image_classifier]
        self._fit_on_features(network, features, inputs, is_train, fusion, settled)

    def _fit_jointly(
        self,
        network: FusionNet,
        inputs: HeadInputs,
        is_train: np.ndarray,
        head: list[nn.Parameter],
        settled: list[nn.Module] | None = None,
    ) -> None:
        """``head`` and, where the recipe fine-tunes, the top blocks, trained together.

        ``settled`` modules stay in eval mode (default: the backbone, see ``_optimise``).
        """
        settled = settled or [network.backbone]
        metadata = torch.from_numpy(inputs.metadata)
        labels = torch.from_numpy(inputs.labels)
        diagnoses = torch.from_numpy(inputs.diagnoses)
        weights = self._row_weights(inputs, is_train)
        if self.fine_tuned_from is not None:
            rows = np.flatnonzero(is_train)

            def fine_tuning_epoch(generator: torch.Generator) -> Iterator[Batch]:
                """Every training image once, in one of the cached views drawn at random."""
                order = rows[torch.randperm(len(rows), generator=generator).numpy()]
                view = torch.randint(len(self.views), (len(rows),), generator=generator).numpy()
                for start in range(0, len(rows), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    picked = view[start : start + self.batch_size]
                    features = self._view_features(network, inputs, idx, picked, self.views)
                    row_weights = None if weights is None else weights[idx]
                    yield features, metadata[idx], labels[idx], diagnoses[idx], row_weights

            groups = [
                (network.trainable_backbone_parameters(), self.backbone_learning_rate),
                (head, self.learning_rate),
            ]
            self._optimise(network, groups, fine_tuning_epoch, len(rows), "fine-tuning", settled)
            return
        self._fit_on_features(network, inputs.features, inputs, is_train, head, settled)

    def _row_weights(self, inputs: HeadInputs, is_train: np.ndarray) -> torch.Tensor | None:
        """Loss weight of every row, from the training rows' clinics; None without weighting."""
        if not self.clinic_prevalence_weighting:
            return None
        clinics = inputs.cases.frame.clinic.to_numpy()
        weights = clinic_prevalence_weights(clinics, inputs.labels, is_train, self.max_row_weight)
        return torch.from_numpy(weights.astype(np.float32))

    def _fit_on_features(
        self,
        network: FusionNet,
        features: dict[str, np.ndarray],
        inputs: HeadInputs,
        is_train: np.ndarray,
        head: list[nn.Parameter],
        settled: list[nn.Module],
    ) -> None:
        """``head`` alone on fixed per-view ``features``; ``settled`` modules stay in eval mode."""
        x = torch.from_numpy(np.concatenate([features[v][is_train] for v in self.views]))
        m = torch.from_numpy(np.concatenate([inputs.metadata[is_train]] * len(self.views)))
        y = torch.from_numpy(np.concatenate([inputs.labels[is_train]] * len(self.views)))
        d = torch.from_numpy(np.concatenate([inputs.diagnoses[is_train]] * len(self.views)))
        weights = self._row_weights(inputs, is_train)
        w = None if weights is None else torch.cat([weights[is_train]] * len(self.views))

        def head_epoch(generator: torch.Generator) -> Iterator[Batch]:
            """Every cached view of every training image once."""
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), self.batch_size):
                idx = order[start : start + self.batch_size]
                yield x[idx], m[idx], y[idx], d[idx], None if w is None else w[idx]

        groups = [(head, self.learning_rate)]
        self._optimise(network, groups, head_epoch, len(y), "fusion head", settled)

    def _optimise(
        self,
        network: FusionNet,
        groups: list[tuple[list[nn.Parameter], float]],
        epoch: Callable[[torch.Generator], Iterator[Batch]],
        n: int,
        description: str,
        settled: list[nn.Module],
    ) -> None:
        """The one training loop: AdamW, one-cycle schedule, binary cross-entropy, metadata dropout.

        Where ``groups`` hold the diagnosis head, its cross-entropy (rows with a named diagnosis
        only) is added at ``diagnosis_loss_weight``.

        ``groups`` pairs parameters with their peak learning rate; ``epoch`` yields one epoch's
        batches of ``n`` rows in all, drawing their order from the seeded generator it is given.
        ``settled`` modules (at least the backbone) stay in eval mode: ImageNet BatchNorm
        statistics, no drop-connect, no dropout in a path trained before.

        With ``weight_averaging_epochs`` the trained parameters end as their mean over every step
        of the last that many epochs (stochastic weight averaging, as SWAD does for domain
        generalisation: a flatter minimum is meant to transfer better to an unseen clinic). The
        BatchNorm statistics need no update: they stay ImageNet's.
        """
        optimiser = torch.optim.AdamW(
            [{"params": params, "lr": lr} for params, lr in groups],
            weight_decay=self.weight_decay,
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimiser,
            max_lr=[lr for _, lr in groups],
            total_steps=self.epochs * math.ceil(n / self.batch_size),
        )
        loss_fn = nn.BCEWithLogitsLoss()
        diagnosis_loss = nn.CrossEntropyLoss(ignore_index=NO_DIAGNOSIS_CLASS)
        optimised = {id(p) for params, _ in groups for p in params}
        teach_diagnosis = bool(network.diagnosis_classes) and all(
            id(p) in optimised for p in network.diagnosis_classifier.parameters()
        )
        # Dropout draws from the global generator, which feature extraction may or may not have
        # used (cache miss or hit): re-seed so the weights depend on the seed alone.
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        network.train()
        for module in settled:
            module.eval()
        trained = [p for params, _ in groups for p in params]
        averaging_from = self.epochs - self.weight_averaging_epochs
        averaged: list[torch.Tensor] = []
        steps_averaged = 0
        progress = tqdm(range(self.epochs), desc=description, unit="epoch")
        for epoch_index in progress:
            total = 0.0
            for features, metadata, labels, diagnoses, weights in epoch(generator):
                meta = drop_fields(metadata, self.p_field_drop, self.p_all_drop, generator)
                logits = network.head(features, meta).squeeze(1)
                if weights is None:
                    loss = loss_fn(logits, labels)
                else:
                    per_row = nn.functional.binary_cross_entropy_with_logits(
                        logits, labels, reduction="none"
                    )
                    loss = (per_row * weights).sum() / weights.sum()
                if teach_diagnosis and bool((diagnoses != NO_DIAGNOSIS_CLASS).any()):
                    named = diagnosis_loss(network.diagnosis_logits(features), diagnoses)
                    loss = loss + self.diagnosis_loss_weight * named
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                total += loss.item() * len(labels)
                if epoch_index >= averaging_from:
                    steps_averaged += 1
                    _running_mean(averaged, trained, steps_averaged)
            progress.set_postfix(loss=f"{total / n:.4f}")
        if averaged:
            with torch.no_grad():
                for mean, parameter in zip(averaged, trained, strict=True):
                    parameter.copy_(mean)
        network.eval()

    @torch.inference_mode()
    def _logits(self, network: FusionNet, features: np.ndarray, metadata: np.ndarray) -> np.ndarray:
        return network.head(torch.from_numpy(features), torch.from_numpy(metadata)).numpy()[:, 0]

    def _calibrate(
        self,
        network: FusionNet,
        features: np.ndarray,
        metadata: np.ndarray,
        frame: Any,
        is_val: np.ndarray,
    ) -> dict[str, Any] | None:
        """Fit the network's Platt scale/shift on validation logits, and measure it honestly.

        Both input kinds are fitted (with metadata, and all fields withheld), since the service
        sees both: together in one fit, or apart where an image-only companion gives the logit of
        cases with nothing known (its own scale). The ECE reported is cross-fitted: each half of
        the validation groups is calibrated by a fit on the other half, so no case grades its own
        calibration.
        """
        if self.calibrate_on is None:
            return None
        population = is_val.copy()
        if self.calibrate_on == "isic2020":
            population &= (frame.source == "isic2020").to_numpy()
        rows = np.flatnonzero(population)
        logits = np.concatenate(
            [
                self._logits(network, features[rows], metadata[rows]),
                self._logits(network, features[rows], encode_missing(len(rows))),
            ]
        )
        labels = np.tile(frame.label.to_numpy()[rows], 2)
        weights = np.tile(isic_weights(frame)[rows], 2)
        groups = np.tile(frame.group.to_numpy()[rows], 2)
        rng = np.random.default_rng(self.seed)
        unique = np.array(sorted(set(groups)))
        fold_of = dict(zip(unique, rng.permutation(len(unique)) % CALIBRATION_FOLDS, strict=True))
        fold = np.array([fold_of[g] for g in groups])
        # which Platt fit calibrates each logit: one for all, or the known / nothing-known kinds
        # (a kind with no validation cases is caught below, as one with a single class)
        if network.image_only is None:
            kind, kinds = np.zeros(len(logits), bool), [False]
        else:
            known = network.known(torch.from_numpy(metadata[rows])).numpy()[:, 0]
            kind, kinds = np.concatenate([known, np.zeros(len(rows), bool)]), [False, True]
        if any(
            len(set(labels[(fold != k) & (kind == c)])) < 2
            for k in range(CALIBRATION_FOLDS)
            for c in kinds
        ):
            # a smoke run's few validation cases: a logistic fit needs both classes
            log.warning("calibration skipped: too few %s validation cases", self.calibrate_on)
            return {"population": self.calibrate_on, "skipped": "too few validation cases"}
        fits = {c: _platt(logits[kind == c], labels[kind == c], weights[kind == c]) for c in kinds}
        crossed = np.empty(len(logits))
        for k in range(CALIBRATION_FOLDS):
            for c in kinds:
                fit, scored = (fold != k) & (kind == c), (fold == k) & (kind == c)
                a, b = _platt(logits[fit], labels[fit], weights[fit])
                crossed[scored] = sigmoid(a * logits[scored] + b)
        half = len(rows)
        sources = np.tile(frame.source.to_numpy()[rows], 2)
        cross_fitted: dict[str, dict[str, float]] = {}
        for source in sorted(set(sources)):
            entry = {}
            parts = (("with_metadata", slice(0, half)), ("no_metadata", slice(half, None)))
            for mode, part in parts:
                m = sources[part] == source
                entry[mode] = expected_calibration_error(
                    labels[part][m], crossed[part][m], weights[part][m]
                )
            cross_fitted[str(source)] = entry
        # the network's own scale: of every case, or (with a companion) of the known-field kind
        scale, shift = fits[network.image_only is not None]
        network.set_calibration(scale, shift)
        log.info("calibration on %s: scale %.4f shift %.4f", self.calibrate_on, scale, shift)
        out: dict[str, Any] = {
            "method": "Platt scaling of the fusion logit",
            "population": self.calibrate_on,
            "isic2020_prevalence": "reweighted to the ISIC 2020 table's 540/29559",
            "scale": scale,
            "shift": shift,
        }
        if network.image_only is not None:
            alone_scale, alone_shift = fits[False]
            network.set_image_only_calibration(alone_scale, alone_shift)
            log.info("image-only calibration: scale %.4f shift %.4f", alone_scale, alone_shift)
            out["method"] = (
                "Platt scaling of the mean fusion and image-only logit (any field known) and of "
                "the image-only logit (nothing known), fitted apart"
            )
            out["image_only_scale"] = alone_scale
            out["image_only_shift"] = alone_shift
        out["cross_fitted_ece"] = cross_fitted
        return out

    @torch.inference_mode()
    def _probabilities(
        self, network: FusionNet, features: np.ndarray, metadata: np.ndarray
    ) -> np.ndarray:
        return sigmoid(self._logits(network, features, metadata))

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

    def _image_only_ablation(
        self, inputs: HeadInputs, scoring: np.ndarray, fusion: FusionNet, is_val: np.ndarray
    ) -> dict[str, Any]:
        """A head trained by the same recipe with every field always missing, against fusion.

        Withholding metadata from the fusion model is not the same as a model that never had
        any: this one answers "does fusion beat image only" and "is fusion with nothing known
        worse than image only", paired on the same validation images.
        """
        frame = inputs.cases.frame
        labels = frame.label.to_numpy()
        none = encode_missing(len(frame))
        image_only = self.image_only_model_logits(inputs, ~is_val, fusion, scoring)
        scores = {
            "image_only_model": image_only,
            "fusion": self._logits(fusion, scoring, inputs.metadata),
            "fusion_no_metadata": self._logits(fusion, scoring, none),
        }
        out: dict[str, Any] = {}
        for name, source in (("ham10000", "ham10000"), ("isic2020", "isic2020"), ("all", None)):
            mask = is_val if source is None else is_val & (frame.source == source).to_numpy()
            if labels[mask].min() == labels[mask].max():
                continue
            y = labels[mask]
            ref = scores["image_only_model"][mask]
            out[name] = {
                "image_only_model": auc_with_interval(y, ref, seed=self.seed),
                "fusion_minus_image_only_model": auc_difference_with_interval(
                    y, scores["fusion"][mask], ref, seed=self.seed
                ),
                "fusion_no_metadata_minus_image_only_model": auc_difference_with_interval(
                    y, scores["fusion_no_metadata"][mask], ref, seed=self.seed
                ),
            }
        return out

    def image_only_model_logits(
        self,
        inputs: HeadInputs,
        is_train: np.ndarray,
        fusion: FusionNet,
        fusion_features: np.ndarray,
    ) -> np.ndarray:
        """Every row's logit from a model trained by this recipe on ``is_train`` with every field
        always missing: the image-only side of the ablation.

        ``fusion`` (trained on the same rows) and its scoring features are needed only where the
        image-only model is part of it.
        """
        none = encode_missing(len(inputs.labels))
        if fusion.image_only is not None:
            # the companion is that model (same seed, rows and recipe), and with nothing known
            # the network's logit is the companion's under a monotone Platt scale
            return self._logits(fusion, fusion_features, none)
        if fusion.metadata_residual:
            # the same recipe with every field missing trains exactly the image path that
            # fusion trains first (same seed, same draws): the image-only model is inside it, and
            # the Platt scale on top is monotone, so its AUC is that model's
            return self._logits(fusion, fusion_features, none)
        reference = self.fresh_network()
        blind = _without_metadata(inputs)
        self._fit_head(reference, blind, is_train)
        return self._logits(reference, self.scoring_features(blind, reference), none)

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


def clinic_prevalence_weights(
    clinics: np.ndarray, labels: np.ndarray, is_train: np.ndarray, max_weight: float
) -> np.ndarray:
    """Row weights that give every clinic the training rows' pooled melanoma prevalence.

    Prevalence differs between the clinics (HAM10000's from 0.5% to 19%, 52% in the hand-picked
    ISIC 2020 images), so whatever identifies a clinic (its camera, framing, light) also predicts
    the label, and a network learns it: a shortcut that says nothing about a new clinic. Weighted
    so each clinic has the same prevalence, a clinic's look carries no information about the label.
    Melanoma rows of a low-prevalence clinic get large weights; ``max_weight`` caps them (a cap
    leaves a little of the correlation, an uncapped weight lets a handful of cases dominate).
    Rows outside ``is_train`` get weights too, from the training rows' counts.
    """
    pooled = float(labels[is_train].mean())
    weights = np.ones(len(labels))
    melanoma = labels == 1
    for clinic in np.unique(clinics[is_train]):
        rows = clinics == clinic
        prevalence = float(labels[rows & is_train].mean())
        if prevalence in (0.0, 1.0):
            continue  # one class only: nothing to rebalance, and the ratio is undefined
        weights[rows & melanoma] = pooled / prevalence
        weights[rows & ~melanoma] = (1 - pooled) / (1 - prevalence)
    return np.minimum(weights, max_weight)


@torch.no_grad()
def _running_mean(mean: list[torch.Tensor], parameters: list[nn.Parameter], count: int) -> None:
    """Fold the ``count``-th step's ``parameters`` into their running ``mean`` (empty: start it)."""
    if not mean:
        mean.extend(p.detach().clone() for p in parameters)
        return
    for m, p in zip(mean, parameters, strict=True):
        m.add_(p.detach() - m, alpha=1.0 / count)


def _without_metadata(inputs: HeadInputs) -> HeadInputs:
    """The same cases with every field missing and no prior: what an image-only model sees."""
    return replace(inputs, metadata=encode_missing(len(inputs.labels)), prior_weight=None)


@torch.inference_mode()
def _diagnosis_validation(
    network: FusionNet, features: np.ndarray, targets: np.ndarray
) -> dict[str, Any]:
    """How well the auxiliary head names validation diagnoses: recall per class, and overall."""
    named = targets != NO_DIAGNOSIS_CLASS
    predicted = network.diagnosis_logits(torch.from_numpy(features[named])).argmax(1).numpy()
    truth = targets[named]
    recall = {
        name: {"n": int((truth == k).sum()), "recall": float((predicted[truth == k] == k).mean())}
        for k, name in enumerate(DIAGNOSIS_CLASSES)
        if (truth == k).any()
    }
    return {
        "n_named": int(named.sum()),
        "accuracy": float((predicted == truth).mean()),
        "balanced_accuracy": float(np.mean([r["recall"] for r in recall.values()])),
        "recall": recall,
    }


def _platt(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Scale and shift of a weighted, (practically) unregularised logistic fit on one logit."""
    model = LogisticRegression(C=1e6, max_iter=1000)
    model.fit(logits.reshape(-1, 1), labels, sample_weight=weights)
    return float(model.coef_[0, 0]), float(model.intercept_[0])
