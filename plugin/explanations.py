"""Grad-CAM overlays owed like deliveries, so the SR and the Bundle never wait for them.

Scoring writes the SR and the Bundle and owes, beside them, an explanation: a small request file
``<SR UID>_explanation.json`` naming the spooled source image and the metadata it was scored
with. The delivery worker "delivers" it by drawing the overlay (PNG in the outbox folder) and,
when configured, building the Secondary Capture the SR already names and owing it to the PACS.
Like any delivery it is retried, parked with a reason after repeated failures, counted in the
backlog and in ``/healthz``; after a restart it is drawn again from the spooled image.

The scoring worker keeps each image's feature map in memory (``ScoredImages``) so the overlay
normally costs only the head's gradient, not a second run of the backbone; the request file is
what makes it independent of that memory.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicom_io.images import read_image
from dicom_io.spool import write_bytes_durably
from plugin.failures import LoggableError
from plugin.model import Explanation
from plugin.outbox import EXPLANATION, PACS
from plugin.pipeline import ImageReport, Overlay, ReportPipeline
from plugin.retention import EXPLANATION_REQUEST
from plugin.state import OutboxItem, StateStore

log = logging.getLogger(__name__)


class ModelChangedError(LoggableError):
    """The loaded model is not the one that scored the image: its overlay would explain
    another model's score (and the SR names a capture derived from the scoring model)."""


@dataclass
class ScoredImages:
    """The overlays of recently scored images, by SR UID, until they are drawn.

    Bounded: under a burst the scoring worker can run ahead of the drawing; what no longer fits
    is dropped and drawn from the spooled image instead (slower, the same map).
    """

    capacity: int = 64
    _overlays: OrderedDict[str, Overlay] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def keep(self, overlay: Overlay) -> None:
        with self._lock:
            self._overlays[overlay.sr_sop_instance_uid] = overlay
            while len(self._overlays) > self.capacity:
                self._overlays.popitem(last=False)

    def take(self, sr_uid: str) -> Overlay | None:
        with self._lock:
            return self._overlays.pop(sr_uid, None)


def owe_explanation(
    report: ImageReport, source: Path, outbox_dir: Path, study_instance_uid: str
) -> OutboxItem:
    """Write the request for ``report``'s overlay and return the outbox item that owes it."""
    uid = str(report.sr.SOPInstanceUID)
    request = {
        "sr_sop_instance_uid": uid,
        "source": str(source),
        "metadata": [float(v) for v in report.explanation.metadata],
        "model": {"name": report.finding.model.name, "version": report.finding.model.version},
    }
    path = outbox_dir / f"{uid}{EXPLANATION_REQUEST}"
    write_bytes_durably((json.dumps(request) + "\n").encode(), path)
    return OutboxItem(f"explain:{uid}", EXPLANATION, path, 0, study_instance_uid=study_instance_uid)


@dataclass
class ExplanationDestination:
    """Draws owed overlays: from memory when the scoring worker kept the feature map, else
    from the spooled image and the request's metadata."""

    pipeline: ReportPipeline
    store: StateStore
    outbox_dir: Path
    scored: ScoredImages
    send_capture: bool  # the PACS is a destination: owe it the Secondary Capture
    clock: Callable[[], float] = time.time

    def deliver(self, item: OutboxItem) -> None:
        request = json.loads(item.path.read_text())
        overlay = self.scored.take(str(request["sr_sop_instance_uid"])) or self._from_spool(request)
        drawn = self.pipeline.explain(overlay)
        files = drawn.write(self.outbox_dir)
        if self.send_capture and drawn.capture is not None and files.capture is not None:
            key = f"sc:{drawn.capture.SOPInstanceUID}"
            capture = OutboxItem(
                key, PACS, files.capture, 0, study_instance_uid=item.study_instance_uid
            )
            # owed before the explanation counts as delivered: a crash in between draws the
            # overlay again and owes the same key again, a no-op
            self.store.complete(reported=[], failed=[], outbox=[capture], now=self.clock())

    def _from_spool(self, request: dict[str, Any]) -> Overlay:
        """After a restart (or a burst that outran the memory): the image from the spool, the
        metadata from the request; the feature map is computed again."""
        model = self.pipeline.model.identity
        scored_by = request["model"]
        if (scored_by["name"], scored_by["version"]) != (model.name, model.version):
            raise ModelChangedError(
                f"scored by {scored_by['name']} {scored_by['version']}, loaded model is "
                f"{model.name} {model.version}: resend the study to score it again"
            )
        return Overlay(
            image=read_image(Path(request["source"])),
            explanation=Explanation(None, np.asarray(request["metadata"], dtype=np.float32)),
            model=model,
            sr_sop_instance_uid=str(request["sr_sop_instance_uid"]),
        )
