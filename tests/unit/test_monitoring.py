"""Health, metrics and the status page without a service: the state store they read, the
judgement of health, the page's texts, and the HTTP endpoint on a real socket."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from plugin.monitoring import (
    ServiceHealth,
    ServiceMetrics,
    StateGauges,
    StatusServer,
    status_page,
    stuck_destinations,
)
from plugin.state import (
    DeliveryState,
    InstanceRow,
    OutboxBacklog,
    OutboxItem,
    ScoredResult,
    SqliteStateStore,
)

SR_A, SR_B, SR_C = "2.25.101", "2.25.102", "2.25.103"


def _result(image: str, study: str, sr: str, at: float, p: float = 0.7) -> ScoredResult:
    return ScoredResult(image, study, sr, p, 0.5, p >= 0.5, "dermfusion test 1.0", at)


@pytest.fixture
def store(tmp_path: Path) -> SqliteStateStore:
    return SqliteStateStore(tmp_path / "state.sqlite3")


def test_results_are_kept_per_image_newest_study_first_and_forgotten_with_the_study(
    store: SqliteStateStore,
) -> None:
    for sop, study in (("1.1", "1"), ("1.2", "1"), ("2.1", "2"), ("3.1", "3")):
        store.record_instance(
            InstanceRow(sop, study, "1.2.840.10008.5.1.4.1.1.77.1.7", Path(f"/s/{sop}")), "a", 1.0
        )
    assert store.studies_waiting() == 3
    store.complete(
        ["1.1", "1.2"],
        [],
        [],
        10.0,
        [_result("1.1", "1", SR_A, 10.0), _result("1.2", "1", SR_B, 10.0, p=0.1)],
    )
    store.complete(
        ["2.1"],
        [],
        [OutboxItem(f"sr:{SR_C}", "pacs", Path("/o"), 0, study_instance_uid="2")],
        20.0,
        [_result("2.1", "2", SR_C, 20.0)],
    )
    assert store.studies_waiting() == 1  # study 3 is not scored yet
    recent = store.recent_results(studies=1)
    assert [r.sop_instance_uid for r in recent] == ["2.1"]
    assert [r.sop_instance_uid for r in store.recent_results(studies=5)] == ["2.1", "1.1", "1.2"]
    assert store.recent_results(5)[2] == _result("1.2", "1", SR_B, 10.0, p=0.1)
    (delivery,) = store.deliveries(["2", "1"])
    assert (delivery.key, delivery.destination, delivery.delivered_at) == (
        f"sr:{SR_C}",
        "pacs",
        None,
    )
    assert store.deliveries([]) == []
    store.forget_study("2")
    assert [r.study_instance_uid for r in store.recent_results(5)] == ["1", "1"]
    assert store.deliveries(["2"]) == []


def test_a_destination_is_stuck_only_past_the_limit() -> None:
    backlog = [
        OutboxBacklog("pacs", 2, 100.0),
        OutboxBacklog("fhir", 1, 190.0),
        OutboxBacklog("x", 0, None),
    ]
    assert stuck_destinations(backlog, now=200.0, stuck_after_seconds=60.0) == ["pacs"]
    assert stuck_destinations(backlog, now=200.0, stuck_after_seconds=100.0) == []


def test_health_names_a_dead_worker_and_a_stuck_outbox(store: SqliteStateStore) -> None:
    alive = [True]
    health = ServiceHealth(store, lambda: alive[0], 60.0, clock=lambda: 1000.0)
    assert health.problems() == []
    store.complete([], [], [OutboxItem("fhir:1", "fhir", Path("/o/1.json"), 0)], now=900.0)
    alive[0] = False
    assert health.problems() == [
        "a worker thread is not running",
        "outbox fhir stuck: a report owed longer than 60 s",
    ]


def test_the_page_says_where_each_report_stands_and_escapes_what_it_shows() -> None:
    results = [_result("1.1", "1", SR_A, 10.0), _result("1.2", "1<script>", SR_B, 10.0, p=0.2)]
    deliveries = [
        DeliveryState(f"sr:{SR_A}", "pacs", "1", 1, 12.0, None, None),
        DeliveryState(f"fhir:{SR_A}", "fhir", "1", 3, None, None, "FhirUnavailableError: down"),
        DeliveryState(f"sr:{SR_B}", "pacs", "1", 10, None, 50.0, "refused: 0xA700"),
    ]
    page = status_page(results, deliveries, [], now=60.0)
    assert 'data-destination="pacs">delivered 1970-01-01 00:00:12 UTC<' in page
    assert "owed, 3 attempt(s): FhirUnavailableError: down" in page
    assert "parked after 10 attempt(s): refused: 0xA700" in page
    assert "not sent (destination not configured)" in page  # SR_B has no FHIR row
    assert "1&lt;script&gt;" in page and "<script>" not in page
    assert "melanoma suspected (threshold 0.500)" in page and "not suspected" in page
    assert f'src="/saliency/{SR_A}.png"' in page
    assert 'id="health" class="ok"' in page
    unhealthy = status_page([], [], ["a worker thread is not running"], now=0.0)
    assert "Unhealthy: a worker thread is not running" in unhealthy
    assert 'id="no-studies"' in unhealthy


def test_endpoint_answers_health_metrics_page_and_only_overlays_by_uid(
    store: SqliteStateStore, tmp_path: Path
) -> None:
    alive = [True]
    health = ServiceHealth(store, lambda: alive[0], 60.0)
    metrics = ServiceMetrics()
    metrics.watch(StateGauges(store, health))
    metrics.instances_received.inc(3)
    metrics.refusals.labels("c-store", "0xA700").inc()
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / f"{SR_A}_saliency.png").write_bytes(b"\x89PNG overlay")
    (tmp_path / "secret.png").write_bytes(b"not served")
    server = StatusServer(
        host="127.0.0.1",
        port=0,
        metrics=metrics,
        health=health,
        store=store,
        outbox_dir=outbox,
        recent_studies=10,
    )
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert httpx.get(f"{base}/healthz").status_code == 200
        alive[0] = False
        unhealthy = httpx.get(f"{base}/healthz")
        assert unhealthy.status_code == 503
        assert unhealthy.json()["problems"] == ["a worker thread is not running"]
        text = httpx.get(f"{base}/metrics").text
        assert "dermfusion_instances_received_total 3.0" in text
        assert 'dermfusion_refusals_total{kind="c-store",status="0xA700"} 1.0' in text
        assert "dermfusion_healthy 0.0" in text
        assert "dermfusion_studies_waiting 0.0" in text
        assert httpx.get(f"{base}/saliency/{SR_A}.png").content == b"\x89PNG overlay"
        assert httpx.get(f"{base}/saliency/..%2fsecret.png").status_code == 404
        assert httpx.get(f"{base}/saliency/{SR_B}.png").status_code == 404
        assert "No study scored yet" in httpx.get(f"{base}/").text
    finally:
        server.stop()


def test_a_taken_port_is_a_clear_configuration_error(
    store: SqliteStateStore, tmp_path: Path
) -> None:
    from plugin.config import ConfigError

    health = ServiceHealth(store, lambda: True, 60.0)
    first = StatusServer(
        host="127.0.0.1",
        port=0,
        metrics=ServiceMetrics(),
        health=health,
        store=store,
        outbox_dir=tmp_path,
        recent_studies=1,
    )
    try:
        with pytest.raises(ConfigError, match=f"http: cannot listen on 127.0.0.1:{first.port}"):
            StatusServer(
                host="127.0.0.1",
                port=first.port,
                metrics=ServiceMetrics(),
                health=health,
                store=store,
                outbox_dir=tmp_path,
                recent_studies=1,
            )
    finally:
        first.stop()
