"""The model card's tables, regenerated from the committed metrics so they cannot drift.

The card (``monai_bundle/docs/README.md``) holds prose and, between ``<!-- generated:NAME -->``
and ``<!-- /generated -->`` markers, tables this module writes from
``models/validation_metrics.json``, ``docs/evaluation/metrics.json`` and
``docs/leave_one_clinic_out.json``:

    python -m training.model_card            # rewrite the tables in place
    python -m training.model_card --check    # exit 1 if the card is stale (the tests do this)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUNDLE = Path(__file__).resolve().parents[1] / "monai_bundle"
SUBSET_NAMES = {
    "all": "all",
    "ham10000": "HAM10000 (lesion-disjoint)",
    "isic2020": "ISIC 2020 (patient-disjoint, 2% prevalence)",
    "isic_archive": "ISIC Archive (lesion-disjoint)",
}
_MARKED = re.compile(r"(<!-- generated:(\w+) -->\n)(.*?)(<!-- /generated -->)", re.S)


def _ci(entry: dict[str, float]) -> str:
    return f"{entry['auc']:.3f} ({entry['auc_low']:.3f}–{entry['auc_high']:.3f})"


def validation_table(trained: dict[str, Any], evaluation: dict[str, Any]) -> str:
    threshold = trained["threshold"]
    lines = [
        f"| subset | n (melanoma) | metadata | ROC AUC (95% CI) | sensitivity @{threshold:.4f} "
        f"| specificity @{threshold:.4f} | ECE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, label in SUBSET_NAMES.items():
        entry = trained["subsets"].get(name)
        if entry is None:
            continue
        for mode, said in (("with_metadata", "as given"), ("no_metadata", "withheld")):
            m = entry[mode]
            lines.append(
                f"| {label} | {m['n']} ({m['n_melanoma']}) | {said} | {_ci(m)} | "
                f"{m['sensitivity']:.3f} | {m['specificity']:.3f} | {m['ece']:.3f} |"
            )
    return "\n".join(lines)


def isic_operating_table(trained: dict[str, Any], evaluation: dict[str, Any]) -> str:
    isic = trained["subsets"]["isic2020"]
    lines = [
        "| metadata | threshold | sensitivity | specificity | PPV at 2% prevalence |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode, said in (("with_metadata", "as given"), ("no_metadata", "withheld")):
        for which, point in (
            ("shipped", isic[mode]),
            ("95% sensitivity", isic[mode]["at_95_sensitivity"]),
        ):
            lines.append(
                f"| {said} | {which}: {point['threshold']:.4f} | {point['sensitivity']:.3f} | "
                f"{point['specificity']:.3f} | {point['ppv']:.3f} |"
            )
    return "\n".join(lines)


def _members(trained: dict[str, Any]) -> list[dict[str, Any]]:
    """The trained networks: an ensemble's members, or the one network."""
    return trained.get("members", [trained])


def epochs_table(trained: dict[str, Any], evaluation: dict[str, Any]) -> str:
    lines = [
        "| seed | epoch | train loss | minutes | val AUC all | HAM10000 | ISIC 2020 "
        "| ISIC Archive |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for member in _members(trained):
        for e in member["epochs"]:
            auc = e["validation_auc_identity_view"]
            lines.append(
                f"| {member['recipe']['seed']} | {e['epoch']} | {e['train_loss']:.4f} | "
                f"{e['seconds'] / 60:.1f} | {auc['all']:.3f} | {auc['ham10000']:.3f} | "
                f"{auc['isic2020']:.3f} | {auc['isic_archive']:.3f} |"
            )
    return "\n".join(lines)


def members_table(trained: dict[str, Any], evaluation: dict[str, Any]) -> str:
    """Each member alone and the shipped average, on the same validation rows."""
    lines = [
        "| network | trained on | minutes | all | HAM10000 | ISIC 2020 (metadata withheld) "
        "| ISIC Archive | ISIC 2020 specificity at 95% sensitivity |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [(f"seed {m['recipe']['seed']}", m) for m in _members(trained)]
    if "members" in trained:
        rows.append((f"**average of {len(trained['members'])} (shipped)**", trained))
    for name, report in rows:
        subsets = report["subsets"]
        isic = subsets["isic2020"]
        minutes = (
            f"{report['training_seconds'] / 60:.0f}"
            if report is not trained or len(rows) == 1
            else f"{report['training_seconds'] / 60:.0f} (sum)"
        )
        device = report["device"]
        lines.append(
            f"| {name} | {device} | {minutes} | {subsets['all']['with_metadata']['auc']:.3f} | "
            f"{subsets['ham10000']['with_metadata']['auc']:.3f} | "
            f"{isic['with_metadata']['auc']:.3f} ({isic['no_metadata']['auc']:.3f}) | "
            f"{subsets['isic_archive']['with_metadata']['auc']:.3f} | "
            f"{isic['with_metadata']['at_95_sensitivity']['specificity']:.3f} |"
        )
    return "\n".join(lines)


def ablation_table(trained: dict[str, Any], evaluation: dict[str, Any]) -> str:
    lines = [
        "| subset | fusion | image only (metadata withheld) | metadata only | fusion minus "
        "image only (95% CI) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, label in SUBSET_NAMES.items():
        entry = evaluation["subsets"].get(name)
        if entry is None:
            continue
        d = entry["fusion_minus_image_only"]
        lines.append(
            f"| {label} | {_ci(entry['fusion'])} | {_ci(entry['image_only'])} | "
            f"{_ci(entry['metadata_only'])} | {d['difference']:+.3f} "
            f"({d['low']:+.3f} to {d['high']:+.3f}) |"
        )
    return "\n".join(lines)


def leave_one_clinic_out_table(trained: dict[str, Any], evaluation: dict[str, Any]) -> str:
    path = BUNDLE / "docs" / "leave_one_clinic_out.json"
    folds = json.loads(path.read_text())["folds"] if path.exists() else []
    lines = [
        "| clinic left out | n (melanoma) | epochs | trained on | minutes "
        "| AUC with metadata (95% CI) | AUC metadata withheld (95% CI) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for fold in folds:
        lines.append(
            f"| {fold['held_out_clinic']} | {fold['n']} ({fold['n_melanoma']}) | "
            f"{fold['epochs']} | {fold['device']} | {fold['training_minutes']:.0f} | "
            f"{_ci(fold['with_metadata'])} | {_ci(fold['no_metadata'])} |"
        )
    return "\n".join(lines)


TABLES: dict[str, Callable[[dict[str, Any], dict[str, Any]], str]] = {
    "validation": validation_table,
    "isic_operating_point": isic_operating_table,
    "epochs": epochs_table,
    "members": members_table,
    "ablation": ablation_table,
    "leave_one_clinic_out": leave_one_clinic_out_table,
}


def rendered(card: str, bundle: Path = BUNDLE) -> str:
    trained = json.loads((bundle / "models" / "validation_metrics.json").read_text())
    evaluation = json.loads((bundle / "docs" / "evaluation" / "metrics.json").read_text())

    def fill(match: re.Match[str]) -> str:
        table = TABLES[match.group(2)](trained, evaluation)
        return f"{match.group(1)}{table}\n{match.group(4)}"

    return _MARKED.sub(fill, card)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the card is stale")
    args = parser.parse_args()
    path = BUNDLE / "docs" / "README.md"
    card = path.read_text()
    fresh = rendered(card)
    if args.check:
        if fresh != card:
            print(f"{path}: tables are stale; run python -m training.model_card", file=sys.stderr)
            return 1
        return 0
    path.write_text(fresh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
