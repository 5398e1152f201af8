"""The ``dermfusion`` command: serve, infer, predict, train."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from plugin.config import REPO_ROOT, ConfigError, load_settings

log = logging.getLogger("dermfusion")


def _parser() -> argparse.ArgumentParser:
    # --config and -v are accepted before or after the subcommand (`dermfusion serve --config F`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", default=argparse.SUPPRESS, help="TOML file merged over configs/dermfusion.toml"
    )
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(prog="dermfusion", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser(
        "serve",
        parents=[common],
        help="DICOM listener: score routed studies, report to PACS and EHR",
    )

    predict = sub.add_parser(
        "predict", parents=[common], help="score plain images with optional metadata CSV"
    )
    predict.add_argument("--images", required=True, type=Path, help="folder of .jpg/.png images")
    predict.add_argument("--metadata", type=Path, help="ISIC 2020 or HAM10000 style CSV")
    predict.add_argument("--out", required=True, type=Path, help="output CSV")

    infer = sub.add_parser(
        "infer", parents=[common], help="score DICOM files; write SR (.dcm) and FHIR Bundle (.json)"
    )
    infer.add_argument("files", nargs="+", type=Path)
    infer.add_argument("--out", required=True, type=Path, help="output folder")

    train = sub.add_parser(
        "train",
        parents=[common],
        help="train the whole network (configs/train.json) on ../shared/data; about 9 minutes an "
        "epoch on 2 CPU cores, a checkpoint after each (a rerun resumes from the last)",
    )
    train.add_argument("--data-root", type=Path, help="default: ../shared/data")
    train.add_argument("--output-dir", type=Path, help="default: the bundle's models/")
    train.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    train.add_argument("--max-images", type=int, help="smoke run on a small stratified subset")
    train.add_argument("--max-steps", type=int, help="smoke run: stop after this many steps")
    train.add_argument("--epochs", type=int)
    train.add_argument("--seed", type=int)

    evaluate = sub.add_parser(
        "evaluate", parents=[common], help="report folder for the shipped weights (evaluate.json)"
    )
    evaluate.add_argument("--data-root", type=Path, help="default: ../shared/data")
    evaluate.add_argument("--out", type=Path, help="default: the bundle's docs/evaluation/")
    return parser


def _bundle_dir(args: argparse.Namespace) -> Path:
    return load_settings(args.config).model.bundle_dir


def cmd_serve(args: argparse.Namespace) -> int:
    from plugin.service import DermfusionService

    DermfusionService(load_settings(args.config)).run_forever()
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from monai.bundle import run

    bundle = _bundle_dir(args)
    run(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        bundle_root=str(bundle),
        dataset_dir=str(args.images),
        metadata_csv=str(args.metadata) if args.metadata else "",
        output_file=str(args.out),
    )
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from dicom_io.demographics import demographics_from_dataset
    from dicom_io.images import UnsupportedInstanceError, read_image
    from plugin.model import FusionModel
    from plugin.pipeline import ReportPipeline, capture_writer

    settings = load_settings(args.config)
    images = []
    failed = 0
    for path in args.files:
        try:
            images.append(read_image(path))
        except UnsupportedInstanceError as error:
            print(f"dermfusion infer: {error}", file=sys.stderr)
            failed += 1
        except OSError as error:
            print(f"dermfusion infer: {path}: {error.strerror or error}", file=sys.stderr)
            failed += 1
    if images:
        pipeline = ReportPipeline(
            model=FusionModel.load(settings.model.bundle_dir),
            patient_identifier_system=settings.patient_identifier_system,
            capture_writer=capture_writer(settings),
        )
        reports = pipeline.run(images, [demographics_from_dataset(i.dataset) for i in images])
        for report in reports:
            files = report.write_files(args.out)
            print(
                f"{report.image.ref.sop_instance_uid}\t{report.finding.probability:.4f}\t"
                f"{'melanoma suspected' if report.finding.melanoma_suspected else 'negative'}\t"
                f"{files.sr}"
            )
    return 1 if failed else 0


def _run_bundle_config(
    args: argparse.Namespace, config: str, run_id: str = "run", **overrides: object
) -> int:
    """Run one of the bundle's configs with this installation's paths (data, cache, bundle)."""
    from monai.bundle import run

    settings = load_settings(args.config)
    bundle = settings.model.bundle_dir
    run(
        run_id=run_id,
        config_file=str(bundle / "configs" / config),
        meta_file=str(bundle / "configs" / "metadata.json"),
        bundle_root=str(bundle),
        data_root=str(args.data_root or REPO_ROOT.parent / "shared" / "data"),
        cache_dir=str(settings.storage.dir / "cache"),
        **overrides,
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {"device": args.device}
    if args.output_dir:
        overrides["output_dir"] = str(args.output_dir)
    if args.max_images:
        overrides["max_images"] = args.max_images
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    if args.epochs:
        overrides["recipe#epochs"] = args.epochs
    if args.seed is not None:
        overrides["recipe#seed"] = args.seed
    return _run_bundle_config(args, "train.json", **overrides)


def cmd_evaluate(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {}
    if args.out:
        overrides["output_dir"] = str(args.out)
    return _run_bundle_config(args, "evaluate.json", **overrides)


COMMANDS = {
    "serve": cmd_serve,
    "predict": cmd_predict,
    "infer": cmd_infer,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.config = getattr(args, "config", None)
    args.verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # one line per event: these libraries log every module copied / PDU exchanged at INFO
        for chatty in ("highdicom", "pynetdicom"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as error:
        print(f"dermfusion: configuration: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
