"""Disk space and retention: the service stops taking work before the disk is full, and deletes
what it no longer owes after ``retention.keep_days``.

A full disk in the middle of a study would leave an instance acknowledged but no room for its
report. So below ``storage.min_free_mb`` new associations are refused (A-ASSOCIATE-RJ, transient:
the PACS tries again later) and a C-STORE on an open one is answered 0xA700; what was already
accepted is still scored and delivered in the space held back.

Retention deletes a study's spool files and its report files only once the study is over:
every instance scored or failed, nothing parked, every delivery delivered. What is owed is never
deleted, however old. Reports of a service with no destination (embedded defaults: the outbox
folder is where results are read) are never deleted either: they are the only copy.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from plugin.state import ExpiredStudy, StateStore

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Studies forgotten per database transaction batch: keeps each pass's lock short.
RETENTION_BATCH = 100
# Files written beside each report: ``<SR UID>`` + these (plugin.pipeline, plugin.explanations).
EXPLANATION_REQUEST = "_explanation.json"  # the overlay request plugin.explanations writes
REPORT_SUFFIXES = (".dcm", ".json", "_saliency.png", "_saliency.dcm", EXPLANATION_REQUEST)


class LowDiskSpaceError(OSError):
    """Free space is below the watermark: the instance is refused (0xA700), not half-taken."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.ENOSPC, reason)


@dataclass(frozen=True)
class FreeSpaceWatermark:
    """Free space on the volume holding ``folder`` that new work may not eat into."""

    folder: Path
    min_free_bytes: int

    def shortfall(self) -> str | None:
        """Why no new instance may be taken now (one line), or None while there is room."""
        if self.min_free_bytes <= 0:
            return None
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError as error:
            return f"the storage volume cannot be read: {error.strerror}"
        if free >= self.min_free_bytes:
            return None
        return (
            f"{free // MIB} MiB free on the storage volume, below storage.min_free_mb "
            f"({self.min_free_bytes // MIB})"
        )

    def check(self) -> None:
        """Raise ``LowDiskSpaceError`` when below the watermark."""
        reason = self.shortfall()
        if reason is not None:
            raise LowDiskSpaceError(reason)


@dataclass
class Retention:
    """Deletes studies that are over and older than ``keep_seconds`` (files first, then rows,
    so a crash in between leaves rows whose files are gone, which the next pass removes)."""

    store: StateStore
    keep_seconds: float
    spool_dir: Path
    outbox_dir: Path

    def purge(self, now: float) -> int:
        """One pass: returns how many studies were removed."""
        cutoff = now - self.keep_seconds
        removed = files = 0
        while batch := self.store.expired_studies(cutoff, RETENTION_BATCH):
            for study in batch:
                files += self._delete_files(study)
                self.store.forget_study(study.study_instance_uid)
            removed += len(batch)
        if removed:
            log.info(
                "retention: removed %d studies over and older than %.0f days (%d files)",
                removed,
                self.keep_seconds / 86400,
                files,
            )
        return removed

    def _delete_files(self, study: ExpiredStudy) -> int:
        deleted = 0
        folders = set()
        for path in study.spool_files:
            deleted += _unlink_inside(path, self.spool_dir)
            folders.add(path.parent)
        for path in study.report_files:
            if path.name.endswith(EXPLANATION_REQUEST):
                # the overlay's request alone: with no destination the reports beside it are
                # the only copy (a delivered SR's row deletes them all)
                deleted += _unlink_inside(path, self.outbox_dir)
                continue
            uid = _report_uid(path.name)
            for suffix in REPORT_SUFFIXES if uid else ():
                deleted += _unlink_inside(path.with_name(uid + suffix), self.outbox_dir)
        for folder in folders:
            if folder.parent == self.spool_dir:
                with contextlib.suppress(OSError):  # not empty: something else lives there
                    folder.rmdir()
        return deleted


def _report_uid(name: str) -> str:
    """The SR UID a report file is named after (UIDs hold dots: strip a known suffix)."""
    for suffix in sorted(REPORT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return ""


def _unlink_inside(path: Path, root: Path) -> int:
    """Delete ``path`` if it lies inside ``root`` (a row never sends us elsewhere)."""
    if not path.resolve().is_relative_to(root.resolve()):
        log.warning("retention: left %s alone: outside %s", path.name, root)
        return 0
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return 1
