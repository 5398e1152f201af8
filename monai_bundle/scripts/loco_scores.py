"""Recipes judged offline on leave-one-clinic-out scores: ensembles and stacked features.

``LeaveOneClinicOut`` writes every held-out and threshold case's logits. Averaging the logits of
runs of different seeds or recipes is the leave-one-clinic-out result of their ensemble (each
member's fold is trained as it would be alone, on its own seed's split), and a feature can be
stacked onto a run's logit by a logistic fit on each fold's threshold split, never on the
held-out clinic. Two runs (or two modes of one run) are compared on the same held-out cases
with paired bootstrap intervals, per clinic and for the proxy. Neither needs training again.
Used for the model card's ensemble, lesion-size, out-of-clinic ablation and logit-weight rows::

    python -m monai_bundle.scripts.loco_scores ensemble RUN_DIR RUN_DIR [...]
    python -m monai_bundle.scripts.loco_scores size RUN_DIR --data-root ../shared/data
    python -m monai_bundle.scripts.loco_scores compare RUN_A:fusion RUN_B:image_only_model
    python -m monai_bundle.scripts.loco_scores blend RUN_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from monai_bundle.scripts.evaluation import (
    difference_with_interval,
    operating_point,
    sigmoid,
    threshold_for_sensitivity,
)

SCORES = "leave_one_clinic_out_scores.csv"
ROW_KEY = ["held_out_clinic", "role", "image"]
MODES = ("fusion", "image_only")
# the ablation's model that never had metadata; its column is absent from runs without one
IMAGE_ONLY_MODEL = "image_only_model"


def read_scores(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / SCORES)


def ensemble(runs: list[pd.DataFrame]) -> pd.DataFrame:
    """The mean logit of ``runs`` per case.

    Every run must have held out the same cases. Runs with different seeds drew different
    threshold splits (and so trained on slightly different cases): only the threshold rows that
    every run kept out of training are kept, so the threshold is still picked on unseen cases.
    """
    held = [r[r.role == "held_out"].sort_values(ROW_KEY) for r in runs]
    first = held[0][ROW_KEY].to_numpy()
    if any(len(h) != len(first) or not (h[ROW_KEY].to_numpy() == first).all() for h in held):
        raise ValueError("runs held out different cases: not comparable")
    logits = [f"{m}_logit" for m in MODES]
    merged = runs[0].drop(columns=logits)
    for k, run in enumerate(runs):
        renamed = run[ROW_KEY + logits].rename(columns={c: f"{c}{k}" for c in logits})
        merged = merged.merge(renamed, on=ROW_KEY, how="inner")
    for mode in MODES:
        members = [merged.pop(f"{mode}_logit{k}").to_numpy() for k in range(len(runs))]
        merged[f"{mode}_logit"] = np.mean(members, axis=0)
    return merged


def per_clinic(scores: pd.DataFrame, sensitivity_target: float = 0.95) -> dict[str, Any]:
    """Held-out AUC per clinic and mode, and the fusion operating point picked on the threshold
    rows, as ``LeaveOneClinicOut`` computes them; plus the unweighted means."""
    clinics: dict[str, Any] = {}
    for clinic, fold in scores.groupby("held_out_clinic", sort=False):
        held = fold[fold.role == "held_out"]
        threshold_rows = fold[fold.role == "threshold"]
        y = held.label.to_numpy()
        entry: dict[str, Any] = {"n_melanoma": int(y.sum())}
        for mode in MODES:
            entry[f"{mode}_auc"] = float(roc_auc_score(y, held[f"{mode}_logit"]))
        threshold = threshold_for_sensitivity(
            threshold_rows.label.to_numpy(),
            sigmoid(threshold_rows.fusion_logit.to_numpy()),
            sensitivity_target,
        )
        point = operating_point(y, sigmoid(held.fusion_logit.to_numpy()), threshold)
        entry["fusion_sensitivity"] = point["sensitivity"]
        entry["fusion_specificity"] = point["specificity"]
        clinics[str(clinic)] = entry
    mean = {
        key: float(np.mean([c[key] for c in clinics.values()]))
        for key in next(iter(clinics.values()))
        if key != "n_melanoma"
    }
    return {"clinics": clinics, "mean": mean}


def stacked(scores: pd.DataFrame, feature: pd.Series, mode: str = "fusion") -> dict[str, Any]:
    """Held-out AUC of ``mode``'s logit alone and with ``feature`` (and its square) stacked on.

    ``feature`` is indexed by image. The stacking weights are fitted per fold on its threshold
    rows (cases outside the held-out clinic) only; also reported is the feature's own AUC on both
    sides, which shows whether its direction transfers between clinics at all.
    """
    x = scores.image.map(feature)
    if x.isna().any():
        raise ValueError(f"{int(x.isna().sum())} scored images have no {feature.name}")
    frame = scores.assign(x=x.to_numpy(dtype=float))
    out: dict[str, Any] = {}
    for clinic, fold in frame.groupby("held_out_clinic", sort=False):
        fit, held = fold[fold.role == "threshold"], fold[fold.role == "held_out"]

        def design(rows: pd.DataFrame) -> np.ndarray:
            return np.c_[rows[f"{mode}_logit"], rows.x, rows.x**2]

        model = LogisticRegression(max_iter=1000).fit(design(fit), fit.label)
        out[str(clinic)] = {
            "logit_auc": float(roc_auc_score(held.label, held[f"{mode}_logit"])),
            "stacked_auc": float(roc_auc_score(held.label, model.decision_function(design(held)))),
            "feature_auc_held_out": float(roc_auc_score(held.label, held.x)),
            "feature_auc_threshold_rows": float(roc_auc_score(fit.label, fit.x)),
        }
    means = {
        f"mean_{key}": float(np.mean([c[key] for c in out.values()]))
        for key in ("logit_auc", "stacked_auc")
    }
    return {**out, **means}


def paired_difference(
    a: pd.DataFrame,
    mode_a: str,
    b: pd.DataFrame,
    mode_b: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Held-out AUC of ``a``'s ``mode_a`` logit minus ``b``'s ``mode_b``, on the same cases.

    Per clinic, and for the proxy (the mean over clinics), with paired 95% bootstrap intervals:
    each replicate resamples every clinic's held-out cases once for both runs, so the proxy's
    interval is as wide as its smallest clinics make it.
    """
    key = ["held_out_clinic", "image"]

    def held(run: pd.DataFrame, mode: str, name: str) -> pd.DataFrame:
        if f"{mode}_logit" not in run.columns:
            raise ValueError(f"this run has no {mode} scores (a run without the image-only model?)")
        rows = run[run.role == "held_out"]
        return rows[key + ["label", f"{mode}_logit"]].rename(
            columns={f"{mode}_logit": name, "label": f"label_{name}"}
        )

    left, right = held(a, mode_a, "a"), held(b, mode_b, "b")
    merged = left.merge(right, on=key, how="inner", validate="one_to_one")
    if not len(merged) == len(left) == len(right):
        raise ValueError("runs held out different cases: not comparable")
    if (merged.label_a != merged.label_b).any():
        raise ValueError("runs disagree on a held-out case's label")
    rng = np.random.default_rng(seed)
    clinics: dict[str, Any] = {}
    replicates = []
    for clinic, fold in merged.groupby("held_out_clinic", sort=False):
        y, score_a, score_b = (fold[c].to_numpy() for c in ("label_a", "a", "b"))
        reps = np.empty(n_boot)
        for k in range(n_boot):
            idx = rng.integers(0, len(y), len(y))
            while y[idx].min() == y[idx].max():
                idx = rng.integers(0, len(y), len(y))
            reps[k] = roc_auc_score(y[idx], score_a[idx]) - roc_auc_score(y[idx], score_b[idx])
        reference = float(roc_auc_score(y, score_a) - roc_auc_score(y, score_b))
        clinics[str(clinic)] = difference_with_interval(reference, reps)
        replicates.append(reps)
    proxy = float(np.mean([c["difference"] for c in clinics.values()]))
    return {
        "clinics": clinics,
        "proxy": difference_with_interval(proxy, np.mean(replicates, axis=0)),
    }


def fusion_model_logit(scores: pd.DataFrame, companion: bool) -> np.ndarray:
    """The fusion model's own logit.

    A run with the image-only companion scores the mean of the two models' logits wherever a
    field is known, and the companion's alone where none is (there both sides are equal, and so
    is this): undo the mean.
    """
    fusion = scores.fusion_logit.to_numpy()
    if not companion:
        return fusion
    return 2.0 * fusion - scores[f"{IMAGE_ONLY_MODEL}_logit"].to_numpy()


def blend(scores: pd.DataFrame, companion: bool, weights: np.ndarray) -> dict[str, Any]:
    """Held-out AUC of ``w * fusion model + (1 - w) * image-only model`` for each weight, and of
    the weight that a fold's threshold rows (its validation cases) would choose.

    Answers whether the companion's equal weights should be tuned, without tuning them on the
    held-out clinic.
    """
    if f"{IMAGE_ONLY_MODEL}_logit" not in scores:
        raise ValueError("the run has no image_only_model scores to blend with")
    fusion = fusion_model_logit(scores, companion)
    frame = scores.assign(fusion_model=fusion)
    clinics: dict[str, Any] = {}
    for clinic, fold in frame.groupby("held_out_clinic", sort=False):
        aucs = {}
        for role in ("threshold", "held_out"):
            rows = fold[fold.role == role]
            aucs[role] = [
                float(
                    roc_auc_score(
                        rows.label,
                        w * rows.fusion_model + (1 - w) * rows[f"{IMAGE_ONLY_MODEL}_logit"],
                    )
                )
                for w in weights
            ]
        chosen = int(np.argmax(aucs["threshold"]))
        clinics[str(clinic)] = {
            "chosen_weight": float(weights[chosen]),
            "chosen_auc": aucs["held_out"][chosen],
            "threshold_rows_auc": aucs["threshold"],
            "held_out_auc": aucs["held_out"],
        }
    return {
        "weights": [float(w) for w in weights],
        "clinics": clinics,
        "proxy_chosen": float(np.mean([c["chosen_auc"] for c in clinics.values()])),
        "proxy_by_weight": [
            float(np.mean([c["held_out_auc"][k] for c in clinics.values()]))
            for k in range(len(weights))
        ],
    }


def lesion_log_areas(data_root: str, cache: Path) -> pd.Series:
    """log(lesion area / image area) of every training image, by the service's segmentation.

    Computed once (about 15 min on 2 cores) and kept in ``cache``.
    """
    if cache.exists():
        areas = pd.read_csv(cache)
    else:
        from monai_bundle.scripts.data import load_cases
        from monai_bundle.scripts.lesion import measure_lesion

        rows = []
        for path in load_cases(data_root).frame.image:
            rgb = np.asarray(Image.open(path).convert("RGB"))
            rows.append((Path(path).stem, measure_lesion(rgb).area_fraction))
        areas = pd.DataFrame(rows, columns=["image", "area_fraction"])
        cache.parent.mkdir(parents=True, exist_ok=True)
        areas.to_csv(cache, index=False)
    values = np.log(areas.area_fraction.clip(1e-3, 1.0)).to_numpy()
    return pd.Series(values, index=areas.image.to_numpy(), name="log_area_fraction")


def _run_and_mode(argument: str) -> tuple[str, str]:
    run, _, mode = argument.rpartition(":")
    modes = (*MODES, IMAGE_ONLY_MODEL)
    if not run or mode not in modes:
        raise SystemExit(f"{argument}: expected RUN_DIR:MODE, MODE one of {', '.join(modes)}")
    return run, mode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_bundle.scripts.loco_scores")
    sub = parser.add_subparsers(dest="command", required=True)
    both = sub.add_parser("ensemble", help="mean logit of several leave-one-clinic-out runs")
    both.add_argument("runs", nargs="+")
    size = sub.add_parser("size", help="lesion area stacked onto a run's logits")
    size.add_argument("run")
    size.add_argument("--data-root", default="../shared/data")
    size.add_argument("--cache", default="var/cache/lesion_areas.csv")
    compare = sub.add_parser(
        "compare", help="held-out AUC of RUN_A:MODE minus RUN_B:MODE, paired bootstrap intervals"
    )
    compare.add_argument("a", metavar="RUN_A:MODE")
    compare.add_argument("b", metavar="RUN_B:MODE")
    compare.add_argument(
        "--seed", type=int, default=0, help="bootstrap seed (a run's own reports use its seed)"
    )
    mix = sub.add_parser(
        "blend",
        help="fusion and image-only model logits mixed by weight, the weight chosen per fold "
        "on its threshold rows",
    )
    mix.add_argument("run")
    mix.add_argument("--steps", type=int, default=10, help="weights 0, 1/steps, ..., 1")
    args = parser.parse_args(argv)
    if args.command == "blend":
        report = Path(args.run) / "leave_one_clinic_out.json"
        options = json.loads(report.read_text())["recipe"]["network_options"]
        result = blend(
            read_scores(args.run),
            bool(options.get("image_only_companion", False)),
            np.linspace(0.0, 1.0, args.steps + 1),
        )
    elif args.command == "compare":
        (run_a, mode_a), (run_b, mode_b) = (_run_and_mode(x) for x in (args.a, args.b))
        result = paired_difference(
            read_scores(run_a), mode_a, read_scores(run_b), mode_b, seed=args.seed
        )
    elif args.command == "ensemble":
        result = {
            "members": {run: per_clinic(read_scores(run))["mean"] for run in args.runs},
            "ensemble": per_clinic(ensemble([read_scores(run) for run in args.runs])),
        }
    else:
        scores = read_scores(args.run)
        areas = lesion_log_areas(args.data_root, Path(args.cache))
        result = {mode: stacked(scores, areas, mode) for mode in MODES}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
