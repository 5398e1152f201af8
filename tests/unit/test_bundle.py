"""The bundle as a contract: schema-valid metadata, declared formats matching the code."""

import json

import pytest
from monai.bundle import ConfigParser, verify_metadata

from monai_bundle.scripts.metadata import METADATA_CHANNELS, METADATA_WIDTH
from monai_bundle.scripts.transforms import IMAGE_SIZE
from tests.conftest import REPO_ROOT

BUNDLE = REPO_ROOT / "monai_bundle"
SCHEMA = BUNDLE / "schema" / "meta_schema_20240725.json"


def test_metadata_validates_against_the_shipped_schema_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("verify_metadata tried to download the schema")

    monkeypatch.setattr("monai.apps.utils._download_with_progress", no_download)
    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(SCHEMA))


def test_metadata_declares_what_the_code_feeds() -> None:
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    inputs = meta["network_data_format"]["inputs"]
    assert inputs["image"]["spatial_shape"] == [IMAGE_SIZE, IMAGE_SIZE]
    assert inputs["metadata"]["num_channels"] == METADATA_WIDTH
    assert [inputs["metadata"]["channel_def"][str(i)] for i in range(METADATA_WIDTH)] == list(
        METADATA_CHANNELS
    )
    assert meta["version"] in meta["changelog"]
    assert meta["schema"].endswith(SCHEMA.name)


def test_every_config_parses_and_the_weights_are_present() -> None:
    for name in ("inference.json", "train.json"):
        parser = ConfigParser()
        parser.read_config(BUNDLE / "configs" / name)
        assert "run" in parser.config, name
    assert (BUNDLE / "models" / "model.pt").stat().st_size > 1_000_000
    threshold = json.loads((BUNDLE / "models" / "operating_point.json").read_text())["threshold"]
    assert 0 < threshold < 1
    assert (BUNDLE / "docs" / "README.md").is_file() and (BUNDLE / "LICENSE").is_file()


def test_model_card_quotes_the_committed_validation_metrics() -> None:
    metrics = json.loads((BUNDLE / "models" / "validation_metrics.json").read_text())
    card = (BUNDLE / "docs" / "README.md").read_text()
    auc = metrics["subsets"]["all"]["with_metadata"]["auc"]
    assert f"{auc:.3f}" in card
    assert "dermfusion train" in card


def test_metadata_eval_metrics_are_the_committed_ones() -> None:
    """The bundle's own summary must not go stale when new weights ship."""
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["eval_metrics"]
    metrics = json.loads((BUNDLE / "models" / "validation_metrics.json").read_text())
    subsets = metrics["subsets"]
    isic = subsets["isic2020"]
    assert meta == {
        "val_auc_all": round(subsets["all"]["with_metadata"]["auc"], 3),
        "val_auc_ham10000_lesion_disjoint": round(subsets["ham10000"]["with_metadata"]["auc"], 3),
        "val_auc_isic2020_patient_disjoint": round(isic["with_metadata"]["auc"], 3),
        "val_auc_isic2020_no_metadata": round(isic["no_metadata"]["auc"], 3),
        "val_auc_isic_archive": round(subsets["isic_archive"]["with_metadata"]["auc"], 3),
        "val_specificity_isic2020_at_95_sensitivity": round(
            isic["with_metadata"]["at_95_sensitivity"]["specificity"], 3
        ),
        "val_ece_isic2020_cross_fitted": round(
            metrics["calibration"]["cross_fitted_ece_isic2020"]["with_metadata"], 3
        ),
    }


def test_inference_builds_the_network_that_training_trains() -> None:
    """The two configs each spell out FusionNet's options (MONAI bundles keep configs
    self-contained); weights trained with one set and loaded into another would be wrong."""
    inference = json.loads((BUNDLE / "configs" / "inference.json").read_text())["network_def"]
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    members = 1 + len(train["recipe"].get("further_member_seeds", []))
    if members == 1:
        assert inference.pop("_target_") == "monai_bundle.scripts.network.FusionNet"
    else:
        assert inference.pop("_target_") == "monai_bundle.scripts.network.FusionEnsemble"
        assert inference.pop("members") == members
    assert inference == train["recipe"]["network"]
    trained = json.loads((BUNDLE / "models" / "validation_metrics.json").read_text())["recipe"]
    assert {k: v for k, v in train["recipe"].items() if k != "_target_"} == trained


def test_model_card_tables_are_the_committed_metrics() -> None:
    """Regenerating the card's tables from the committed metrics changes nothing."""
    from training.model_card import rendered

    card = (BUNDLE / "docs" / "README.md").read_text()
    assert "<!-- generated:validation -->" in card
    assert rendered(card) == card, "stale tables: run python -m training.model_card"
