"""The auxiliary diagnosis task: its targets, and a trainer that refuses half of it."""

from __future__ import annotations

import pandas as pd
import pytest

from monai_bundle.scripts.data import (
    DIAGNOSES,
    DIAGNOSIS_CLASSES,
    NO_DIAGNOSIS_CLASS,
    diagnosis_targets,
)
from monai_bundle.scripts.training import FusionTrainer


def test_every_named_diagnosis_is_a_class_and_unbiopsied_lesions_teach_nothing() -> None:
    assert set(DIAGNOSES.values()) - set(DIAGNOSIS_CLASSES) == {"benign, unspecified"}
    frame = pd.DataFrame(
        {"diagnosis": ["melanoma", "benign, unspecified", "basal cell carcinoma", "other"]}
    )
    targets = diagnosis_targets(frame)
    assert targets.tolist() == [
        DIAGNOSIS_CLASSES.index("melanoma"),
        NO_DIAGNOSIS_CLASS,
        DIAGNOSIS_CLASSES.index("basal cell carcinoma"),
        NO_DIAGNOSIS_CLASS,
    ]


@pytest.mark.parametrize(("classes", "weight"), [(len(DIAGNOSIS_CLASSES), 0.0), (0, 0.5), (3, 0.5)])
def test_a_diagnosis_head_without_its_loss_or_a_loss_without_its_head_is_refused(
    classes: int, weight: float
) -> None:
    with pytest.raises(ValueError, match="diagnosis"):
        FusionTrainer(
            data_root="unused",
            cache_dir="unused",
            output_dir="unused",
            network={"diagnosis_classes": classes},
            diagnosis_loss_weight=weight,
        )
