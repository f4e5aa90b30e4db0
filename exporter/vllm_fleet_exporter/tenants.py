"""Per-tenant (per API key) request counters of the balancer's front door.

The loadbalancer role tracks every /v1 request in a HAProxy stick table keyed by tenant name
(never by key) and counts the requests its rate limit refused in gpc0. A small Lua service inside
HAProxy serves that table on the stats listener (127.0.0.1 only) as ``/tenant-metrics``, one line
per tenant: ``<tenant> gpc0=N,http_req_cnt=N,http_req_rate=N``; the exporter on the balancer host
reads it. (Not through HAProxy's CLI: every CLI level that can read a table's entries can also read
the key maps and the environment.) Counters restart from 0 when HAProxy restarts or a tenant's
entry expires; Prometheus' rate()/increase() handle that.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.request
from typing import Dict

USER_AGENT = "vllm-fleet-exporter"
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class TenantCounters:
    requests: int  # http_req_cnt: requests of the tenant (including refused ones)
    rate_limited: int  # gpc0: requests refused with 429
    rate: int  # http_req_rate: requests in the last rate-limit period


def parse_tenants(text: str) -> Dict[str, TenantCounters]:
    """``/tenant-metrics`` body -> {tenant: counters}; malformed lines are skipped."""
    out: Dict[str, TenantCounters] = {}
    for line in text.splitlines():
        name, _, rest = line.strip().partition(" ")
        if not _TENANT_RE.match(name) or " " in rest:
            continue
        values = {}
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            if sep and value.strip().lstrip("-").isdigit():
                values[key.strip()] = int(value)
        out[name] = TenantCounters(values.get("http_req_cnt", 0), values.get("gpc0", 0),
                                   values.get("http_req_rate", 0))
    return out


def read_tenants(url: str, timeout_s: float) -> Dict[str, TenantCounters]:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return parse_tenants(resp.read(4 << 20).decode(errors="replace"))
