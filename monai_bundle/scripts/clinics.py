"""Leave-one-clinic-out: the training recipe judged on a HAM10000 clinic it never saw.

The model will be judged on images from hospitals that are not in ../shared/data. The four
HAM10000 clinics (the ``dataset`` column) are the nearest stand-in: for each one, a fresh model
(head, and the top backbone blocks where the recipe fine-tunes them) is trained with the recipe of
``configs/train.json`` (same trainer, hyperparameters and seed) on every other case, ISIC 2020
included, and scored on the held-out clinic. The recipe picks its threshold on its own
lesion/patient-disjoint validation split, so that split is kept, drawn from the cases
outside the clinic. The unweighted mean of the four fusion AUCs is the single proxy number that new
weights must beat. Writes ``leave_one_clinic_out.json`` and ``leave_one_clinic_out.md``, and
the raw logits of every held-out and threshold case in ``leave_one_clinic_out_scores.csv``, so
that recipes (an ensemble, say) can be compared on the very same folds without training again.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from monai.bundle import ConfigParser

from monai_bundle.scripts.data import Cases, load_cases, split_by_group
from monai_bundle.scripts.evaluation import (
    auc_with_interval,
    operating_point,
    sigmoid,
    specificity_by_diagnosis,
    threshold_for_sensitivity,
)
from monai_bundle.scripts.loco_scores import IMAGE_ONLY_MODEL, MODES, SCORES, paired_difference
from monai_bundle.scripts.metadata import encode_missing
from monai_bundle.scripts.training import FusionTrainer

log = logging.getLogger(__name__)

HAM_CLINICS = ("rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias")
RECIPE_FIELDS = (
    "seed",
    "val_fraction",
    "epochs",
    "batch_size",
    "learning_rate",
    "backbone_learning_rate",
    "weight_decay",
    "p_field_drop",
    "p_all_drop",
    "clinic_prevalence_weighting",
    "max_row_weight",
    "weight_averaging_epochs",
    "sensitivity_target",
    "views",
    "network_options",
)


def clinic_fold(
    cases: Cases, clinic: str, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(is_train, is_threshold)`` row masks for holding out ``clinic``.

    The recipe's lesion/patient-disjoint split is drawn on the cases outside the clinic only, so
    neither the head nor its threshold sees a case from it.
    """
    frame = cases.frame
    outside = (frame.clinic != clinic).to_numpy()
    inner_val = split_by_group(Cases(frame[outside].reset_index(drop=True)), val_fraction, seed)
    is_threshold = np.zeros(len(frame), bool)
    is_threshold[np.flatnonzero(outside)[inner_val]] = True
    return outside & ~is_threshold, is_threshold


def stratified_subset(cases: Cases, max_images: int, seed: int) -> Cases:
    """At most ``max_images`` cases, equal shares per clinic and label, for smoke runs.

    The trainer's own subsample stratifies by label only, which can leave a small clinic without a
    melanoma; here every clinic keeps both classes, so every fold has an AUC.
    """
    rng = np.random.default_rng(seed)
    frame = cases.frame
    strata = sorted(frame.groupby(["clinic", "label"]).groups)
    per_stratum = max_images // len(strata)
    if per_stratum < 2:
        raise ValueError(f"max_images must be at least {2 * len(strata)}, got {max_images}")
    picked: list[int] = []
    for clinic, label in strata:
        rows = frame.index[(frame.clinic == clinic) & (frame.label == label)].to_numpy()
        picked += rng.choice(rows, min(len(rows), per_stratum), replace=False).tolist()
    return Cases(frame.loc[sorted(picked)].reset_index(drop=True))


class LeaveOneClinicOut:
    """Runs the leave-one-clinic-out evaluation of the recipe in ``train_config``.

    The trainer is built from ``train_config`` itself (only paths are overridden, plus ``epochs``
    for smoke runs and ``seed`` to measure the seed spread), so a recipe change is evaluated by
    the same command. No weights are written.
    """

    def __init__(
        self,
        *,
        train_config: str,
        data_root: str,
        cache_dir: str,
        output_dir: str,
        max_images: int | None = None,
        epochs: int | None = None,
        seed: int | None = None,
        image_only_model: bool = True,
        n_boot: int = 1000,
    ) -> None:
        self.train_config = Path(train_config)
        self.data_root = data_root
        self.cache_dir = cache_dir
        self.output_dir = Path(output_dir)
        self.max_images = max_images
        self.epochs = epochs
        self.seed = seed
        self.image_only_model = image_only_model
        self.n_boot = n_boot

    def trainer(self) -> FusionTrainer:
        """The trainer of ``train_config``, pointed at this run's data and feature cache."""
        parser = ConfigParser()
        parser.read_config(str(self.train_config))
        parser["data_root"] = self.data_root
        parser["cache_dir"] = self.cache_dir
        # never used for writing (folds are not saved), but keep it away from the shipped weights
        parser["output_dir"] = str(self.output_dir)
        parser["max_images"] = None  # the subset, if any, is drawn here, stratified by clinic
        if self.epochs is not None:
            parser["trainer#epochs"] = self.epochs
        if self.seed is not None:
            parser["seed"] = self.seed
        trainer = parser.get_parsed_content("trainer")
        if not isinstance(trainer, FusionTrainer):
            raise TypeError(f"{self.train_config}: trainer is {type(trainer).__name__}")
        return trainer

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        trainer = self.trainer()
        cases = load_cases(self.data_root)
        if self.max_images is not None:
            cases = stratified_subset(cases, self.max_images, trainer.seed)
        inputs = trainer.head_inputs(cases)
        frame = cases.frame
        labels = inputs.labels.astype(int)
        no_metadata = encode_missing(len(frame))
        report: dict[str, Any] = {
            "description": "leave-one-clinic-out on HAM10000 (dataset column), proxy for an "
            "unseen hospital; held-out clinic scored on the recipe's test-time views",
            "train_config": self.train_config.name,
            "recipe": {name: getattr(trainer, name) for name in RECIPE_FIELDS},
            "n_cases": len(frame),
            "max_images": self.max_images,
            "clinics": {},
        }
        scores: list[pd.DataFrame] = []
        for clinic in HAM_CLINICS:
            is_train, is_threshold = clinic_fold(cases, clinic, trainer.val_fraction, trainer.seed)
            held_out = (frame.clinic == clinic).to_numpy()
            log.info("leave out %s: train on %d cases", clinic, is_train.sum())
            network = trainer.fit_fresh_head(inputs, is_train)
            features = trainer.scoring_features(inputs, network)
            logits = {
                "fusion": trainer._logits(network, features, inputs.metadata),
                "image_only": trainer._logits(network, features, no_metadata),
            }
            if self.image_only_model:
                logits[IMAGE_ONLY_MODEL] = trainer.image_only_model_logits(
                    inputs, is_train, network, features
                )
            probabilities = {mode: sigmoid(value) for mode, value in logits.items()}
            scored = held_out | is_threshold
            scores.append(
                pd.DataFrame(
                    {
                        "held_out_clinic": clinic,
                        "role": np.where(held_out[scored], "held_out", "threshold"),
                        "image": [Path(p).stem for p in frame.image[scored]],
                        "label": labels[scored],
                        "diagnosis": frame.diagnosis[scored].to_numpy(),
                        **{f"{mode}_logit": value[scored] for mode, value in logits.items()},
                    }
                )
            )
            threshold = threshold_for_sensitivity(
                labels[is_threshold],
                probabilities["fusion"][is_threshold],
                trainer.sensitivity_target,
            )
            entry: dict[str, Any] = {
                "n": int(held_out.sum()),
                "n_melanoma": int(labels[held_out].sum()),
                "n_train": int(is_train.sum()),
                "n_threshold": int(is_threshold.sum()),
                "training_cases_by_clinic": {
                    str(k): int(v)
                    for k, v in frame.clinic[is_train].value_counts().sort_index().items()
                },
                "threshold": threshold,
            }
            for mode in MODES:
                y, p = labels[held_out], probabilities[mode][held_out]
                auc = auc_with_interval(y, p, n_boot=self.n_boot, seed=trainer.seed)
                point = operating_point(y, p, threshold)
                entry[mode] = {
                    "auc": auc["auc"],
                    "auc_low": auc["auc_low"],
                    "auc_high": auc["auc_high"],
                    "sensitivity": point["sensitivity"],
                    "specificity": point["specificity"],
                    "ppv": point["ppv"],
                }
            if self.image_only_model:
                entry[IMAGE_ONLY_MODEL] = auc_with_interval(
                    labels[held_out],
                    logits[IMAGE_ONLY_MODEL][held_out],
                    n_boot=self.n_boot,
                    seed=trainer.seed,
                )
            entry["fusion_specificity_by_diagnosis"] = specificity_by_diagnosis(
                frame.diagnosis.to_numpy()[held_out],
                labels[held_out],
                probabilities["fusion"][held_out],
                threshold,
            )
            report["clinics"][clinic] = entry
            log.info(
                "%s held out: fusion AUC %.3f, metadata withheld %.3f",
                clinic,
                entry["fusion"]["auc"],
                entry["image_only"]["auc"],
            )
        report["pooled"] = {
            "definition": "unweighted mean over the held-out clinics",
            **{
                f"{mode}_{metric}": float(
                    np.mean([c[mode][metric] for c in report["clinics"].values()])
                )
                for mode in MODES
                for metric in ("auc", "sensitivity", "specificity")
            },
        }
        report["proxy_auc"] = report["pooled"]["fusion_auc"]
        every_fold = pd.concat(scores)
        if self.image_only_model:
            report["pooled"][f"{IMAGE_ONLY_MODEL}_auc"] = float(
                np.mean([c[IMAGE_ONLY_MODEL]["auc"] for c in report["clinics"].values()])
            )
            report["ablation"] = {
                "definition": "held-out AUC minus that of an image-only model (the recipe with "
                "every field always missing, trained on the same cases); paired 95% bootstrap "
                "intervals, per clinic and for the proxy",
                **{
                    f"{mode}_minus_{IMAGE_ONLY_MODEL}": paired_difference(
                        every_fold, mode, every_fold, IMAGE_ONLY_MODEL, self.n_boot, trainer.seed
                    )
                    for mode in MODES
                },
            }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "leave_one_clinic_out.json").write_text(
            json.dumps(report, indent=2) + "\n"
        )
        (self.output_dir / "leave_one_clinic_out.md").write_text(markdown(report))
        every_fold.to_csv(self.output_dir / SCORES, index=False, float_format="%.7g")
        log.info(
            "leave-one-clinic-out proxy AUC %.4f in %.0f s, written to %s",
            report["proxy_auc"],
            time.perf_counter() - started,
            self.output_dir,
        )
        return report


def markdown(report: dict[str, Any]) -> str:
    """The report as a table for humans; the json holds the same numbers unrounded."""
    recipe = report["recipe"]
    # every recipe field the prose above the table does not already state
    stated = {"seed", "epochs", "views", "sensitivity_target", "val_fraction", "network_options"}
    trainer_options = {name: value for name, value in recipe.items() if name not in stated}
    lines = [
        "# Leave-one-clinic-out (proxy for another hospital)",
        "",
        f"Recipe: `{report['train_config']}` (seed {recipe['seed']}, {recipe['epochs']} epochs, "
        f"views {', '.join(recipe['views'])}). For each HAM10000 clinic, a fresh model (head, and "
        "the top blocks where the recipe fine-tunes them) is trained on every other case "
        "(ISIC 2020 included) and scored on that clinic. Its threshold is the "
        f"highest reaching {recipe['sensitivity_target']:.0%} sensitivity on the recipe's own "
        f"{recipe['val_fraction']:.0%} lesion/patient-disjoint validation split of the cases "
        "outside the clinic, never on the clinic. Image only: same network, metadata withheld. "
        "AUC with 95% bootstrap interval.",
        "",
        f"Network options: `{json.dumps(recipe.get('network_options', {}), sort_keys=True)}`.",
        "",
        f"Trainer options: `{json.dumps(trainer_options, sort_keys=True)}`.",
        "",
    ]
    if report["max_images"] is not None:
        lines += [f"**Smoke run on {report['n_cases']} cases: not a result.**", ""]
    lines += [
        "| held-out clinic | n (melanoma) | trained on | threshold | fusion AUC | image-only AUC "
        "| fusion sens / spec | image-only sens / spec |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for clinic, c in report["clinics"].items():
        auc = {
            m: f"{c[m]['auc']:.3f} ({c[m]['auc_low']:.3f}-{c[m]['auc_high']:.3f})" for m in MODES
        }
        point = {m: f"{c[m]['sensitivity']:.3f} / {c[m]['specificity']:.3f}" for m in MODES}
        lines.append(
            f"| {clinic} | {c['n']} ({c['n_melanoma']}) | {c['n_train']} | {c['threshold']:.4f} "
            f"| {auc['fusion']} | {auc['image_only']} | {point['fusion']} | {point['image_only']} |"
        )
    pooled = report["pooled"]
    lines += [
        f"| **mean of {len(report['clinics'])}** | | | | **{pooled['fusion_auc']:.3f}** "
        f"| {pooled['image_only_auc']:.3f} "
        f"| {pooled['fusion_sensitivity']:.3f} / {pooled['fusion_specificity']:.3f} "
        f"| {pooled['image_only_sensitivity']:.3f} / {pooled['image_only_specificity']:.3f} |",
        "",
        f"Proxy AUC (mean fusion AUC over the held-out clinics): **{report['proxy_auc']:.4f}**. "
        "Weights replace the shipped ones only when their recipe beats this number.",
        "",
    ]
    if "ablation" in report:
        lines += ablation_markdown(report)
    lines += [
        "Fusion specificity at the fold's threshold by benign diagnosis, n in brackets (which "
        "look-alikes each clinic brings):",
        "",
        "| diagnosis | " + " | ".join(report["clinics"]) + " |",
        "| --- |" + " --- |" * len(report["clinics"]),
    ]
    by_clinic = {c: e["fusion_specificity_by_diagnosis"] for c, e in report["clinics"].items()}
    for diagnosis in sorted({d for entry in by_clinic.values() for d in entry}):
        cells = [
            f"{e[diagnosis]['specificity']:.2f} ({e[diagnosis]['n']})" if diagnosis in e else ""
            for e in by_clinic.values()
        ]
        lines.append(f"| {diagnosis} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def ablation_markdown(report: dict[str, Any]) -> list[str]:
    """Fusion against the image-only model, per clinic and for the proxy."""

    def gap(d: dict[str, float]) -> str:
        return f"{d['difference']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})"

    ablation = report["ablation"]
    fused = ablation[f"fusion_minus_{IMAGE_ONLY_MODEL}"]
    withheld = ablation[f"image_only_minus_{IMAGE_ONLY_MODEL}"]
    lines = [
        "Ablation: fusion against an image-only model, the same recipe with every field always "
        "missing, trained on the same cases and scored on the same held-out images. Paired 95% "
        "bootstrap intervals; the proxy's resample every clinic at once.",
        "",
        "| held-out clinic | image-only model AUC (95% CI) | fusion minus it "
        "| fusion with metadata withheld minus it |",
        "| --- | --- | --- | --- |",
    ]
    for clinic, c in report["clinics"].items():
        model = c[IMAGE_ONLY_MODEL]
        lines.append(
            f"| {clinic} | {model['auc']:.3f} ({model['auc_low']:.3f}-{model['auc_high']:.3f}) "
            f"| {gap(fused['clinics'][clinic])} | {gap(withheld['clinics'][clinic])} |"
        )
    lines += [
        f"| **mean of {len(report['clinics'])}** "
        f"| {report['pooled'][f'{IMAGE_ONLY_MODEL}_auc']:.3f} "
        f"| **{gap(fused['proxy'])}** | {gap(withheld['proxy'])} |",
        "",
    ]
    return lines
