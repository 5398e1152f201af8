"""The ``dermfusion`` command: serve, infer, predict, train; status, resend, requeue."""

# Start-up: this module imports the standard library only. What a command needs (the config,
# the state database, the model, DICOM and FHIR libraries) is imported inside that command,
# so `--help`, `status` and the other operator commands do not load torch, MONAI, highdicom,
# fhir.resources or pynetdicom (tests/unit/test_startup_imports.py; benchmarks/startup.py).

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sqlite3
import sys
import time
from collections.abc import Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plugin.config import Settings
    from plugin.state import SqliteStateStore, StateStore

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
    train.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=JSON",
        help="a candidate recipe field (e.g. image_size=288); use with another --output-dir",
    )

    evaluate = sub.add_parser(
        "evaluate", parents=[common], help="report folder for the shipped weights (evaluate.json)"
    )
    evaluate.add_argument("--data-root", type=Path, help="default: ../shared/data")
    evaluate.add_argument("--out", type=Path, help="default: the bundle's docs/evaluation/")

    sub.add_parser(
        "status",
        parents=[common],
        help="outbox backlog, parked studies and deliveries, recent failures (read-only); exit "
        "0 when nothing is parked or stuck, 1 when something is, 2 when the state is unreadable",
    )
    resend = sub.add_parser(
        "resend",
        parents=[common],
        help="owe a study's reports (SR, saliency capture, FHIR Bundle) again, delivered or "
        "parked; a parked study with unscored images is scored again",
    )
    resend.add_argument("study_uid", metavar="STUDY_UID", help="StudyInstanceUID")
    sub.add_parser(
        "doctor",
        parents=[common],
        help="check config, storage, model, PACS (C-ECHO), FHIR server and listener port, one "
        "line each; exit 0 only when all are green",
    )
    requeue = sub.add_parser(
        "requeue",
        parents=[common],
        help="give what was parked another set of attempts",
    )
    requeue.add_argument(
        "--parked",
        action="store_true",
        required=True,
        help="every parked study and delivery (required: the command does no more than it says)",
    )
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from plugin.config import load_settings
    from plugin.service import DermfusionService

    DermfusionService(load_settings(args.config)).run_forever()
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from monai.bundle import run

    from plugin.config import load_settings
    from plugin.model import use_threads

    settings = load_settings(args.config)
    use_threads(settings.model.threads)
    bundle = settings.model.bundle_dir
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
    from plugin.config import load_settings
    from plugin.model import use_threads
    from plugin.pipeline import report_pipeline

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
        use_threads(settings.model.threads)
        pipeline = report_pipeline(settings)
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

    from plugin.config import REPO_ROOT, load_settings

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
    if args.set:
        from dataclasses import fields

        from training.whole_network import Recipe

        known = {f.name for f in fields(Recipe)}
        for item in args.set:
            field, sep, value = item.partition("=")
            if not sep or field not in known:
                print(
                    f"--set {item}: expected FIELD=JSON with FIELD one of the recipe's "
                    f"({', '.join(sorted(known))})",
                    file=sys.stderr,
                )
                return 2
            try:
                overrides[f"recipe#{field}"] = json.loads(value)
            except json.JSONDecodeError as error:
                print(f"--set {item}: the value is not JSON ({error})", file=sys.stderr)
                return 2
    return _run_bundle_config(args, "train.json", **overrides)


def cmd_evaluate(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {}
    if args.out:
        overrides["output_dir"] = str(args.out)
    return _run_bundle_config(args, "evaluate.json", **overrides)


# How many of the most recent failed instances `dermfusion status` lists.
STATUS_FAILED_INSTANCES = 10
# The outbox's destination names, as the state database records them (plugin.outbox.PACS and
# FHIR; not imported from there: plugin.outbox loads the DICOM sender and the FHIR client, which
# a read-only status does not need; tests/unit/test_startup_imports.py checks they agree).
_PACS = "pacs"
_FHIR = "fhir"


def _state_errors() -> tuple[type[Exception], ...]:
    """What makes an operator command exit 2 with one line: no state database, a schema this
    release does not read, or SQLite failing (not a database, locked for longer than the busy
    timeout)."""
    from plugin.state import StateDatabaseError

    return (StateDatabaseError, sqlite3.Error)


def _open_state(settings: Settings, *, read_only: bool) -> SqliteStateStore:
    """The running service's state database, opened for one short operator command."""
    from plugin.state import SqliteStateStore

    return SqliteStateStore.open_existing(settings.storage.state_database, read_only=read_only)


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status_lines(settings: Settings, store: StateStore, now: float) -> tuple[list[str], int]:
    """One line per fact, then a summary; and the exit status (1: something needs a person).

    Only UIDs, outbox keys, times and recorded reasons are printed: the state database holds
    no patient names, IDs or birth dates, and the reasons were written to be logged.
    """
    stuck_after = settings.outbox.stuck_after_seconds
    backlog = {b.destination: b for b in store.outbox_backlog()}
    configured = [
        name for name, section in ((_PACS, settings.pacs), (_FHIR, settings.fhir)) if section
    ]
    lines: list[str] = []
    stuck: list[str] = []
    for destination in dict.fromkeys([*configured, *backlog]):
        owed = backlog.get(destination)
        if owed is None or owed.oldest_enqueued_at is None:
            lines.append(f"outbox {destination}: nothing owed")
            continue
        age = max(0.0, now - owed.oldest_enqueued_at)
        line = f"outbox {destination}: {owed.owed} owed, the oldest for {age:.0f} s"
        if age > stuck_after:
            stuck.append(destination)
            line += f" (stuck: owed longer than {stuck_after:.0f} s)"
        lines.append(line)
    if not configured and not backlog:
        lines.append(
            f"outbox: no PACS or FHIR server configured (reports stay in {settings.storage.outbox})"
        )
    parked = store.parked()
    for item in parked:
        since = f"since {_utc(item.parked_at)} after {item.attempts} attempt(s)"
        if item.kind == "study":
            lines.append(f"parked study {item.key}: {since}: {item.reason}")
        else:
            study = item.study_instance_uid or "not recorded"
            lines.append(
                f"parked delivery {item.key} to {item.destination} (study {study}): "
                f"{since}: {item.reason}"
            )
    from plugin.retention import MIB, FreeSpaceWatermark

    watermark = FreeSpaceWatermark(settings.storage.dir, settings.storage.min_free_mb * MIB)
    shortfall = watermark.shortfall()
    if shortfall is None:
        free = shutil.disk_usage(settings.storage.dir).free // MIB
        lines.append(
            f"storage: {free} MiB free (refusing new studies below {settings.storage.min_free_mb})"
        )
    else:
        lines.append(f"storage: refusing new studies: {shortfall}")
    failed = store.failed_instances(STATUS_FAILED_INSTANCES + 1)
    for instance in failed[:STATUS_FAILED_INSTANCES]:
        lines.append(
            f"failed instance {instance.sop_instance_uid} (study {instance.study_instance_uid}, "
            f"received {_utc(instance.received_at)}): {instance.reason}"
        )
    if len(failed) > STATUS_FAILED_INSTANCES:
        lines.append(f"failed instances: older than these {STATUS_FAILED_INSTANCES} not shown")
    studies = sum(p.kind == "study" for p in parked)
    problems = [
        f"parked deliveries {len(parked) - studies}" if len(parked) > studies else "",
        f"parked studies {studies}" if studies else "",
        f"stuck outbox {' '.join(stuck)}" if stuck else "",
        "low disk space" if shortfall else "",
    ]
    if any(problems):
        lines.append(f"status: needs attention: {', '.join(filter(None, problems))}")
        return lines, 1
    lines.append("status: ok")
    return lines, 0


def cmd_status(args: argparse.Namespace) -> int:
    from plugin.config import load_settings

    settings = load_settings(args.config)
    try:
        with closing(_open_state(settings, read_only=True)) as store:
            lines, status = _status_lines(settings, store, time.time())
    except _state_errors() as error:
        print(f"dermfusion status: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return status


def cmd_resend(args: argparse.Namespace) -> int:
    from plugin.config import load_settings
    from plugin.domain import is_uid

    study = args.study_uid
    if not is_uid(study):
        print(
            "dermfusion resend: STUDY_UID must be a DICOM UID (digits and dots, at most 64)",
            file=sys.stderr,
        )
        return 2
    settings = load_settings(args.config)
    now = time.time()
    try:
        with closing(_open_state(settings, read_only=False)) as store:
            if not store.knows_study(study):
                print(f"dermfusion resend: no study {study} in the state database", file=sys.stderr)
                return 1
            deliveries = store.requeue_study_deliveries(study, now)
            unscored = len(store.pending_instances(study))
            rescored = unscored > 0 and store.requeue_parked_studies([study]) > 0
    except _state_errors() as error:
        print(f"dermfusion resend: {error}", file=sys.stderr)
        return 2
    if not deliveries and not rescored:
        print(
            f"dermfusion resend: study {study} has nothing to re-send: no deliveries recorded "
            "for it (none was owed when it was scored, or it was scored before state schema 2) "
            "and no parked images to score again",
            file=sys.stderr,
        )
        return 1
    done = []
    if deliveries:
        per = ", ".join(f"{destination} {n}" for destination, n in deliveries.items())
        done.append(f"{sum(deliveries.values())} deliveries re-queued ({per})")
    if rescored:
        done.append(f"parked study re-queued for scoring ({unscored} unscored instance(s))")
    print(f"resend {study}: {'; '.join(done)}")
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    from plugin.config import load_settings

    settings = load_settings(args.config)
    try:
        with closing(_open_state(settings, read_only=False)) as store:
            deliveries = store.requeue_parked_deliveries(time.time())
            studies = store.requeue_parked_studies()
    except _state_errors() as error:
        print(f"dermfusion requeue: {error}", file=sys.stderr)
        return 2
    print(f"requeue: {deliveries} parked deliveries and {studies} parked studies re-queued")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from plugin.doctor import examine

    return examine(args.config)


COMMANDS = {
    "serve": cmd_serve,
    "predict": cmd_predict,
    "infer": cmd_infer,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "status": cmd_status,
    "resend": cmd_resend,
    "requeue": cmd_requeue,
    "doctor": cmd_doctor,
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
    from dicom_io.redaction import keep_values_out_of_logs
    from plugin.config import ConfigError

    keep_values_out_of_logs()
    try:
        return COMMANDS[args.command](args)
    except ConfigError as error:
        print(f"dermfusion: configuration: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
