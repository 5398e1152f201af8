"""Per-image latency on this machine's CPU: one network view, scoring, and the whole report.

Prints medians in ms per image for batch sizes 1 and 8 and, per stage, the ratio to one
network view (backbone + head on the unflipped image) measured in the same run (this machine
is noisy: compare ratios across runs, not absolute numbers). Scoring averages the image features
over the bundle's test-time views, so it costs about that many network views. The budget from
the model-quality issue is 250 ms per image for everything `infer` does per image (scoring with
attributions, lesion size, saliency, SR, Bundle; the optional Secondary Capture is timed apart).

    .venv/bin/python benchmarks/inference_latency.py [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dicom_io.capture import SaliencyCaptureWriter
from dicom_io.demographics import demographics_from_dataset
from dicom_io.images import read_image
from monai_bundle.scripts.metadata import METADATA_WIDTH
from monai_bundle.scripts.transforms import preprocess_rgb
from plugin.config import ModelSettings
from plugin.model import RUNTIMES, FusionModel
from plugin.pipeline import ReportPipeline

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "dms_jpeg_baseline.dcm"


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=ModelSettings.runtime,
        help="where the image branch runs (default: the service's, [model] runtime)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = FusionModel.load(REPO / "monai_bundle", runtime=args.runtime)
    pipeline = ReportPipeline(model, "urn:benchmark")
    with_capture = ReportPipeline(model, "urn:benchmark", capture_writer=SaliencyCaptureWriter())
    image = read_image(SAMPLE)
    demo = demographics_from_dataset(image.dataset)
    print(
        f"sample {SAMPLE.name} {image.rgb.shape}, torch threads {torch.get_num_threads()}, "
        f"test-time views {len(model.network.test_time_views)}, image branch in {args.runtime}"
    )
    for batch in (1, 8):
        tensor = torch.stack([preprocess_rgb(image.rgb)] * batch).contiguous(
            memory_format=torch.channels_last
        )
        meta = torch.zeros((batch, METADATA_WIDTH))
        with torch.inference_mode():
            network = _median_seconds(
                lambda t=tensor, m=meta, n=model.network: n.head(n.image_features(t), m),
                args.repeats,
            )
        stages = {
            "network, one view": network,
            "score (+ attributions)": _median_seconds(
                lambda b=batch: model.score([image.rgb] * b, [demo] * b), args.repeats
            ),
            "full report (+ lesion, saliency, SR, Bundle)": _median_seconds(
                lambda b=batch: pipeline.run([image] * b, [demo] * b), args.repeats
            ),
            "full report + Secondary Capture": _median_seconds(
                lambda b=batch: with_capture.run([image] * b, [demo] * b), args.repeats
            ),
        }
        for name, seconds in stages.items():
            print(
                f"batch {batch}: {name:<45} {1000 * seconds / batch:7.1f} ms/image  "
                f"ratio to one view {seconds / network:5.2f}"
            )
    print(f"budget: 250 ms/image; numpy {np.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
