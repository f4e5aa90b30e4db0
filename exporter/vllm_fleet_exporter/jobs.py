"""Background jobs: expensive checks run on their own schedule; scrapes only read `last`."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class JobResult:
    value: Any
    success: bool
    error: str
    started: float  # Unix time the run started
    finished: float
    duration_s: float


class Job:
    """Runs `fn()` every `interval_s` seconds in a daemon thread.

    `fn` returns the value to cache or raises; it must bound its own run time (every probe has a
    timeout). The latest result is replaced atomically, so a scrape never waits for a run.
    """

    def __init__(self, name: str, fn: Callable[[], Any], interval_s: float,
                 max_age_s: Optional[float] = None):
        self.name = name
        self.fn = fn
        self.interval_s = max(0.05, float(interval_s))
        # A result older than this is not trusted (the job is wedged or dead).
        self.max_age_s = max_age_s if max_age_s is not None else 3 * self.interval_s + 30
        self.last: Optional[JobResult] = None
        self.last_success: Optional[JobResult] = None
        self.runs_success = 0
        self.runs_failure = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def run_once(self) -> JobResult:
        started = time.time()
        t0 = time.perf_counter()
        try:
            value = self.fn()
            ok, err = True, ""
        except Exception as exc:  # a probe failure is a result, not a crash
            value, ok, err = None, False, f"{type(exc).__name__}: {exc}"
            log.debug("job %s failed: %s", self.name, err)
        dur = time.perf_counter() - t0
        res = JobResult(value, ok, err, started, time.time(), dur)
        self.last = res
        if ok:
            self.last_success = res
            self.runs_success += 1
        else:
            self.runs_failure += 1
        return res

    def fresh(self, now: Optional[float] = None) -> Optional[JobResult]:
        """The latest result if it is recent enough to be trusted."""
        res = self.last
        if res is None:
            return None
        now = time.time() if now is None else now
        return res if now - res.finished <= self.max_age_s else None

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.run_once()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"job-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
