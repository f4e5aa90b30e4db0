"""The healer's records (roles/healer: actions.jsonl on the healer host) as metrics.

One JSON object per line: {"ts", "replica", "result": started|healed|failed|refused|skipped,
"why", "alert"}. Re-read only when the file changes; lines that do not parse are counted.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

RESULTS = ("started", "healed", "failed", "refused", "skipped")
P = "vllm_fleet_"


class HealLog:
    def __init__(self, path: str, replicas=()):
        self.path = path
        self.replicas = tuple(replicas)  # exported at 0 before their first heal: increase() works
        self._sig = None
        self.counts: Dict[Tuple[str, str], int] = {}
        self.last: Dict[Tuple[str, str], float] = {}
        self.bad = 0

    def _load(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._sig, self.counts, self.last, self.bad = None, {}, {}, 0
            return
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if sig == self._sig:
            return
        counts: Dict[Tuple[str, str], int] = {}
        last: Dict[Tuple[str, str], float] = {}
        bad = 0
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    key = (str(rec["replica"]), str(rec["result"]))
                    ts = float(rec["ts"])
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                if key[1] not in RESULTS:
                    bad += 1
                    continue
                counts[key] = counts.get(key, 0) + 1
                last[key] = max(ts, last.get(key, 0.0))
        self._sig, self.counts, self.last, self.bad = sig, counts, last, bad

    def metrics(self) -> List[Metric]:
        self._load()
        total = CounterMetricFamily(P + "heal_actions", "Healer steps by replica and result "
                                    "(started, healed, failed, refused, skipped).",
                                    labels=["replica", "result"])
        when = GaugeMetricFamily(P + "heal_last_timestamp_seconds",
                                 "Unix time of the healer's last step of this result.",
                                 labels=["replica", "result"])
        busy = GaugeMetricFamily(P + "heal_in_progress",
                                 "1 while a heal of the replica has started and not ended.",
                                 labels=["replica"])
        replicas = sorted({r for r, _ in self.counts} | set(self.replicas))
        for replica in replicas:
            for result in RESULTS:
                total.add_metric([replica, result], self.counts.get((replica, result), 0))
                if (replica, result) in self.last:
                    when.add_metric([replica, result], self.last[(replica, result)])
            started = self.last.get((replica, "started"), 0.0)
            ended = max(self.last.get((replica, "healed"), 0.0),
                        self.last.get((replica, "failed"), 0.0))
            busy.add_metric([replica], 1 if started > ended else 0)
        bad = GaugeMetricFamily(P + "heal_log_unparseable_lines",
                                "Lines of the healer's records that could not be parsed.")
        bad.add_metric([], self.bad)
        return [total, when, busy, bad]
