"""The predictions CSV: its melanoma_suspected column follows the shipped operating point."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from monai_bundle.scripts.inference import ProbabilityCsvWriter
from tests.conftest import REPO_ROOT

BUNDLE = REPO_ROOT / "monai_bundle"


def _shipped_threshold() -> float:
    operating_point = json.loads((BUNDLE / "models" / "operating_point.json").read_text())
    return float(operating_point["threshold"])


def _run(writer: ProbabilityCsvWriter, batches: list[list[tuple[str, float]]]) -> None:
    """Drive the writer from a real ignite engine with batches shaped as the evaluator's."""

    def step(engine: Engine, batch: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        # float64 so the probabilities reach the writer exactly as given.
        return [{"pred": torch.tensor([item["p"]], dtype=torch.float64)} for item in batch]

    engine = Engine(step)
    writer.attach(engine)  # type: ignore[arg-type]
    engine.run([[{"image_name": name, "p": p} for name, p in batch] for batch in batches])


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_suspected_is_probability_at_or_above_the_shipped_threshold(tmp_path: Path) -> None:
    threshold = _shipped_threshold()
    below, above = math.nextafter(threshold, 0.0), math.nextafter(threshold, 1.0)
    out = tmp_path / "nested" / "predictions.csv"
    writer = ProbabilityCsvWriter(output_file=str(out), threshold=threshold)
    _run(
        writer,
        [
            [("just_below", below), ("at", threshold)],
            [("just_above", above), ("zero", 0.0), ("one", 1.0)],
        ],
    )
    rows = _read(out)
    with out.open() as handle:
        assert handle.readline().strip() == "image_name,melanoma_probability,melanoma_suspected"
    assert [(r["image_name"], r["melanoma_suspected"]) for r in rows] == [
        ("just_below", "0"),
        ("at", "1"),
        ("just_above", "1"),
        ("zero", "0"),
        ("one", "1"),
    ]
    # The decision uses the unrounded probability: below and above print the same.
    assert rows[0]["melanoma_probability"] == rows[2]["melanoma_probability"]


def test_another_threshold_moves_the_decision(tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    _run(ProbabilityCsvWriter(str(out), threshold=0.5), [[("a", 0.4999), ("b", 0.5001)]])
    assert [r["melanoma_suspected"] for r in _read(out)] == ["0", "1"]


def test_threshold_is_required_and_checked(tmp_path: Path) -> None:
    out = str(tmp_path / "predictions.csv")
    with pytest.raises(TypeError, match="threshold"):
        ProbabilityCsvWriter(out)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="threshold must be a number"):
        ProbabilityCsvWriter(out, threshold="0.5")  # type: ignore[arg-type]
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="threshold must be within"):
            ProbabilityCsvWriter(out, threshold=bad)


def test_inference_config_passes_the_shipped_operating_point() -> None:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    handlers = parser["handlers"]
    (index,) = [
        i for i, h in enumerate(handlers) if h["_target_"].endswith(".ProbabilityCsvWriter")
    ]
    assert "threshold" in handlers[index], "inference.json: ProbabilityCsvWriter needs threshold"
    assert parser.get_parsed_content(f"handlers#{index}#threshold") == _shipped_threshold()
