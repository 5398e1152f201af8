"""Leave-one-clinic-out for the shipped recipe: how the model does at a clinic it never saw.

The lesion- and patient-disjoint validation still shares cameras, framing and case mix with the
training images; a new hospital shares none of them. Each fold trains the shipped recipe
(``configs/train.json``; fewer epochs, said in the output; of an ensemble, the first member)
on every clinic but one and scores the one left out, with and without metadata, AUC with a
bootstrap interval. Not a gate for
candidates: a check of the final recipe.

    python -m training.leave_one_clinic_out --epochs 2 --clinics isic2020 rosendahl
    python -m training.leave_one_clinic_out --summary   # collect the folds into the bundle

Each fold writes ``<out>/<clinic>/`` (weights, per-epoch log, validation_metrics.json);
``--summary`` writes ``monai_bundle/docs/leave_one_clinic_out.json`` from the folds present,
which the model card's table is generated from.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.whole_network import Recipe, WholeNetworkTrainer

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "monai_bundle"
SUMMARY = BUNDLE / "docs" / "leave_one_clinic_out.json"
CLINICS = (
    "isic2020",
    "isic_archive",
    "rosendahl",
    "vidir_modern",
    "vidir_molemax",
    "vienna_dias",
)


def shipped_recipe() -> Recipe:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    recipe = parser.get_parsed_content("recipe")
    assert isinstance(recipe, Recipe)
    return recipe


def run_fold(
    clinic: str,
    epochs: int,
    out: Path,
    data_root: str,
    overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    **smoke: int,
) -> dict[str, Any]:
    """One fold; ``overrides``: recipe fields of a candidate; ``smoke``:
    ``max_images``/``max_steps`` for a quick check (tests)."""
    # one network per fold: an ensemble's members are trained alike, so a fold of its first
    # member says how the recipe carries to a new clinic at 1/k of the cost
    recipe = replace(shipped_recipe(), epochs=epochs, further_member_seeds=[], **(overrides or {}))
    trainer = WholeNetworkTrainer(
        recipe,
        data_root=data_root,
        output_dir=str(out / clinic),
        cache_dir=str(REPO / "var" / "cache"),
        device=device,
        held_out_clinic=clinic,
        **smoke,  # type: ignore[arg-type]
    )
    return trainer.run()


def fold_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The held-out clinic's AUCs (with and without metadata) and what the fold cost."""
    (entry,) = [v for k, v in report["subsets"].items() if k != "all"]
    return {
        "held_out_clinic": report["held_out_clinic"],
        "n": entry["with_metadata"]["n"],
        "n_melanoma": entry["with_metadata"]["n_melanoma"],
        "with_metadata": {k: entry["with_metadata"][k] for k in ("auc", "auc_low", "auc_high")},
        "no_metadata": {k: entry["no_metadata"][k] for k in ("auc", "auc_low", "auc_high")},
        "epochs": report["recipe"]["epochs"],
        "device": report["device"],
        "training_minutes": round(report["training_seconds"] / 60, 1),
    }


def summarise(out: Path) -> dict[str, Any]:
    folds = []
    for clinic in CLINICS:
        metrics = out / clinic / "validation_metrics.json"
        if metrics.exists():
            folds.append(fold_summary(json.loads(metrics.read_text())))
    summary = {
        "what": "each fold trains the shipped recipe on every clinic but one and scores that "
        "one (AUC with 95% bootstrap interval); ISIC 2020 at its folder prevalence (AUC does "
        "not depend on it)",
        "command": "python -m training.leave_one_clinic_out --epochs N --clinics ...",
        "folds": folds,
    }
    SUMMARY.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", nargs="+", choices=CLINICS, default=list(CLINICS))
    parser.add_argument("--epochs", type=int, default=2, help="epochs per fold")
    parser.add_argument("--out", type=Path, default=REPO / "var" / "loco")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--summary", action="store_true", help="only collect the folds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--max-images", type=int, help="smoke run on a small stratified subset")
    parser.add_argument("--max-steps", type=int, help="smoke run: stop after this many steps")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=JSON",
        help="a candidate recipe (e.g. camera_augmentation=true); use with another --out",
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.summary:
        for clinic in args.clinics:
            run_fold(
                clinic,
                args.epochs,
                args.out,
                args.data_root,
                {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)},
                args.device,
                **{
                    k: v
                    for k, v in (("max_images", args.max_images), ("max_steps", args.max_steps))
                    if v is not None
                },
            )
    if args.set:  # a candidate: its folds are printed, not written into the bundle
        for clinic in args.clinics:
            print(
                clinic,
                json.dumps(
                    fold_summary(
                        json.loads((args.out / clinic / "validation_metrics.json").read_text())
                    )
                ),
            )
        return 0
    for fold in summarise(args.out)["folds"]:
        print(
            f"{fold['held_out_clinic']}: n={fold['n']} ({fold['n_melanoma']} melanoma) "
            f"AUC {fold['with_metadata']['auc']:.3f} with metadata, "
            f"{fold['no_metadata']['auc']:.3f} without; {fold['epochs']} epochs"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
