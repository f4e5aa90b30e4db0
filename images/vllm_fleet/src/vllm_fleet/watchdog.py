"""Stuck-collective watchdog.

Each rank records the collective it is in (group, op, size, sequence number, start time) in
memory; the hot path is two attribute writes. A daemon thread flushes that record to
``collective-<host>-<pid>.json`` periodically and marks it stuck once ``current`` is older than
the threshold (VLLM_FLEET_STUCK_THRESHOLD_S, default 10 s), logging rank and op once per stuck
collective. Why a file and a thread: a hung collective keeps /health at 200, and workers must not
open listener sockets; the node exporter reads the files instead.

The flusher only reads what the hot path wrote (a tuple swapped atomically under the GIL), so a
rank blocked inside gloo/NCCL/shm is still reported: the blocking call holds no Python lock we use.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from . import state

logger = logging.getLogger("vllm_fleet.watchdog")

DEFAULT_THRESHOLD_S = 10.0


def threshold_from_env(env: dict | None = None) -> float:
    env = os.environ if env is None else env
    try:
        return float(env.get("VLLM_FLEET_STUCK_THRESHOLD_S", DEFAULT_THRESHOLD_S))
    except ValueError:
        return DEFAULT_THRESHOLD_S


class Watchdog:
    def __init__(self, path: str | None = None, threshold_s: float | None = None,
                 interval_s: float | None = None):
        self.threshold_s = threshold_from_env() if threshold_s is None else threshold_s
        # flush often enough that "stuck" is visible within ~threshold + a quarter of it
        self.interval_s = interval_s or max(0.05, min(1.0, self.threshold_s / 4))
        self._path = path
        self.rank: int | None = None
        self.local_rank: int | None = None
        self.seq = 0
        self.completed_total = 0
        self._current: tuple | None = None  # (group, op, size_bytes, seq, start)
        self._reported_seq = -1
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # other per-process state files (the probe's histograms) ride on the same thread
        self.flushers: list = []

    # -------------------------------------------------------------- hot path
    def begin(self, group: str, op: str, size_bytes: int) -> int:
        """Mark entry; returns a token for ``end``. Nested calls (a collective implemented with
        another) keep the outer record: the outer op is what the rank is waiting in."""
        self.seq += 1
        if self._current is None:
            self._current = (group, op, int(size_bytes), self.seq, time.time())
            return self.seq
        return 0

    def end(self, token: int) -> None:
        if token:
            self._current = None
            self.completed_total += 1

    # -------------------------------------------------------------- flushing
    @property
    def path(self) -> str:
        if self._path is None:
            self._path = state.collective_path()
        return self._path

    def snapshot(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        cur = self._current
        current = None
        stuck = False
        if cur is not None:
            group, op, size, seq, start = cur
            current = {"group": group, "op": op, "size_bytes": size, "seq": seq, "start": start}
            stuck = now - start > self.threshold_s
        return {"launch_id": state.launch_id(), "host": state.host_name(), "pid": os.getpid(),
                "rank": self.rank, "local_rank": self.local_rank, "updated": now,
                "threshold_s": self.threshold_s, "completed_total": self.completed_total,
                "current": current, "stuck": stuck}

    def flush(self) -> dict:
        doc = self.snapshot()
        if doc["stuck"] and doc["current"]["seq"] != self._reported_seq:
            cur = doc["current"]
            self._reported_seq = cur["seq"]
            logger.warning("vllm-fleet watchdog: rank %s (pid %d) stuck %.1fs in %s %s "
                           "size=%d seq=%d", self.rank, os.getpid(), doc["updated"] - cur["start"],
                           cur["group"], cur["op"], cur["size_bytes"], cur["seq"])
        try:
            state.write_json_atomic(self.path, doc)
        except OSError:
            pass  # state dir gone (test teardown, unmounted): serving goes on
        return doc

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            for fn in [self.flush] + list(self.flushers):
                try:
                    fn()
                except Exception:  # never let the flusher die on one bad write
                    logger.debug("vllm-fleet flush failed", exc_info=True)

    def start(self) -> "Watchdog":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="vllm-fleet-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            self.flush()
        except Exception:
            pass


_instance: Watchdog | None = None
_lock = threading.Lock()


def get() -> Watchdog:
    """Process-wide watchdog (created lazily, started by the plugin in workers)."""
    global _instance
    with _lock:
        if _instance is None:
            _instance = Watchdog()
        return _instance
