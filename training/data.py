"""The training cases from ../shared/data: HAM10000, the SIIM-ISIC 2020 images, the ISIC Archive."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from monai_bundle.scripts.metadata import encode_metadata
from monai_bundle.scripts.sites import site_from_name

ISIC_PREVALENCE = 540 / 29559  # melanoma share of the full ISIC 2020 table
SOURCES = ("ham10000", "isic2020", "isic_archive")  # the values of Cases.frame.source

# One vocabulary for HAM10000's ``dx`` codes and ISIC 2020's ``diagnosis`` names, so the report can
# say which benign lesions the model mistakes for melanoma. ISIC 2020's benign "unknown" rows were
# not biopsied (clinical follow-up or consensus); they stay apart from the naevi.
DIAGNOSES = {
    "mel": "melanoma",
    "melanoma": "melanoma",
    "nv": "naevus",
    "nevus": "naevus",
    "atypical melanocytic proliferation": "naevus",
    "bkl": "benign keratosis",
    "seborrheic keratosis": "benign keratosis",
    "lentigo NOS": "benign keratosis",
    "solar lentigo": "benign keratosis",
    "lichenoid keratosis": "benign keratosis",
    "akiec": "actinic keratosis / Bowen's disease",
    "bcc": "basal cell carcinoma",
    "df": "dermatofibroma",
    "vasc": "vascular lesion",
    "cafe-au-lait macule": "other benign",
    "unknown": "benign, unspecified",
    "actinic keratosis": "actinic keratosis / Bowen's disease",
    "dermatofibroma": "dermatofibroma",
    "squamous cell carcinoma": "squamous cell carcinoma",
}


@dataclass(frozen=True)
class Cases:
    """One row per image: path, label, metadata in model vocabulary, source, split group and
    diagnosis (``DIAGNOSES`` vocabulary)."""

    frame: pd.DataFrame

    def __len__(self) -> int:
        return len(self.frame)


def _age(value: object) -> float | None:
    return None if pd.isna(value) else float(value)  # type: ignore[arg-type]


def _sex(value: object) -> str | None:
    return value if value in ("male", "female") else None  # type: ignore[return-value]


def load_cases(data_root: str | Path, include_archive: bool = True) -> Cases:
    """Every image with a label; ``include_archive``: the ISIC Archive folder too."""
    root = Path(data_root).resolve()
    ham = pd.read_csv(root / "ham10000" / "metadata.csv")
    isic_all = pd.read_csv(root / "isic2020" / "metadata.csv")
    isic_dir = root / "isic2020" / "images"
    present = {p.stem for p in isic_dir.glob("*.jpg")}
    isic = isic_all[isic_all.image_name.isin(present)]
    rows = []
    for r in ham.itertuples():
        rows.append(
            dict(
                image=str(root / "ham10000" / "images" / f"{r.image_id}.jpg"),
                image_name=r.image_id,
                label=int(r.melanoma),
                age=_age(r.age),
                sex=_sex(r.sex),
                site=site_from_name(r.localization if isinstance(r.localization, str) else None),
                source="ham10000",
                group=f"ham:{r.lesion_id}",
                clinic=r.dataset,
                diagnosis=DIAGNOSES.get(r.dx, "other"),
            )
        )
    for r in isic.itertuples():
        site = r.anatom_site_general_challenge
        rows.append(
            dict(
                image=str(isic_dir / f"{r.image_name}.jpg"),
                image_name=r.image_name,
                label=int(r.target),
                age=_age(r.age_approx),
                sex=_sex(r.sex),
                site=site_from_name(site if isinstance(site, str) else None),
                source="isic2020",
                group=f"isic:{r.patient_id}",
                clinic="isic2020",
                diagnosis=DIAGNOSES.get(r.diagnosis, "other"),
            )
        )
    if include_archive:
        rows.extend(_archive_rows(root / "isic-archive"))
    frame = pd.DataFrame(rows).sort_values("image_name", kind="stable").reset_index(drop=True)
    return Cases(frame)


def _archive_rows(root: Path) -> list[dict[str, object]]:
    """The ISIC Archive images (earlier contributors' cameras): each image its own lesion."""
    table = pd.read_csv(root / "metadata.csv")
    rows: list[dict[str, object]] = []
    for r in table.itertuples():
        site = r.anatom_site_general
        rows.append(
            dict(
                image=str(root / "images" / f"{r.image_id}.jpg"),
                image_name=r.image_id,
                label=int(r.melanoma),
                age=_age(r.age_approx),
                sex=_sex(r.sex),
                site=site_from_name(site if isinstance(site, str) else None),
                source="isic_archive",
                group=f"archive:{r.image_id}",
                clinic="isic_archive",
                diagnosis=DIAGNOSES.get(str(r.diagnosis), "other"),
            )
        )
    return rows


def _known(value: object) -> object:
    """pandas stores a missing value as NaN; the encoder wants None."""
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


def encode_frame(frame: pd.DataFrame) -> np.ndarray:
    """The model's metadata vectors for rows with ``age``, ``sex`` and ``site`` columns."""
    return np.stack(
        [
            encode_metadata(_known(r.age), _known(r.sex), _known(r.site))  # type: ignore[arg-type]
            for r in frame.itertuples()
        ]
    )


def split_by_group(cases: Cases, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean validation mask; whole lesions (HAM10000) and whole patients (ISIC 2020) go one way.

    Groups are shuffled per source and label so both sides keep each source's melanoma share.
    """
    rng = np.random.default_rng(seed)
    frame = cases.frame
    group_label = frame.groupby("group")["label"].max()
    group_source = frame.groupby("group")["source"].first()
    val_groups: set[str] = set()
    for source in sorted(group_source.unique()):
        for label in (0, 1):
            groups = sorted(group_label[(group_source == source) & (group_label == label)].index)
            rng.shuffle(groups)
            val_groups.update(groups[: int(round(len(groups) * val_fraction))])
    return frame["group"].isin(val_groups).to_numpy()


def isic_patients(groups: Iterable[str]) -> set[str]:
    """The ISIC 2020 patient ids among split groups (``isic:<patient_id>``)."""
    return {g.split(":", 1)[1] for g in groups if g.startswith("isic:")}


def isic_weights(frame: pd.DataFrame) -> np.ndarray:
    """Sample weights that put the ISIC 2020 images back at the table's 2% prevalence.

    The benign ISIC images here are the table's first 500 benign rows in name order (a fair
    sample, but at 48% prevalence instead of 1.8%); other sources keep weight 1.
    """
    weights = np.ones(len(frame))
    isic = (frame["source"] == "isic2020").to_numpy()
    labels = frame["label"].to_numpy()
    n_pos = int((isic & (labels == 1)).sum())
    n_neg = int((isic & (labels == 0)).sum())
    if n_pos and n_neg:
        weights[isic & (labels == 0)] = (n_pos * (1 - ISIC_PREVALENCE) / ISIC_PREVALENCE) / n_neg
    return weights
