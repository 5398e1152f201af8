"""Background loops that cannot die silently, and the supervisor that watches them.

A ``Worker`` runs one pass of its work again and again on a daemon thread. A pass that raises
is logged once with its cause and the loop pauses (doubling up to a cap, so a full disk does not
flood the log) and goes on. A thread that dies anyway (an error outside the guard) is noticed by
the ``Supervisor``, which logs it, reports the service unhealthy and restarts the worker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

from plugin.failures import describe
from plugin.outbox import Backoff

log = logging.getLogger(__name__)


class Worker:
    """``work(now)`` in a guarded loop on a thread named ``name``, until ``stop`` is set.

    Between passes it waits ``poll_seconds``, or less when ``wake`` is set (new work announced:
    a study released, a report owed), so that work need not wait for the next poll. After a
    failed pass it waits out its pause whatever is announced, so a failing pass cannot be run
    again and again by a busy stream of instances.
    """

    def __init__(
        self,
        name: str,
        work: Callable[[float], object],
        stop: threading.Event,
        *,
        poll_seconds: float,
        pause: Backoff,
        wake: threading.Event | None = None,
    ) -> None:
        self.name = name
        self._work = work
        self._stop = stop
        self._poll_seconds = poll_seconds
        self._pause = pause
        self._wake = wake if wake is not None else threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0
        self.death: str | None = None  # why the thread last ended, if it did not stop cleanly

    def start(self) -> None:
        self.death = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run the next pass now (or as soon as the current one ends)."""
        self._wake.set()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        """Wait for the thread to end (after ``stop``): woken first, so that a worker idle
        between passes (up to ``poll_seconds``, an hour for retention) sees the stop now."""
        self._wake.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    self._work(time.time())
                except Exception as error:  # noqa: BLE001 - one bad pass must not end the loop
                    failures += 1
                    wait = self._pause.delay(failures - 1)
                    _log_failed_pass(self.name, error, failures, wait)
                    self._stop.wait(wait)
                else:
                    failures = 0
                    # a wake during a pass makes the next one start at once
                    self._wake.wait(self._poll_seconds)
                    self._wake.clear()
        except BaseException as error:  # noqa: BLE001 - recorded for the supervisor's log line
            # Ending quietly keeps the error text (which may quote patient data) off stderr.
            self.death = describe(error)


def _log_failed_pass(name: str, error: Exception, failures: int, wait: float) -> None:
    """The guard's own handler: even describing the error must not end the loop."""
    with contextlib.suppress(Exception):  # nothing left to report it to
        log.error(
            "%s: pass failed (%d in a row), next in %.0f s: %s",
            name,
            failures,
            wait,
            describe(error),
        )


class Supervisor:
    """Restarts workers whose thread ended while the service runs; says whether all are up."""

    def __init__(
        self,
        workers: Sequence[Worker],
        stop: threading.Event,
        *,
        check_seconds: float,
        pause: Backoff,
    ) -> None:
        self.workers = tuple(workers)
        self._stop = stop
        self._check_seconds = check_seconds
        self._pause = pause  # between restarts of a worker that keeps dying
        self._not_before: dict[str, float] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self._thread = threading.Thread(
            target=self._watch, name="dermfusion-supervisor", daemon=True
        )
        self._thread.start()

    def healthy(self) -> bool:
        """True while the service runs with every worker and the supervisor alive."""
        return (
            not self._stop.is_set()
            and self._thread is not None
            and self._thread.is_alive()
            and all(worker.is_alive() for worker in self.workers)
        )

    def join(self, timeout: float) -> None:
        for worker in self.workers:
            worker.join(timeout)
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    def check(self, now: float) -> None:
        """Restart each dead worker, at most once per pause (a worker that dies at once again
        would otherwise be restarted, and logged, every check)."""
        for worker in self.workers:
            if self._stop.is_set() or worker.is_alive():
                continue
            if now < self._not_before.get(worker.name, 0.0):
                continue
            worker.restarts += 1
            self._not_before[worker.name] = now + self._pause.delay(worker.restarts - 1)
            log.error(
                "%s: thread died (%s); restarting it (restart %d)",
                worker.name,
                worker.death or "no cause recorded",
                worker.restarts,
            )
            worker.start()

    def _watch(self) -> None:
        while not self._stop.wait(self._check_seconds):
            try:
                self.check(time.time())
            except Exception as error:  # noqa: BLE001 - the watcher must outlive what it watches
                _log_failed_pass("dermfusion-supervisor", error, 1, self._check_seconds)
