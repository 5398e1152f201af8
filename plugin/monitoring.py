"""Health, metrics and a status page over HTTP, for the people who keep the service running.

``[http]`` turns it on (loopback by default). ``/healthz`` answers 200 while every worker thread
runs and no destination's oldest owed report is older than ``outbox.stuck_after_seconds``,
otherwise 503 with the reasons; a load balancer or systemd watchdog needs nothing else.
``/metrics`` is Prometheus text: counters kept by this process (they start again at zero after
a restart, as Prometheus expects) and gauges read from the state database at each scrape, so
they survive restarts. ``/`` lists the most recent studies by UID with each image's result, its
delivery to each destination and its Grad-CAM overlay. Nothing here shows a patient name, ID or
birth date: the state database holds none.
"""

from __future__ import annotations

import html
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from plugin.config import ConfigError
from plugin.domain import is_uid
from plugin.outbox import EXPLANATION
from plugin.state import DeliveryState, OutboxBacklog, ScoredResult, StateStore

log = logging.getLogger(__name__)

# Seconds from "study ready" to "reports written": one image takes ~0.15 s on 2 CPU cores.
SCORING_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServiceMetrics:
    """The service's Prometheus registry: its own, so tests and two services never share one."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.instances_received = Counter(
            "dermfusion_instances_received",
            "Instances stored durably and acknowledged with success",
            registry=self.registry,
        )
        self.refusals = Counter(
            "dermfusion_refusals",
            "Associations and C-STOREs refused, by what was refused and the status or reason",
            ["kind", "status"],
            registry=self.registry,
        )
        self.studies_scored = Counter(
            "dermfusion_studies_scored",
            "Scoring rounds completed (a study whose images arrive in two rounds counts twice)",
            registry=self.registry,
        )
        self.images_scored = Counter(
            "dermfusion_images_scored", "Images scored and reported", registry=self.registry
        )
        self.instances_failed = Counter(
            "dermfusion_instances_failed",
            "Instances that could not be scored (marked failed with a reason)",
            registry=self.registry,
        )
        self.study_failures = Counter(
            "dermfusion_study_failures",
            "Failed scoring passes of a study (retried with backoff, parked at the limit)",
            registry=self.registry,
        )
        self.scoring_seconds = Histogram(
            "dermfusion_scoring_seconds",
            "Seconds to score one ready study and write its reports",
            buckets=SCORING_BUCKETS,
            registry=self.registry,
        )

    def watch(self, collector: Collector) -> None:
        self.registry.register(collector)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def stuck_destinations(
    backlog: Sequence[OutboxBacklog], now: float, stuck_after_seconds: float
) -> list[str]:
    """Destinations whose oldest owed report has waited longer than a retry should take."""
    return [
        b.destination
        for b in backlog
        if b.oldest_enqueued_at is not None and now - b.oldest_enqueued_at > stuck_after_seconds
    ]


@dataclass
class ServiceHealth:
    """What /healthz and the status page judge: the worker threads and the outbox."""

    store: StateStore
    workers_alive: Callable[[], bool]
    stuck_after_seconds: float
    clock: Callable[[], float] = time.time

    def problems(self) -> list[str]:
        out = [] if self.workers_alive() else ["a worker thread is not running"]
        stuck = stuck_destinations(
            self.store.outbox_backlog(), self.clock(), self.stuck_after_seconds
        )
        out += [
            f"outbox {d} stuck: a report owed longer than {self.stuck_after_seconds:.0f} s"
            for d in stuck
        ]
        return out


@dataclass(eq=False)  # hashable by identity: the registry keys its collectors
class StateGauges:
    """Gauges read from the state database at scrape time (a Prometheus custom collector)."""

    store: StateStore
    health: ServiceHealth

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self.health.clock()
        healthy = GaugeMetricFamily(
            "dermfusion_healthy", "1 when /healthz answers 200 (workers running, outbox moving)"
        )
        healthy.add_metric([], 0.0 if self.health.problems() else 1.0)
        yield healthy
        waiting = GaugeMetricFamily(
            "dermfusion_studies_waiting", "Studies with instances received and not yet scored"
        )
        waiting.add_metric([], float(self.store.studies_waiting()))
        yield waiting
        owed = GaugeMetricFamily(
            "dermfusion_outbox_owed",
            "Reports owed and still tried, per destination",
            labels=["destination"],
        )
        oldest = GaugeMetricFamily(
            "dermfusion_outbox_oldest_owed_seconds",
            "Age of the oldest report owed, per destination (0 when nothing is owed)",
            labels=["destination"],
        )
        for backlog in self.store.outbox_backlog():
            owed.add_metric([backlog.destination], float(backlog.owed))
            age = 0.0 if backlog.oldest_enqueued_at is None else now - backlog.oldest_enqueued_at
            oldest.add_metric([backlog.destination], max(0.0, age))
        yield owed
        yield oldest
        parked = self.store.parked()
        parked_family = GaugeMetricFamily(
            "dermfusion_parked",
            "Studies and deliveries parked (not tried until re-queued)",
            labels=["kind"],
        )
        for kind in ("study", "outbox"):
            parked_family.add_metric([kind], float(sum(p.kind == kind for p in parked)))
        yield parked_family


class StatusServer:
    """The HTTP endpoint on its own daemon thread (stdlib server: nothing else to install)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        metrics: ServiceMetrics,
        health: ServiceHealth,
        store: StateStore,
        outbox_dir: Path,
        recent_studies: int,
    ) -> None:
        self.metrics, self.health, self.store = metrics, health, store
        self.outbox_dir, self.recent_studies = outbox_dir, recent_studies
        try:
            self._server = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as error:
            raise ConfigError(
                f"http: cannot listen on {host}:{port}: {error.strerror or error}"
            ) from None
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dermfusion-http", daemon=True
        )
        self._thread.start()
        log.info("http: /healthz, /metrics and the status page on port %d", self.port)

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever: only if it runs
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def healthz(self) -> tuple[int, bytes]:
        problems = self.health.problems()
        body = {"status": "unhealthy" if problems else "ok", "problems": problems}
        return (503 if problems else 200), json.dumps(body).encode()

    def saliency(self, sr_uid: str) -> bytes | None:
        """The overlay PNG of one report, only by SR UID and only from the outbox folder."""
        if not is_uid(sr_uid):
            return None
        path = self.outbox_dir / f"{sr_uid}_saliency.png"
        try:
            return path.read_bytes()
        except OSError:
            return None

    def page(self) -> bytes:
        results = self.store.recent_results(self.recent_studies)
        studies = list(dict.fromkeys(r.study_instance_uid for r in results))
        deliveries = self.store.deliveries(studies)
        return status_page(
            results, deliveries, self.health.problems(), self.health.clock()
        ).encode()


def _handler(server: StatusServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "dermfusion"

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            path = self.path.split("?", 1)[0]
            try:
                if path == "/healthz":
                    status, body = server.healthz()
                    self._send(status, "application/json", body)
                elif path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, server.metrics.exposition())
                elif path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", server.page())
                elif path.startswith("/saliency/") and path.endswith(".png"):
                    png = server.saliency(path.removeprefix("/saliency/").removesuffix(".png"))
                    if png is None:
                        self._send(404, "text/plain", b"no such overlay\n")
                    else:
                        self._send(200, "image/png", png)
                else:
                    self._send(404, "text/plain", b"not found\n")
            except Exception as error:  # noqa: BLE001 - a page error must not reach the service
                log.error("http: %s failed: %s", path, type(error).__name__)
                self._send(500, "text/plain", b"internal error\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
            """Scrapes every few seconds would flood the log: requests are not logged."""

    return Handler


def _utc(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _delivery_text(state: DeliveryState | None) -> tuple[str, str]:
    """(css class, text) of one report's delivery to one destination."""
    if state is None:
        return "none", "not sent (destination not configured)"
    if state.delivered_at is not None:
        return "delivered", f"delivered {_utc(state.delivered_at)}"
    if state.parked_at is not None:
        return "parked", f"parked after {state.attempts} attempt(s): {state.last_error or ''}"
    tried = f", {state.attempts} attempt(s): {state.last_error}" if state.attempts else ""
    return "owed", f"owed{tried}"


def status_page(
    results: Sequence[ScoredResult],
    deliveries: Sequence[DeliveryState],
    problems: Sequence[str],
    now: float,
) -> str:
    """The page: health, then one row per scored image of the recent studies."""
    by_key = {d.key: d for d in deliveries}
    destinations = sorted({d.destination for d in deliveries})
    rows = []
    for r in results:
        cells = [
            f'<td class="study">{html.escape(r.study_instance_uid)}</td>',
            f'<td class="image">{html.escape(r.sop_instance_uid)}</td>',
            f"<td>{_utc(r.scored_at)}</td>",
            f'<td class="probability">{r.probability:.3f}</td>',
            '<td class="decision">'
            + ("melanoma suspected" if r.suspected else "not suspected")
            + f" (threshold {r.threshold:.3f})</td>",
        ]
        for destination in destinations:
            keys = [
                k
                for k in (
                    f"sr:{r.sr_sop_instance_uid}",
                    f"fhir:{r.sr_sop_instance_uid}",
                    f"explain:{r.sr_sop_instance_uid}",  # the Grad-CAM overlay, drawn
                )
                if k in by_key and by_key[k].destination == destination
            ]
            css, text = _delivery_text(by_key[keys[0]] if keys else None)
            cells.append(
                f'<td class="delivery {css}" data-destination="{html.escape(destination)}">'
                f"{html.escape(text)}</td>"
            )
        uid = html.escape(r.sr_sop_instance_uid)
        cells.append(
            f'<td><img class="saliency" alt="Grad-CAM overlay of {html.escape(r.sop_instance_uid)}"'
            f' src="/saliency/{uid}.png" width="160"></td>'
        )
        rows.append(f'<tr data-sr="{uid}">' + "".join(cells) + "</tr>")
    health = (
        '<p id="health" class="ok">Healthy</p>'
        if not problems
        else '<p id="health" class="unhealthy">Unhealthy: '
        + html.escape("; ".join(problems))
        + "</p>"
    )
    headers = "".join(
        f"<th>{html.escape(h)}</th>"
        for h in (
            "Study Instance UID",
            "Image (SOP Instance UID)",
            "Scored",
            "Melanoma probability",
            "Decision",
            *("Grad-CAM overlay" if d == EXPLANATION else f"Delivery: {d}" for d in destinations),
            "Saliency (Grad-CAM)",
        )
    )
    empty = "" if rows else '<tr><td colspan="99" id="no-studies">No study scored yet.</td></tr>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dermfusion status</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
.ok {{ color: #060; }} .unhealthy, .parked {{ color: #a00; }} .owed {{ color: #a60; }}
</style></head>
<body><h1>dermfusion</h1>{health}
<p>Updated {_utc(now)}. Decision support, not a diagnosis. No patient names or IDs are shown.</p>
<table id="studies"><thead><tr>{headers}</tr></thead><tbody>{"".join(rows)}{empty}</tbody></table>
</body></html>
"""
