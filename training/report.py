"""`dermfusion evaluate`: the shipped weights on the held-out split, as a report folder.

Writes ``metrics.json`` (AUC with intervals, sensitivity/specificity/PPV at the operating point,
ECE, accuracy/F1/balanced accuracy on the natural balance and on a 1:1 resample), ``roc.png``,
``reliability.png``, ``confusion.json``, ``subgroups.csv`` (sex, age band, site),
``diagnoses.csv`` (what the operating point does to each benign diagnosis),
``predictions.csv`` (every case's probability with and without its metadata, and the decision) and
``report.md`` with the ablation: fusion / image only (metadata withheld) / metadata only (a
logistic regression on the 29,559-row ISIC 2020 table plus the HAM10000 training rows).
ISIC 2020 rows are reweighted to the table's real melanoma prevalence wherever the class balance
matters (PPV, ECE, accuracy, F1): the images here hold 48% melanoma, the table 1.8%.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve

from monai_bundle.scripts.metadata import FIELD_SLOTS, encode_missing
from monai_bundle.scripts.network import ScoringNetwork, load_bundle_network
from training.data import (
    SOURCES,
    encode_frame,
    isic_patients,
    isic_weights,
    load_cases,
    split_by_group,
)
from training.evaluation import (
    auc_difference_with_interval,
    auc_with_interval,
    expected_calibration_error,
    operating_point,
    specificity_by_diagnosis,
    threshold_for_sensitivity,
)
from training.images import decoded_images, normalised, with_hair, with_ruler
from training.priors import isic_table
from training.whole_network import validation_split_seed

log = logging.getLogger(__name__)
AGE_BANDS = ((0, 30, "<30"), (30, 50, "30-49"), (50, 70, "50-69"), (70, 200, "70+"))
MODES = ("fusion", "image_only", "metadata_only")
ROBUSTNESS_VIEWS = {"identity": lambda x: x, "hair": with_hair, "ruler": with_ruler}


def _classification(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, weights: np.ndarray
) -> dict[str, float]:
    """Accuracy, F1 and balanced accuracy at the operating point, with case weights."""
    predicted = probabilities >= threshold
    tp = weights[(labels == 1) & predicted].sum()
    fp = weights[(labels == 0) & predicted].sum()
    fn = weights[(labels == 1) & ~predicted].sum()
    tn = weights[(labels == 0) & ~predicted].sum()
    sensitivity = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    return {
        "accuracy": float((tp + tn) / weights.sum()),
        "f1": float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0,
        "balanced_accuracy": float((sensitivity + specificity) / 2),
    }


def _balanced_resample(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices of a 1:1 resample: every melanoma, and as many non-melanomas drawn without return."""
    rng = np.random.default_rng(seed)
    positives = np.flatnonzero(labels == 1)
    negatives = np.flatnonzero(labels == 0)
    take = min(len(positives), len(negatives))
    return np.concatenate(
        [rng.choice(positives, take, replace=False), rng.choice(negatives, take, replace=False)]
    )


class EvaluationReport:
    """The shipped weights on the validation split they were trained beside.

    Seed, validation share and sources come from the recipe recorded in
    ``models/validation_metrics.json``, so the report always scores the cases training held out.
    """

    def __init__(
        self,
        *,
        data_root: str,
        cache_dir: str,
        bundle_root: str,
        output_dir: str,
    ) -> None:
        self.data_root = Path(data_root)
        self.cache_dir = cache_dir
        self.bundle_root = Path(bundle_root)
        self.output_dir = Path(output_dir)
        trained = json.loads((self.bundle_root / "models" / "validation_metrics.json").read_text())
        recipe = trained["recipe"]
        # an ensemble's members all share its first's split
        self.seed = validation_split_seed(recipe)
        self.val_fraction = float(recipe["val_fraction"])
        self.include_archive = bool(recipe["include_archive"])

    def run(self) -> dict[str, Any]:
        cases = load_cases(self.data_root, self.include_archive)
        is_val = np.array(split_by_group(cases, self.val_fraction, self.seed))
        frame = cases.frame
        val = frame[is_val].reset_index(drop=True)
        labels = val.label.to_numpy()
        operating = json.loads((self.bundle_root / "models" / "operating_point.json").read_text())
        threshold = float(operating["threshold"])
        self.sensitivity_target = float(operating["sensitivity_target"])
        network = load_bundle_network(self.bundle_root).to(memory_format=torch.channels_last)
        images = decoded_images(list(val.image), 224, self.cache_dir)
        features = self._scoring_features(network, images)
        encoded = torch.from_numpy(encode_frame(val))
        probabilities = {
            **self._network_probabilities(network, features, encoded),
            "metadata_only": self._metadata_only(frame[~is_val], val),
        }
        weights = isic_weights(val)
        subsets = {"all": np.ones(len(val), bool)}
        subsets.update({s: (val.source == s).to_numpy() for s in SOURCES})
        # The metadata-only model has its own probability scale: give it its own operating point,
        # chosen on the same validation cases for the same sensitivity target as the shipped one.
        thresholds = {
            "fusion": threshold,
            "image_only": threshold,
            "metadata_only": threshold_for_sensitivity(
                labels, probabilities["metadata_only"], self.sensitivity_target
            ),
        }
        metrics: dict[str, Any] = {
            "thresholds": thresholds,
            "seed": self.seed,
            "permutation_importance": self._permutation_importance(
                network, features, encoded, labels
            ),
            "subsets": {},
            "robustness": self._robustness(network, images, encoded, labels, subsets),
        }
        for name, mask in subsets.items():
            w = weights[mask] if name == "isic2020" else np.ones(int(mask.sum()))
            entry = {}
            for mode in MODES:
                p, y = probabilities[mode][mask], labels[mask]
                resample = _balanced_resample(y, self.seed)
                entry[mode] = {
                    **auc_with_interval(y, p, seed=self.seed),
                    **operating_point(y, p, thresholds[mode], w),
                    "ece": expected_calibration_error(y, p, w),
                    "natural": _classification(y, p, thresholds[mode], w),
                    "balanced_1to1": _classification(
                        y[resample], p[resample], thresholds[mode], np.ones(len(resample))
                    ),
                }
            entry["fusion_minus_image_only"] = auc_difference_with_interval(
                labels[mask],
                probabilities["fusion"][mask],
                probabilities["image_only"][mask],
                seed=self.seed,
            )
            metrics["subsets"][name] = entry
        self.output_dir.mkdir(parents=True, exist_ok=True)
        metrics["diagnoses"] = self._diagnoses(val, probabilities["fusion"], threshold)
        self._predictions(val, probabilities, threshold)
        (self.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        self._confusion(labels, probabilities["fusion"], threshold, subsets, weights)
        self._subgroups(val, probabilities["fusion"], threshold)
        self._plots(labels, probabilities, subsets, weights)
        self._markdown(metrics)
        log.info("evaluation report written to %s", self.output_dir)
        return metrics

    @torch.inference_mode()
    def _scoring_features(
        self, network: ScoringNetwork, images: torch.Tensor, batch_size: int = 64
    ) -> torch.Tensor:
        """Image features averaged over the test-time views, exactly as scoring computes them."""
        out = []
        for start in range(0, len(images), batch_size):
            x = normalised(images[start : start + batch_size])
            out.append(network.scoring_features(x.contiguous(memory_format=torch.channels_last)))
        return torch.cat(out)

    @torch.inference_mode()
    def _robustness(
        self,
        network: ScoringNetwork,
        images: torch.Tensor,
        encoded: torch.Tensor,
        labels: np.ndarray,
        subsets: dict[str, np.ndarray],
        batch_size: int = 64,
    ) -> dict[str, dict[str, float]]:
        """AUC when every validation image carries synthetic hair or a ruler.

        One view each (no test-time averaging), against the same images unaltered: how much
        the commonest dermoscopy artefacts move the ranking.
        """
        out: dict[str, dict[str, float]] = {}
        for view, draw in ROBUSTNESS_VIEWS.items():
            logits = []
            for start in range(0, len(images), batch_size):
                x = draw(normalised(images[start : start + batch_size]))
                f = network.image_features(x.contiguous(memory_format=torch.channels_last))
                logits.append(network.head(f, encoded[start : start + batch_size]).squeeze(1))
            scores = torch.cat(logits).numpy()
            out[view] = {
                name: float(roc_auc_score(labels[mask], scores[mask]))
                for name, mask in subsets.items()
            }
        return out

    @torch.inference_mode()
    def _network_probabilities(
        self, network: ScoringNetwork, features: torch.Tensor, encoded: torch.Tensor
    ) -> dict[str, np.ndarray]:
        without = torch.from_numpy(encode_missing(len(encoded)))
        return {
            "fusion": torch.sigmoid(network.head(features, encoded)).squeeze(1).numpy(),
            "image_only": torch.sigmoid(network.head(features, without)).squeeze(1).numpy(),
        }

    @torch.inference_mode()
    def _permutation_importance(
        self,
        network: ScoringNetwork,
        features: torch.Tensor,
        encoded: torch.Tensor,
        labels: np.ndarray,
        repeats: int = 20,
    ) -> dict[str, dict[str, float]]:
        """AUC lost when one input is shuffled across cases (mean and sd over ``repeats``)."""
        base = float(roc_auc_score(labels, network.head(features, encoded).squeeze(1).numpy()))
        generator = torch.Generator().manual_seed(self.seed)
        out = {}
        for name in ("image", *FIELD_SLOTS):
            drops = []
            for _ in range(repeats):
                order = torch.randperm(len(labels), generator=generator)
                f, m = features, encoded.clone()
                if name == "image":
                    f = features[order]
                else:
                    values, missing = FIELD_SLOTS[name]
                    m[:, values] = encoded[order][:, values]
                    m[:, missing] = encoded[order][:, missing]
                scores = network.head(f, m).squeeze(1).numpy()
                drops.append(base - float(roc_auc_score(labels, scores)))
            out[name] = {"auc_drop": float(np.mean(drops)), "sd": float(np.std(drops))}
        return out

    def _metadata_only(self, train: pd.DataFrame, val: pd.DataFrame) -> np.ndarray:
        """Metadata prior: the full ISIC 2020 table (patients outside validation) + HAM train."""
        columns = ["age", "sex", "site", "label"]
        isic = isic_table(self.data_root, isic_patients(val.group))[columns]
        ham = train[train.source == "ham10000"][columns]
        rows = pd.concat([isic, ham], ignore_index=True)
        model = LogisticRegression(max_iter=2000, C=1.0)
        model.fit(encode_frame(rows), rows.label.to_numpy())
        return model.predict_proba(encode_frame(val))[:, 1]

    def _confusion(
        self,
        labels: np.ndarray,
        probabilities: np.ndarray,
        threshold: float,
        subsets: dict[str, np.ndarray],
        weights: np.ndarray,
    ) -> None:
        out = {}
        for name, mask in subsets.items():
            y, predicted = labels[mask], probabilities[mask] >= threshold
            out[name] = {
                "true_positive": int(((y == 1) & predicted).sum()),
                "false_negative": int(((y == 1) & ~predicted).sum()),
                "true_negative": int(((y == 0) & ~predicted).sum()),
                "false_positive": int(((y == 0) & predicted).sum()),
            }
        (self.output_dir / "confusion.json").write_text(
            json.dumps({"threshold": threshold, "counts": out}, indent=2) + "\n"
        )

    def _subgroups(self, val: pd.DataFrame, probabilities: np.ndarray, threshold: float) -> None:
        labels = val.label.to_numpy()
        bands = np.full(len(val), "unknown", dtype=object)
        for low, high, name in AGE_BANDS:
            bands[(val.age >= low).to_numpy() & (val.age < high).to_numpy()] = name
        groups = {
            "sex": val.sex.fillna("unknown").to_numpy(),
            "age band": bands,
            "site": val.site.fillna("unknown").to_numpy(),
        }
        rows = []
        for variable, values in groups.items():
            for value in sorted(set(values)):
                mask = values == value
                y, p = labels[mask], probabilities[mask]
                both = 0 < y.sum() < len(y)
                point = operating_point(y, p, threshold)
                auc = auc_with_interval(y, p, n_boot=200, seed=self.seed) if both else {}
                rows.append(
                    {
                        "variable": variable,
                        "value": value,
                        "n": int(mask.sum()),
                        "n_melanoma": int(y.sum()),
                        "auc": auc.get("auc"),
                        "auc_low": auc.get("auc_low"),
                        "auc_high": auc.get("auc_high"),
                        "sensitivity": point["sensitivity"],
                        "specificity": point["specificity"],
                    }
                )
        pd.DataFrame(rows).to_csv(self.output_dir / "subgroups.csv", index=False)

    def _diagnoses(
        self, val: pd.DataFrame, probabilities: np.ndarray, threshold: float
    ) -> list[dict[str, Any]]:
        """What the operating point does to each diagnosis: which benign lesions get flagged.

        A benign diagnosis has no AUC of its own; its row ranks every validation melanoma against
        that diagnosis alone, so a low value names the look-alike the model confuses most.
        """
        labels = val.label.to_numpy()
        diagnoses = val.diagnosis.to_numpy()
        melanoma = labels == 1
        by_diagnosis = specificity_by_diagnosis(diagnoses, labels, probabilities, threshold)
        rows = []
        for diagnosis, point in sorted(by_diagnosis.items(), key=lambda item: -item[1]["n"]):
            mask = diagnoses == diagnosis
            pair = melanoma | mask
            auc = auc_with_interval(labels[pair], probabilities[pair], n_boot=200, seed=self.seed)
            rows.append(
                {
                    "diagnosis": diagnosis,
                    "n": point["n"],
                    **{s: int((mask & (val.source == s).to_numpy()).sum()) for s in SOURCES},
                    "flagged": point["flagged"],
                    "specificity": point["specificity"],
                    "melanoma_vs_this_auc": auc["auc"],
                    "auc_low": auc["auc_low"],
                    "auc_high": auc["auc_high"],
                }
            )
        pd.DataFrame(rows).to_csv(self.output_dir / "diagnoses.csv", index=False)
        return rows

    def _predictions(
        self, val: pd.DataFrame, probabilities: dict[str, np.ndarray], threshold: float
    ) -> None:
        """Every validation case's probability, with and without its metadata: a reviewer can
        look up any case, and the served path is checked against it case by case."""
        pd.DataFrame(
            {
                "image_name": val.image_name.to_numpy(),
                "source": val.source.to_numpy(),
                "diagnosis": val.diagnosis.to_numpy(),
                "melanoma": val.label.to_numpy(),
                "melanoma_probability": probabilities["fusion"],
                "melanoma_suspected": (probabilities["fusion"] >= threshold).astype(int),
                "probability_without_metadata": probabilities["image_only"],
            }
        ).to_csv(self.output_dir / "predictions.csv", index=False, float_format="%.7g")

    def _plots(
        self,
        labels: np.ndarray,
        probabilities: dict[str, np.ndarray],
        subsets: dict[str, np.ndarray],
        weights: np.ndarray,
    ) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(SOURCES), figsize=(15, 4.5))
        for axis, name in zip(axes, SOURCES, strict=True):
            mask = subsets[name]
            for mode in MODES:
                fpr, tpr, _ = roc_curve(labels[mask], probabilities[mode][mask])
                axis.plot(fpr, tpr, label=mode.replace("_", " "))
            axis.plot([0, 1], [0, 1], ":", color="grey")
            axis.set(
                title=f"ROC, {name} validation", xlabel="1 - specificity", ylabel="sensitivity"
            )
            axis.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(self.output_dir / "roc.png", dpi=100)
        plt.close(fig)
        fig, axis = plt.subplots(figsize=(5, 5))
        edges = np.linspace(0, 1, 11)
        for name in SOURCES:
            mask = subsets[name]
            w = weights[mask] if name == "isic2020" else np.ones(int(mask.sum()))
            p, y = probabilities["fusion"][mask], labels[mask]
            which = np.clip(np.digitize(p, edges) - 1, 0, 9)
            xs, ys = [], []
            for b in range(10):
                m = which == b
                if w[m].sum() > 0:
                    xs.append(np.average(p[m], weights=w[m]))
                    ys.append(np.average(y[m], weights=w[m]))
            axis.plot(xs, ys, "o-", label=name + (" (2% prevalence)" if name == "isic2020" else ""))
        axis.plot([0, 1], [0, 1], ":", color="grey")
        axis.set(
            title="Reliability (fusion)",
            xlabel="predicted probability",
            ylabel="observed melanoma fraction",
        )
        axis.legend()
        fig.tight_layout()
        fig.savefig(self.output_dir / "reliability.png", dpi=100)
        plt.close(fig)

    def _markdown(self, metrics: dict[str, Any]) -> None:
        lines = [
            "# Evaluation of the shipped weights",
            "",
            f"Held-out split (seed {metrics['seed']}): lesion-disjoint (HAM10000, ISIC Archive) "
            "and patient-disjoint (ISIC 2020). Operating thresholds: fusion and image only "
            f"{metrics['thresholds']['fusion']:.4f} (the shipped one), metadata only "
            f"{metrics['thresholds']['metadata_only']:.4f} (same sensitivity target, its own "
            "scale). ISIC 2020 PPV/ECE/accuracy/F1 at the real 1.8% prevalence; "
            "'1:1' columns on a balanced resample (every melanoma, as many non-melanomas).",
            "",
            "| subset | model | AUC (95% CI) | sens | spec | PPV | ECE | acc | F1 | bal. acc "
            "| acc 1:1 | F1 1:1 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, entry in metrics["subsets"].items():
            for mode in MODES:
                m = entry[mode]
                lines.append(
                    f"| {name} | {mode.replace('_', ' ')} | {m['auc']:.3f} "
                    f"({m['auc_low']:.3f}-{m['auc_high']:.3f}) | {m['sensitivity']:.3f} | "
                    f"{m['specificity']:.3f} | {m['ppv']:.3f} | {m['ece']:.3f} | "
                    f"{m['natural']['accuracy']:.3f} | {m['natural']['f1']:.3f} | "
                    f"{m['natural']['balanced_accuracy']:.3f} | "
                    f"{m['balanced_1to1']['accuracy']:.3f} | {m['balanced_1to1']['f1']:.3f} |"
                )
        lines += [
            "",
            "Fusion minus image only (metadata withheld), same cases, paired bootstrap:",
            "",
            "| subset | AUC difference (95% CI) | share of resamples where fusion is ahead |",
            "| --- | --- | --- |",
        ]
        for name, entry in metrics["subsets"].items():
            d = entry["fusion_minus_image_only"]
            lines.append(
                f"| {name} | {d['difference']:+.4f} ({d['low']:+.4f} to {d['high']:+.4f}) | "
                f"{d['share_positive']:.2f} |"
            )
        lines += [
            "",
            "Robustness (fusion, one view, no test-time averaging): AUC with synthetic artefacts "
            "drawn on every validation image (the training augmentations of `training/images.py`).",
            "",
            "| view | " + " | ".join(metrics["subsets"]) + " |",
            "| --- |" + " --- |" * len(metrics["subsets"]),
        ]
        for view, aucs in metrics["robustness"].items():
            lines.append(
                f"| {view} | " + " | ".join(f"{aucs[n]:.3f}" for n in metrics["subsets"]) + " |"
            )
        lines += [
            "",
            "Permutation importance (fusion, all validation cases): AUC lost when one input is "
            "shuffled across cases, mean ± sd over 20 shuffles.",
            "",
            "| input | AUC drop |",
            "| --- | --- |",
        ]
        for name, value in metrics["permutation_importance"].items():
            lines.append(f"| {name} | {value['auc_drop']:.4f} ± {value['sd']:.4f} |")
        lines += [
            "",
            "By diagnosis (fusion, all validation cases, at the shipped threshold): the share of "
            "each benign diagnosis left unflagged, and the AUC of every validation melanoma "
            "against that diagnosis alone.",
            "",
            "| diagnosis | n (HAM / ISIC 2020 / Archive) | flagged | specificity "
            "| melanoma vs it: AUC (95% CI) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for d in metrics["diagnoses"]:
            lines.append(
                f"| {d['diagnosis']} | {d['n']} ({d['ham10000']} / {d['isic2020']} / "
                f"{d['isic_archive']}) | "
                f"{d['flagged']} | {d['specificity']:.3f} | {d['melanoma_vs_this_auc']:.3f} "
                f"({d['auc_low']:.3f}-{d['auc_high']:.3f}) |"
            )
        lines += [
            "",
            "Files: metrics.json, confusion.json, subgroups.csv, diagnoses.csv, predictions.csv, "
            "roc.png, reliability.png.",
            "",
        ]
        (self.output_dir / "report.md").write_text("\n".join(lines))
