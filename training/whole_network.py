"""Whole-network training: every block of EfficientNet-Lite0 learns dermoscopy, with the metadata.

The shipped recipe. Frozen ImageNet features with a tuned head had reached their ceiling (the
model history); here every block trains, on images decoded once into memory and augmented on the
fly, with metadata fields randomly withheld so the one network also scores cases where any or all
of age, sex and site are missing. One code path for CPU and CUDA (``--device``). A checkpoint is
written after every epoch and a run resumes from the last one.

BatchNorm: the batch statistics train with the network (batches of 32 mixed sources); the
running statistics are what scoring uses. Keeping ImageNet's running statistics instead (scale
and shift still training) stopped the image branch learning in two of three 10-epoch runs
(docs/model-history.md).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from monai_bundle.scripts.metadata import drop_fields, encode_missing
from monai_bundle.scripts.network import FusionEnsemble, FusionNet, ScoringNetwork
from training.data import (
    SOURCES,
    Cases,
    encode_frame,
    isic_patients,
    isic_weights,
    load_cases,
    split_by_group,
)
from training.evaluation import (
    auc_with_interval,
    expected_calibration_error,
    operating_point,
    sigmoid,
    threshold_for_sensitivity,
)
from training.images import Augmenter, decoded_images, normalised
from training.priors import fit_metadata_prior, isic_table

log = logging.getLogger(__name__)


@dataclass
class Recipe:
    """Everything that decides the weights besides the data (written beside them)."""

    seed: int = 20261130
    # the validation split's own seed (None: ``seed``), so runs that differ only in their
    # training seed validate on the same patients and can be compared or averaged
    split_seed: int | None = None
    epochs: int = 10
    batch_size: int = 32
    image_size: int = 224
    learning_rate: float = 1e-3  # metadata branch and head
    backbone_learning_rate: float = 4e-4
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    p_field_drop: float = 0.3
    p_all_drop: float = 0.2
    max_row_weight: float = 10.0
    val_fraction: float = 0.2
    sensitivity_target: float = 0.95
    include_archive: bool = True
    network: dict[str, Any] = field(
        default_factory=lambda: {"test_time_views": ["identity", "hflip", "vflip", "rot90"]}
    )
    # training seeds of further members (a FusionEnsemble): each trained like the first, on the
    # first one's split; empty: one network
    further_member_seeds: list[int] = field(default_factory=list)

    @property
    def drawn_split_seed(self) -> int:
        return validation_split_seed(asdict(self))


def validation_split_seed(recipe: Mapping[str, Any]) -> int:
    """The seed a recipe (also one stored in validation_metrics.json) drew its validation split
    with: its ``split_seed``, or its training ``seed`` where that is unset or predates the field."""
    split = recipe.get("split_seed")
    return int(recipe["seed"] if split is None else split)


def network_for(recipe: Mapping[str, Any]) -> ScoringNetwork:
    """The untrained scoring network a recipe (also one stored beside its weights) trains: one
    FusionNet, or a FusionEnsemble of one per training seed."""
    members = 1 + len(recipe.get("further_member_seeds") or [])
    if members == 1:
        return FusionNet(**recipe["network"])
    return FusionEnsemble(members, **recipe["network"])


def clinic_prevalence_weights(
    clinics: np.ndarray, labels: np.ndarray, is_train: np.ndarray, max_weight: float
) -> np.ndarray:
    """Row weights that give every clinic the training rows' pooled melanoma prevalence.

    Prevalence differs between clinics (0.5% to 59% here), so whatever identifies a clinic
    (camera, framing, light) would also predict the label: a shortcut worth nothing at a new
    hospital. ``max_weight`` caps the weights of a rare class so a handful of cases cannot dominate.
    """
    pooled = float(labels[is_train].mean())
    weights = np.ones(len(labels))
    melanoma = labels == 1
    for clinic in np.unique(clinics[is_train]):
        rows = clinics == clinic
        prevalence = float(labels[rows & is_train].mean())
        if prevalence in (0.0, 1.0):
            continue  # one class only: nothing to rebalance
        weights[rows & melanoma] = pooled / prevalence
        weights[rows & ~melanoma] = (1 - pooled) / (1 - prevalence)
    return np.minimum(weights, max_weight)


class WholeNetworkTrainer:
    def __init__(
        self,
        recipe: Recipe,
        data_root: str,
        output_dir: str,
        cache_dir: str | None = "var/cache",
        device: str = "cpu",
        max_images: int | None = None,
        max_steps: int | None = None,
        held_out_clinic: str | None = None,
    ) -> None:
        """``held_out_clinic``: leave-one-clinic-out; that clinic's images are the validation
        set and nothing of it is trained on (instead of the lesion/patient-disjoint split)."""
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device is available")
        self.recipe = recipe
        self.data_root = data_root
        self.output_dir = Path(output_dir)
        self.cache_dir = cache_dir
        self.device = torch.device(device)
        self.max_images = max_images
        self.max_steps = max_steps
        self.held_out_clinic = held_out_clinic

    # ---- data -----------------------------------------------------------------------------
    def _cases(self) -> pd.DataFrame:
        frame = load_cases(self.data_root, self.recipe.include_archive).frame
        if self.max_images is not None and self.max_images < len(frame):
            # a smoke run: both classes of every source, in a fixed draw
            rng = np.random.default_rng(self.recipe.drawn_split_seed)  # members: one subset
            per = max(2, self.max_images // (2 * frame.source.nunique()))
            keep = []
            for (_, _), rows in frame.groupby(["source", "label"]):
                keep.extend(rng.permutation(rows.index.to_numpy())[:per])
            frame = frame.loc[sorted(keep)].reset_index(drop=True)
        return frame

    # ---- the run --------------------------------------------------------------------------
    def _validation_rows(self, frame: pd.DataFrame) -> np.ndarray:
        if self.held_out_clinic is not None:
            is_val = (frame.clinic == self.held_out_clinic).to_numpy()
            if not is_val.any():
                raise ValueError(f"no images of clinic {self.held_out_clinic!r}")
        else:
            recipe = self.recipe
            is_val = np.array(
                split_by_group(Cases(frame), recipe.val_fraction, recipe.drawn_split_seed)
            )
            if not is_val.any():
                raise ValueError(
                    f"{len(frame)} images leave no validation split: a smoke run needs "
                    "--max-images 48 or more"
                )
        return is_val

    def run(self) -> dict[str, Any]:
        if self.recipe.further_member_seeds:
            return self._run_ensemble()
        recipe = self.recipe
        torch.manual_seed(recipe.seed)
        frame = self._cases()
        is_val = self._validation_rows(frame)
        labels = frame.label.to_numpy()
        log.info(
            "training on %d images (%d melanoma), validating on %d (%d melanoma), device %s",
            (~is_val).sum(),
            labels[~is_val].sum(),
            is_val.sum(),
            labels[is_val].sum(),
            self.device,
        )
        metadata = torch.from_numpy(encode_frame(frame))
        weights = torch.from_numpy(
            clinic_prevalence_weights(
                frame.clinic.to_numpy(), labels, ~is_val, recipe.max_row_weight
            )
        ).float()
        targets = torch.tensor(labels, dtype=torch.float32)

        network = FusionNet(imagenet_init=True, **recipe.network)
        # the prior from the ISIC 2020 table, without the validation patients' rows
        table = isic_table(self.data_root, exclude_patients=isic_patients(frame.group[is_val]))
        if table.label.nunique() < 2:
            # ISIC 2020 left out (leave-one-clinic-out): its table is that clinic; the prior
            # then comes from the training images' own metadata
            log.info("metadata prior fitted on the training images (no ISIC 2020 table rows)")
            table = frame[~is_val][["age", "sex", "site", "label"]]
        prior = fit_metadata_prior(table, recipe.seed, recipe.p_field_drop, recipe.p_all_drop)
        network.set_metadata_prior(prior)
        # channels-last convolutions: 1.6x faster steps on these CPU cores (measured)
        network.to(self.device, memory_format=torch.channels_last)
        backbone = [p for p in network.backbone.parameters()]
        backbone_ids = {id(p) for p in backbone}
        rest = [p for p in network.parameters() if id(p) not in backbone_ids]
        optimizer = torch.optim.AdamW(
            [
                {"params": backbone, "lr": recipe.backbone_learning_rate},
                {"params": rest, "lr": recipe.learning_rate},
            ],
            weight_decay=recipe.weight_decay,
        )
        train_rows = np.flatnonzero(~is_val)
        steps_per_epoch = math.ceil(len(train_rows) / recipe.batch_size)
        total = steps_per_epoch * recipe.epochs
        if self.max_steps is not None:
            total = min(total, self.max_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _warmup_cosine(total, recipe.warmup_fraction)
        )
        generator = torch.Generator().manual_seed(recipe.seed)
        augment = Augmenter()
        checkpoints = self.output_dir / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        history_file = self.output_dir / "training_log.jsonl"
        first_epoch, step = 0, 0
        last = checkpoints / "last.pt"
        if last.exists():
            # on CPU: the generator states must stay CPU tensors; the optimiser moves its own
            state = torch.load(last, map_location="cpu", weights_only=False)
            network.load_state_dict(state["network"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            first_epoch, step = state["epoch"] + 1, state["step"]
            log.info("resumed after epoch %d (step %d)", first_epoch, step)
        elif history_file.exists():
            history_file.unlink()

        size = recipe.image_size
        images = decoded_images(list(frame.image), size, self.cache_dir)
        for epoch in range(first_epoch, recipe.epochs):
            if step >= total:
                break
            network.train()
            epoch_start = time.monotonic()
            order = train_rows[torch.randperm(len(train_rows), generator=generator).numpy()]
            running, seen = 0.0, 0
            bar = tqdm(
                range(steps_per_epoch),
                desc=f"epoch {epoch + 1}/{recipe.epochs} ({size} px)",
                mininterval=30,
                file=sys.stderr,
            )
            for index in bar:
                if step >= total:
                    break
                rows = torch.from_numpy(
                    order[index * recipe.batch_size : (index + 1) * recipe.batch_size]
                )
                x = augment(images[rows], generator).to(
                    self.device, memory_format=torch.channels_last
                )
                m = drop_fields(
                    metadata[rows], recipe.p_field_drop, recipe.p_all_drop, generator
                ).to(self.device)
                logit = network.head(network.image_features(x), m)[:, 0]
                w = weights[rows].to(self.device)
                loss = (
                    nn.functional.binary_cross_entropy_with_logits(
                        logit, targets[rows].to(self.device), reduction="none"
                    )
                    * w
                ).sum() / w.sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                running += float(loss.detach()) * len(rows)
                seen += len(rows)
                bar.set_postfix(loss=f"{running / seen:.4f}")
            bar.close()
            (val_logits,) = self.logits(network, images[is_val], [metadata[is_val]], False)
            entry = {
                "epoch": epoch + 1,
                "step": step,
                "image_size": size,
                "train_loss": running / max(seen, 1),
                "seconds": round(time.monotonic() - epoch_start, 1),
                "validation_auc_identity_view": _auc_by_source(frame[is_val], val_logits),
            }
            log.info("epoch %s", json.dumps(entry))
            with history_file.open("a") as out:
                out.write(json.dumps(entry) + "\n")
            state = {
                "network": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch,
                "step": step,
            }
            torch.save(state, checkpoints / "last.partial.pt")
            (checkpoints / "last.partial.pt").replace(last)
            torch.save(network.state_dict(), checkpoints / f"epoch-{epoch + 1:02d}.pt")

        network.eval()
        epochs = [json.loads(line) for line in history_file.read_text().splitlines() if line]
        return self._finish_and_save(
            network,
            frame,
            is_val,
            images,
            metadata,
            epochs=epochs,
            training_seconds=round(sum(e["seconds"] for e in epochs), 1),
        )

    def _run_ensemble(self) -> dict[str, Any]:
        """Train (or reuse) each member on the same split, then calibrate and validate their
        average like one network."""
        recipe = self.recipe
        members: list[WholeNetworkTrainer] = []
        reports = []
        for seed in [recipe.seed, *recipe.further_member_seeds]:
            member = WholeNetworkTrainer(
                replace(
                    recipe, seed=seed, split_seed=recipe.drawn_split_seed, further_member_seeds=[]
                ),
                self.data_root,
                str(self.output_dir / "members" / f"seed-{seed}"),
                self.cache_dir,
                str(self.device),
                self.max_images,
                self.max_steps,
                self.held_out_clinic,
            )
            reports.append(member.trained_report() or member.run())
            members.append(member)
        ensemble = network_for(asdict(recipe))
        assert isinstance(ensemble, FusionEnsemble)
        for network, member in zip(ensemble.members, members, strict=True):
            weights = member.output_dir / "model.pt"
            network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        ensemble.to(self.device, memory_format=torch.channels_last).eval()
        frame = self._cases()
        is_val = self._validation_rows(frame)
        images = decoded_images(list(frame.image), recipe.image_size, self.cache_dir)
        metadata = torch.from_numpy(encode_frame(frame))
        return self._finish_and_save(
            ensemble,
            frame,
            is_val,
            images,
            metadata,
            members=reports,
            training_seconds=round(sum(r["training_seconds"] for r in reports), 1),
        )

    def _finish_and_save(
        self,
        network: ScoringNetwork,
        frame: pd.DataFrame,
        is_val: np.ndarray,
        images: torch.Tensor,
        metadata: torch.Tensor,
        **how_trained: Any,
    ) -> dict[str, Any]:
        """Calibrate, validate and save a trained network (one, or the members' average);
        ``how_trained`` (its epochs or its members, and the seconds they took) joins the report."""
        finish_started = time.monotonic()
        report = self.finish(network, frame, is_val, images, metadata)
        report.update(how_trained)
        report["finish_seconds"] = round(time.monotonic() - finish_started, 1)
        report["device"] = str(self.device)
        report["recipe"] = asdict(self.recipe)
        if self.held_out_clinic is not None:
            report["held_out_clinic"] = self.held_out_clinic
        self._save(network, report)
        return report

    def trained_report(self) -> dict[str, Any] | None:
        """This run's report if its weights are already in ``output_dir`` under the same recipe
        (an ensemble member trained before), else None."""
        metrics = self.output_dir / "validation_metrics.json"
        if not (self.output_dir / "model.pt").is_file() or not metrics.is_file():
            return None
        report = json.loads(metrics.read_text())
        if report.get("recipe") != asdict(self.recipe):
            return None
        log.info("member seed %d: trained before, reusing %s", self.recipe.seed, self.output_dir)
        return report

    @torch.inference_mode()
    def logits(
        self,
        network: ScoringNetwork,
        images: torch.Tensor,
        metadata_sets: list[torch.Tensor],
        test_time_views: bool,
        batch_size: int = 64,
    ) -> list[np.ndarray]:
        """Logits of uint8 images under each metadata set, the backbone run once per batch.

        ``test_time_views``: the network's own views, exactly what scoring computes; otherwise
        the identity view alone (per-epoch monitoring).
        """
        network.eval()
        out: list[list[torch.Tensor]] = [[] for _ in metadata_sets]
        for start in range(0, len(images), batch_size):
            x = normalised(images[start : start + batch_size]).to(
                self.device, memory_format=torch.channels_last
            )
            features = network.scoring_features(x) if test_time_views else network.image_features(x)
            for logits, metadata in zip(out, metadata_sets, strict=True):
                m = metadata[start : start + batch_size].to(self.device)
                logits.append(network.head(features, m)[:, 0].cpu())
        return [torch.cat(logits).numpy().astype(np.float64) for logits in out]

    def finish(
        self,
        network: ScoringNetwork,
        frame: pd.DataFrame,
        is_val: np.ndarray,
        images: torch.Tensor,
        metadata: torch.Tensor,
    ) -> dict[str, Any]:
        """Calibration at ISIC 2020's prevalence, the operating point, and validation metrics."""
        recipe = self.recipe
        val = frame[is_val].reset_index(drop=True)
        none = torch.from_numpy(encode_missing(len(val)))
        with_metadata, no_metadata = self.logits(
            network, images[is_val], [metadata[is_val], none], True
        )
        raw = {"with_metadata": with_metadata, "no_metadata": no_metadata}
        calibration = self._calibrate(network, val, raw)
        probs = {
            mode: sigmoid(calibration["scale"] * v + calibration["shift"])
            for mode, v in raw.items()
        }
        labels = val.label.to_numpy()
        threshold = (
            threshold_for_sensitivity(labels, probs["with_metadata"], recipe.sensitivity_target)
            if labels.min() != labels.max()
            else 0.5
        )
        weights = isic_weights(val)
        report: dict[str, Any] = {
            "validation": "lesion-disjoint (HAM10000, ISIC Archive) and patient-disjoint "
            "(ISIC 2020) hold-out; ISIC 2020 benign rows reweighted to the table's prevalence",
            "n_train": int((~is_val).sum()),
            "n_validation": int(is_val.sum()),
            "sensitivity_target": recipe.sensitivity_target,
            "threshold": threshold,
            "calibration": calibration,
            "subsets": {},
        }
        subsets = {"all": np.ones(len(val), bool)}
        subsets.update({s: (val.source == s).to_numpy() for s in SOURCES})
        for name, mask in subsets.items():
            if not mask.any() or labels[mask].min() == labels[mask].max():
                continue
            entry: dict[str, Any] = {}
            for mode, p in probs.items():
                w = weights[mask] if name == "isic2020" else None
                entry[mode] = {
                    **auc_with_interval(labels[mask], p[mask], seed=recipe.seed),
                    **operating_point(labels[mask], p[mask], threshold, w),
                    "ece": expected_calibration_error(labels[mask], p[mask], w),
                }
                if name == "isic2020":
                    at95 = threshold_for_sensitivity(labels[mask], p[mask], 0.95)
                    entry[mode]["at_95_sensitivity"] = operating_point(
                        labels[mask], p[mask], at95, w
                    )
            report["subsets"][name] = entry
        log.info("validation: %s", json.dumps(report["subsets"]))
        return report

    def _calibrate(
        self, network: ScoringNetwork, val: pd.DataFrame, raw: dict[str, np.ndarray]
    ) -> dict[str, Any]:
        """One Platt scale for cases with and without metadata, on ISIC 2020 validation cases
        reweighted to the table's 2% prevalence (the population the service meets)."""
        isic = (val.source == "isic2020").to_numpy()
        labels = np.tile(val.label.to_numpy()[isic], 2)
        if len(labels) == 0 or labels.min() == labels.max():
            log.warning("calibration skipped: too few ISIC 2020 validation cases")
            return {"skipped": "too few ISIC 2020 validation cases", "scale": 1.0, "shift": 0.0}
        logits = np.concatenate([raw["with_metadata"][isic], raw["no_metadata"][isic]])
        weights = np.tile(isic_weights(val[isic]), 2)
        scale, shift = _platt(logits, labels, weights)
        network.set_calibration(scale, shift)
        # cross-fitted: each half of the patients calibrated by a fit on the other half, so no
        # case grades its own calibration
        groups = np.tile(val.group.to_numpy()[isic], 2)
        unique = np.array(sorted(set(groups)))
        rng = np.random.default_rng(self.recipe.seed)
        fold_of = dict(zip(unique, rng.permutation(len(unique)) % 2, strict=True))
        fold = np.array([fold_of[g] for g in groups])
        crossed = np.empty(len(logits))
        for k in (0, 1):
            if len(set(labels[fold != k])) < 2:
                return {
                    "skipped": "too few ISIC 2020 validation cases",
                    "scale": scale,
                    "shift": shift,
                }
            a, b = _platt(logits[fold != k], labels[fold != k], weights[fold != k])
            crossed[fold == k] = sigmoid(a * logits[fold == k] + b)
        half = int(isic.sum())
        return {
            "method": "Platt scaling on ISIC 2020 validation cases, with and without metadata",
            "prevalence": "reweighted to the ISIC 2020 table's 540/29559",
            "scale": scale,
            "shift": shift,
            "cross_fitted_ece_isic2020": {
                mode: expected_calibration_error(labels[part], crossed[part], weights[part])
                for mode, part in (
                    ("with_metadata", slice(0, half)),
                    ("no_metadata", slice(half, None)),
                )
            },
        }

    def _save(self, network: ScoringNetwork, report: dict[str, Any]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(network.cpu().state_dict(), self.output_dir / "model.pt")
        (self.output_dir / "operating_point.json").write_text(
            json.dumps(
                {
                    "threshold": report["threshold"],
                    "sensitivity_target": self.recipe.sensitivity_target,
                },
                indent=2,
            )
            + "\n"
        )
        (self.output_dir / "validation_metrics.json").write_text(
            json.dumps(report, indent=2) + "\n"
        )
        log.info(
            "wrote model.pt, operating_point.json, validation_metrics.json to %s", self.output_dir
        )


def _warmup_cosine(steps: int, warmup_fraction: float) -> Any:
    """Learning-rate factor per step: linear warm-up, then cosine decay to zero."""
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step: int) -> float:
        decay = 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
        return min(1.0, (step + 1) / warmup) * decay

    return factor


def _platt(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Scale and shift of a weighted, (practically) unregularised logistic fit on one logit."""
    model = LogisticRegression(C=1e6, max_iter=1000)
    model.fit(logits.reshape(-1, 1), labels, sample_weight=weights)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def _auc_by_source(val: pd.DataFrame, logits: np.ndarray) -> dict[str, float]:
    labels = val.label.to_numpy()
    out = {}
    for name in ("all", *SOURCES):
        mask = np.ones(len(val), bool) if name == "all" else (val.source == name).to_numpy()
        if mask.any() and labels[mask].min() != labels[mask].max():
            out[name] = round(float(roc_auc_score(labels[mask], logits[mask])), 4)
    return out
