"""Where the time of one report goes: scoring alone and the full report per image, at batch 1
and at the best batch size among 1, 2, 4, 8, with each stage's share.

Stages, each timed on its own over the same images: decode (``read_image``), demographics from
the tags, network (``FusionModel.score`` without the attribution heads: preprocessing, the
test-time views, one head), attributions (``score`` minus that: the head again per withheld
field), lesion (``lesion_size``), Grad-CAM with a fresh pass of the backbone
(``FusionModel.saliency``) and from the scoring pass's feature map (``FusionModel.explain``, what
the service does), SR (``MeasurementReportWriter.build``), Bundle (``report_bundle``), writes of
the SR and Bundle (``ImageReport.write_reports``, fsync'd) and of the overlay PNG
(``DrawnOverlay.write``). "reports ready" is decode + ``ReportPipeline.report`` + the report
writes: what the SR and the Bundle wait for in the service (the overlay follows them). "full
report" is decode + ``ReportPipeline.run`` + all writes, as ``dermfusion infer`` does. Every
number is also given as a ratio to scoring alone at batch 1 measured in the same run (the
machine is noisy: compare ratios across runs).
``benchmarks/inference_latency.py`` gives the per-view cost of the network; this script reuses
its timing helper.

Images: the sample DICOMs in tests/data and DICOMs made from tests/data/ISIC_*.jpg.

    .venv/bin/python benchmarks/pipeline_stages.py [--repeats N] [--out FILE]

Prints a Markdown table and writes var/benchmarks/pipeline_stages.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.inference_latency import _median_seconds  # noqa: E402
from dicom_io.demographics import demographics_from_dataset  # noqa: E402
from dicom_io.images import DermoscopyImage, read_image  # noqa: E402
from dicom_io.sr import MeasurementReportWriter  # noqa: E402
from fhir_io import report_bundle  # noqa: E402
from monai_bundle.scripts.transforms import preprocess_rgb  # noqa: E402
from plugin.domain import Demographics  # noqa: E402
from plugin.model import ONNXRUNTIME, TORCH, FusionModel, _encode, use_threads  # noqa: E402
from plugin.pipeline import ImageReport, ReportPipeline, lesion_size  # noqa: E402
from tests.integration.studies import dermoscopy_study  # noqa: E402

BATCHES = (1, 2, 4, 8)
SYSTEM = "urn:benchmark"


def sample_files(folder: Path) -> list[Path]:
    """The shipped sample DICOMs plus one DICOM per ISIC JPEG."""
    _, made = dermoscopy_study(folder, patient_id="bench", images=4)
    return sorted((REPO / "tests" / "data").glob("*.dcm")) + made


def network_only(model: FusionModel, images: list[np.ndarray], demo: list[Demographics]) -> None:
    """``FusionModel.score`` up to the probabilities, without the per-field attribution heads."""
    with torch.inference_mode():
        batch = torch.stack([preprocess_rgb(rgb) for rgb in images])
        if model.image_branch is None:
            features = model.network.scoring_features(
                batch.contiguous(memory_format=torch.channels_last)
            )
        else:  # the runtime the model scores with
            features, _ = model.image_branch(batch)
        model._head(features, torch.from_numpy(np.stack([_encode(d) for d in demo])))


def stage_times(
    model: FusionModel, files: list[Path], batch: int, repeats: int, out: Path
) -> dict[str, float]:
    """Median seconds per image of each stage over a batch of ``batch`` images."""
    chosen = list(itertools.islice(itertools.cycle(files), batch))
    images: list[DermoscopyImage] = [read_image(f) for f in chosen]
    demo = [demographics_from_dataset(i.dataset) for i in images]
    rgbs = [i.rgb for i in images]
    pipeline = ReportPipeline(model, SYSTEM)
    writer = MeasurementReportWriter()
    reports = pipeline.run(images, demo)
    drawn = [r.drawn for r in reports if r.drawn is not None]
    findings = [r.finding for r in reports]
    issued = datetime.now(UTC)

    def each(fn: Callable[[int], object]) -> Callable[[], None]:
        def run() -> None:
            for i in range(batch):
                fn(i)

        return run

    def full() -> None:
        decoded = [read_image(f) for f in chosen]
        for report in pipeline.run(
            decoded, [demographics_from_dataset(i.dataset) for i in decoded]
        ):
            report.write_files(out)

    def reports_ready() -> None:
        decoded = [read_image(f) for f in chosen]
        for report in pipeline.report(
            decoded, [demographics_from_dataset(i.dataset) for i in decoded]
        ):
            report.write_reports(out)

    stages: dict[str, Callable[[], object]] = {
        "decode": each(lambda i: read_image(chosen[i])),
        "demographics": each(lambda i: demographics_from_dataset(images[i].dataset)),
        "network": lambda: network_only(model, rgbs, demo),
        "score (network + attributions)": lambda: model.score(rgbs, demo),
        "lesion": each(lambda i: replace(findings[i], lesion=lesion_size(images[i]))),
        "Grad-CAM, fresh pass": each(lambda i: model.saliency(rgbs[i], demo[i])),
        "Grad-CAM from the scoring pass": each(
            lambda i: model.explain(rgbs[i], reports[i].explanation)
        ),
        "SR": each(
            lambda i: writer.build(
                source=images[i].dataset,
                ref=images[i].ref,
                finding=findings[i],
                demographics=demo[i],
            )
        ),
        "Bundle": each(
            lambda i: report_bundle(
                finding=findings[i],
                demographics=demo[i],
                image=images[i].ref,
                patient_id=str(images[i].dataset.get("PatientID", "") or "") or None,
                patient_identifier_system=SYSTEM,
                issued=issued,
            )
        ),
        "writes: SR + Bundle": each(lambda i: ImageReport.write_reports(reports[i], out)),
        "writes: overlay PNG": each(lambda i: drawn[i].write(out)),
        "reports ready (decode + report + writes)": reports_ready,
        "full report (decode + run + writes)": full,
    }
    times = {name: _median_seconds(fn, repeats) / batch for name, fn in stages.items()}
    times["attributions"] = times["score (network + attributions)"] - times["network"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads; 0: as the service chooses ([model] threads = 0: half the cores)",
    )
    parser.add_argument(
        "--runtime",
        choices=(TORCH, ONNXRUNTIME),
        default=ONNXRUNTIME,
        help="the image branch's runtime (the service's default: onnxruntime)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "var" / "benchmarks" / "pipeline_stages.json"
    )
    args = parser.parse_args()
    use_threads(args.threads)
    model = FusionModel.load(REPO / "monai_bundle", runtime=args.runtime)
    torch_model = model if args.runtime == TORCH else FusionModel.load(REPO / "monai_bundle")
    with tempfile.TemporaryDirectory() as tmp:
        files = sample_files(Path(tmp) / "dicom")
        scoring: dict[int, float] = {}
        for batch in BATCHES:  # scoring alone per image at each batch size
            chosen = [read_image(f) for f in itertools.islice(itertools.cycle(files), batch)]
            demo = [demographics_from_dataset(i.dataset) for i in chosen]
            rgbs = [i.rgb for i in chosen]
            scoring[batch] = (
                _median_seconds(lambda r=rgbs, d=demo: model.score(r, d), args.repeats) / batch
            )
        best = min(scoring, key=lambda b: scoring[b])
        one = [read_image(files[0])]
        one_demo = [demographics_from_dataset(one[0].dataset)]
        torch_scoring = _median_seconds(
            lambda: torch_model.score([one[0].rgb], one_demo), args.repeats
        )
        results = {
            b: stage_times(model, files, b, args.repeats, Path(tmp) / "out")
            for b in sorted({1, best})
        }
    baseline = scoring[1]
    print(
        f"{len(files)} images, torch threads {torch.get_num_threads()}, runtime {args.runtime}, "
        f"best batch {best}; scoring alone in torch: {1000 * torch_scoring:.1f} ms/image "
        f"({torch_scoring / baseline:.2f}x this runtime's)"
    )
    print("| batch | scoring alone ms/image | ratio to batch 1 |\n| --- | --- | --- |")
    for batch, seconds in scoring.items():
        print(f"| {batch} | {1000 * seconds:.1f} | {seconds / baseline:.2f} |")
    for batch, times in results.items():
        full = times["full report (decode + run + writes)"]
        print(f"\nbatch {batch}\n\n| stage | ms/image | share of full | ratio to scoring alone |")
        print("| --- | --- | --- | --- |")
        for name, seconds in times.items():
            share = 100 * seconds / full
            print(f"| {name} | {1000 * seconds:.1f} | {share:.0f}% | {seconds / baseline:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "images": len(files),
                "torch_threads": torch.get_num_threads(),
                "runtime": args.runtime,
                "scoring_alone_torch_s_per_image_batch_1": torch_scoring,
                "scoring_alone_s_per_image": scoring,
                "best_batch": best,
                "stages_s_per_image": results,
                "baseline": "scoring alone per image at batch 1",
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
