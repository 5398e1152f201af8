"""The image branch on ONNX Runtime scores as the torch network does (issue 21: a faster export
only where it gives the same probabilities within 1e-4), and threads are set as configured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from monai_bundle.scripts.transforms import load_rgb
from plugin.domain import Demographics, Source, Sourced
from plugin.model import ONNXRUNTIME, FusionModel, ModelLoadError, use_threads
from tests.conftest import REPO_ROOT, SAMPLES


def _cases() -> tuple[list[np.ndarray], list[Demographics]]:
    rgbs = [load_rgb(p) for p in sorted(SAMPLES.glob("*.jpg"))]
    known = Demographics(
        age=Sourced(55, Source.CSV), sex=Sourced("female", Source.CSV), site=Sourced.missing()
    )
    demographics = [known if i % 2 else Demographics.unknown() for i in range(len(rgbs))]
    return rgbs, demographics


def test_onnxruntime_gives_the_torch_probabilities_attributions_and_maps(  # type: ignore[no-untyped-def]
    fusion_model, tmp_path: Path
) -> None:
    onnx = FusionModel.load(REPO_ROOT / "monai_bundle", runtime=ONNXRUNTIME, cache_dir=tmp_path)
    assert onnx.identity == fusion_model.identity
    (cached,) = tmp_path.glob("image-branch-*.onnx")
    rgbs, demographics = _cases()
    by_torch = fusion_model.score_explainable(rgbs, demographics)
    by_onnx = onnx.score_explainable(rgbs, demographics)
    spread = np.ptp([f.probability for f, _ in by_torch])
    assert spread > 0.01  # different images, different scores: the comparison means something
    for (expected, why_expected), (got, why), rgb in zip(by_torch, by_onnx, rgbs, strict=True):
        assert got.probability == pytest.approx(expected.probability, abs=1e-4)
        assert got.melanoma_suspected == expected.melanoma_suspected
        assert [n for n, _ in got.attributions] == [n for n, _ in expected.attributions]
        for (_, a), (_, b) in zip(got.attributions, expected.attributions, strict=True):
            assert a == pytest.approx(b, abs=1e-4)
        drawn = onnx.explain(rgb, why)
        assert np.abs(drawn - fusion_model.explain(rgb, why_expected)).max() < 1e-3
    # a second start reads the cached export instead of exporting again
    modified = cached.stat().st_mtime_ns
    again = FusionModel.load(REPO_ROOT / "monai_bundle", runtime=ONNXRUNTIME, cache_dir=tmp_path)
    assert cached.stat().st_mtime_ns == modified
    (first,) = again.score(rgbs[:1], demographics[:1])
    assert first.probability == pytest.approx(by_onnx[0][0].probability, abs=1e-6)


def test_an_unknown_runtime_is_refused_by_name() -> None:
    with pytest.raises(ModelLoadError, match="runtime must be one of torch, onnxruntime"):
        FusionModel.load(REPO_ROOT / "monai_bundle", runtime="tensorrt")


def test_threads_zero_means_half_the_cores_and_a_number_is_taken_as_given() -> None:
    before = torch.get_num_threads()
    try:
        assert use_threads(1) == 1 and torch.get_num_threads() == 1
        import os

        assert use_threads(0) == max(1, (os.cpu_count() or 1) // 2)
        with pytest.raises(ValueError, match="threads"):
            use_threads(-1)
    finally:
        torch.set_num_threads(before)
