"""Pieces of ``configs/inference.json``: the datalist reader and the CSV writer."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
from monai.engines import Evaluator
from monai.utils import IgniteInfo, min_version, optional_import

from monai_bundle.scripts.metadata import encode_metadata
from monai_bundle.scripts.sites import site_from_name

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Column names per dataset convention: (image name, age, sex, site).
COLUMN_SETS: tuple[tuple[str, str, str, str], ...] = (
    ("image_name", "age_approx", "sex", "anatom_site_general_challenge"),
    ("image_id", "age", "sex", "localization"),
)


def _cell(row: dict[str, Any], column: str) -> Any:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _sex(value: Any) -> str | None:
    text = str(value).strip().lower() if value is not None else ""
    return {"male": "male", "m": "male", "female": "female", "f": "female"}.get(text)


def read_metadata_csv(path: str | Path) -> dict[str, dict[str, Any]]:
    """Image name → {age, sex, site} in model vocabulary, from ISIC 2020 or HAM10000 columns.

    Any metadata column may be absent or empty; a CSV with only an image-name column is valid.
    """
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    columns = next((c for c in COLUMN_SETS if c[0] in frame.columns), None)
    if columns is None:
        raise ValueError(
            f"{path}: no image-name column (expected one of "
            f"{', '.join(c[0] for c in COLUMN_SETS)}; found {', '.join(frame.columns)})"
        )
    name_col, age_col, sex_col, site_col = columns
    out: dict[str, dict[str, Any]] = {}
    for row in frame.to_dict("records"):
        age_text = _cell(row, age_col)
        try:
            age = float(age_text) if age_text is not None else None
        except ValueError:
            raise ValueError(f"{path}: {age_col} {age_text!r} is not a number") from None
        site_text = _cell(row, site_col)
        out[str(row[name_col]).strip()] = {
            "age": age,
            "sex": _sex(_cell(row, sex_col)),
            "site": site_from_name(site_text) if site_text is not None else None,
        }
    return out


def datalist(
    images_dir: str | Path, metadata_csv: str | Path | None = None
) -> list[dict[str, Any]]:
    """One item per image file in ``images_dir``, with its encoded metadata (missing if unknown)."""
    folder = Path(images_dir)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder}: no .jpg/.jpeg/.png images")
    table = read_metadata_csv(metadata_csv) if metadata_csv else {}
    items = []
    for path in paths:
        fields = table.get(path.stem, {"age": None, "sex": None, "site": None})
        items.append(
            {
                "image": str(path),
                "image_name": path.stem,
                "metadata": encode_metadata(fields["age"], fields["sex"], fields["site"]),
            }
        )
    return items


class ProbabilityCsvWriter:
    """Writes ``image_name,melanoma_probability,melanoma_suspected`` per image, in datalist order.

    ``melanoma_suspected`` is 1 where the probability is >= ``threshold`` (the shipped operating
    point), the same rule as the SR and FHIR decision. ``threshold`` has no default: a config that
    does not pass the operating point must fail rather than write decisions at a made-up one.
    """

    def __init__(self, output_file: str, threshold: float) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
        if not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {threshold!r}")
        self.output_file = Path(output_file)
        self.threshold = float(threshold)
        self.rows: list[tuple[str, float]] = []

    def attach(self, engine: Evaluator) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Evaluator) -> None:
        for item, output in zip(engine.state.batch, engine.state.output, strict=True):
            self.rows.append((item["image_name"], float(output["pred"].reshape(-1)[0])))

    def _write(self, engine: Evaluator) -> None:
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        with self.output_file.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image_name", "melanoma_probability", "melanoma_suspected"])
            for name, probability in self.rows:
                # Decided on the unrounded probability, as the service does.
                suspected = int(probability >= self.threshold)
                writer.writerow([name, f"{probability:.6f}", suspected])
        log.info("wrote %d probabilities to %s", len(self.rows), self.output_file)
