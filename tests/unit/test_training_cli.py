"""`dermfusion train --set`: a candidate recipe from the command line, checked before training."""

from __future__ import annotations

import argparse

import pytest

from plugin import cli


@pytest.fixture
def bundle_run(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    captured: dict[str, object] = {}

    def run(args: argparse.Namespace, config: str, **overrides: object) -> int:
        captured.update(config=config, **overrides)
        return 0

    monkeypatch.setattr(cli, "_run_bundle_config", run)
    return captured


def test_set_overrides_recipe_fields_as_json(bundle_run: dict[str, object]) -> None:
    args = ["train", "--device", "cpu", "--seed", "3", "--set", "image_size=288"]
    assert cli.main([*args, "p_all_drop=0.5", 'network={"test_time_views": ["identity"]}']) == 0
    assert bundle_run == {
        "config": "train.json",
        "device": "cpu",
        "recipe#seed": 3,
        "recipe#image_size": 288,
        "recipe#p_all_drop": 0.5,
        "recipe#network": {"test_time_views": ["identity"]},
    }


@pytest.mark.parametrize(
    ("item", "says"),
    [
        ("frozen_batchnorm_statistics=true", "FIELD one of the recipe's"),  # removed option
        ("image_size", "expected FIELD=JSON"),
        ("image_size=big", "not JSON"),
    ],
)
def test_a_bad_set_is_refused_in_one_line_before_training(
    item: str, says: str, bundle_run: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["train", "--set", item]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert bundle_run == {}  # nothing was trained
