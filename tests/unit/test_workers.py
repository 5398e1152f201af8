"""Workers that cannot die silently: a dead thread is noticed, reported unhealthy, restarted."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from plugin.config import load_settings
from plugin.outbox import Backoff
from plugin.workers import Supervisor, Worker


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class DiesOnce:
    """A pass that escapes the loop's guard the first time (SystemExit is no Exception), as a
    bug in the guard itself would."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, now: float) -> None:
        self.calls += 1
        if self.calls == 1:
            raise SystemExit("quoting DOE^JANE")


def test_a_dead_worker_turns_health_red_until_it_is_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = threading.Event()
    work = DiesOnce()
    worker = Worker("test-worker", work, stop, poll_seconds=0.01, pause=Backoff(0, 0))
    supervisor = Supervisor([worker], stop, check_seconds=3600, pause=Backoff(1, 1))
    assert not supervisor.healthy()  # not started
    with caplog.at_level(logging.ERROR):
        supervisor.start()
        try:
            _wait_for(lambda: not worker.is_alive())
            assert not supervisor.healthy()
            supervisor.check(now=100.0)
            assert worker.is_alive() and supervisor.healthy() and worker.restarts == 1
            _wait_for(lambda: work.calls > 3)
        finally:
            stop.set()
            supervisor.join(5)
    assert not supervisor.healthy()  # stopped
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == "test-worker: thread died (SystemExit at " + line.split(" at ", 1)[1]
    assert "restarting it (restart 1)" in line and "DOE^JANE" not in line


def test_a_worker_that_keeps_dying_is_restarted_at_most_once_per_pause() -> None:
    stop = threading.Event()

    def always_dies(now: float) -> None:
        raise SystemExit

    worker = Worker("test-worker", always_dies, stop, poll_seconds=0.01, pause=Backoff(0, 0))
    supervisor = Supervisor([worker], stop, check_seconds=3600, pause=Backoff(10, 60))
    supervisor.start()
    try:
        for now in (100.0, 101.0, 105.0, 110.0, 115.0, 130.0):
            _wait_for(lambda: not worker.is_alive())
            supervisor.check(now)
        assert worker.restarts == 3  # at 100, 110 (+10) and 130 (+20)
    finally:
        stop.set()
        supervisor.join(5)


def test_the_supervisor_thread_restarts_a_dead_worker_by_itself() -> None:
    stop = threading.Event()
    work = DiesOnce()
    worker = Worker("test-worker", work, stop, poll_seconds=0.01, pause=Backoff(0, 0))
    supervisor = Supervisor([worker], stop, check_seconds=0.02, pause=Backoff(0, 0))
    supervisor.start()
    try:
        _wait_for(lambda: worker.restarts == 1 and work.calls > 2)
        assert supervisor.healthy()
    finally:
        stop.set()
        supervisor.join(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _service_without_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The real service wiring, not started, with a stand-in for the model."""
    from plugin import service as service_module
    from plugin.model import FusionModel

    monkeypatch.setattr(FusionModel, "load", classmethod(lambda cls, d, **how: object()))
    config = tmp_path / "dermfusion.toml"
    config.write_text(
        f'[listener]\nport = {_free_port()}\nbind_address = "127.0.0.1"\n'
        f'[storage]\ndir = "{tmp_path / "var"}"\n'
    )
    return service_module.DermfusionService(load_settings(config))


def test_the_service_reports_a_dead_scoring_thread_and_restarts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real service wiring, with a stand-in for the model (its weights are not needed)."""
    service = _service_without_a_model(tmp_path, monkeypatch)
    assert not service.healthy()
    dies = DiesOnce()
    service.scorer.score_ready = dies  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO):
        service.start()
        try:
            _wait_for(lambda: "dermfusion-scoring: thread died" in caplog.text)
            _wait_for(service.healthy)
            _wait_for(lambda: dies.calls > 2)  # the restarted loop is scoring again
        finally:
            service.stop()
    assert not service.healthy()
    assert "0 deliveries owed; parked: 0 deliveries, 0 studies" in caplog.text


class Passes:
    """Counts passes; fails the ones whose number is in ``failing``."""

    def __init__(self, failing: frozenset[int] = frozenset()) -> None:
        self.calls = 0
        self.failing = failing

    def __call__(self, now: float) -> None:
        self.calls += 1
        if self.calls in self.failing:
            raise RuntimeError("disk full")


def test_a_wake_starts_the_next_pass_without_waiting_for_the_poll() -> None:
    stop, bell = threading.Event(), threading.Event()
    work = Passes()
    worker = Worker("test-worker", work, stop, poll_seconds=3600, pause=Backoff(0, 0), wake=bell)
    worker.start()
    try:
        _wait_for(lambda: work.calls == 1)  # the first pass, then an hour's poll
        bell.set()  # what the service does when an association is released
        _wait_for(lambda: work.calls == 2)
        worker.wake()
        _wait_for(lambda: work.calls == 3)
        time.sleep(0.2)
        assert work.calls == 3  # a wake is one pass, not a busy loop
    finally:
        stop.set()
        worker.join(5)  # wakes it: an idle worker does not sit out its hour-long poll
    assert not worker.is_alive()


def test_a_wake_does_not_cut_short_the_pause_after_a_failed_pass() -> None:
    stop = threading.Event()
    work = Passes(failing=frozenset({1}))
    worker = Worker("test-worker", work, stop, poll_seconds=3600, pause=Backoff(3600, 3600))
    worker.start()
    try:
        _wait_for(lambda: work.calls == 1)
        worker.wake()
        time.sleep(0.3)
        assert work.calls == 1  # still in its pause: a busy stream cannot rerun a failing pass
    finally:
        stop.set()
        worker.join(5)
    assert not worker.is_alive()  # the stop ends the pause


def test_the_service_wakes_its_scorer_on_release_and_its_delivery_after_scoring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring: the listener's sink rings the scorer, the scorer rings the delivery worker."""
    service = _service_without_a_model(tmp_path, monkeypatch)
    sink = service.listener._sink
    assert not service._study_released.is_set()
    sink.association_closed("no-such-association")
    assert service._study_released.is_set()
    ready = ["1.2.3"]
    monkeypatch.setattr(service.store, "ready_studies", lambda now, stable: ready)
    monkeypatch.setattr(service.store, "study_attempts", lambda uid: 0)
    monkeypatch.setattr(service.processor, "process", lambda uid, now, one_by_one: None)
    assert not service._reports_owed.is_set()
    assert service.scorer.score_ready(0.0) == 1
    assert service._reports_owed.is_set()
    service.store.close()
