"""`vllm-fleet-exporter`: serve /metrics on the management address (read-only)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import List, Optional

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from .collector import FleetExporter
from .config import ConfigError, load_config, resolve_listen
from .serve import build_app, start_agent, start_http

log = logging.getLogger("vllm_fleet_exporter")


def build_registry(exporter: FleetExporter) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)  # process_cpu_seconds_total etc. of the exporter itself
    registry.register(exporter)
    return registry


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    once = "--once" in argv  # print one scrape (all jobs run once, inline) and exit
    argv = [a for a in argv if a != "--once"]
    try:
        cfg = load_config(argv)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"vllm-fleet-exporter: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    exporter = FleetExporter(cfg)
    registry = build_registry(exporter)
    if once:
        exporter.run_all_once()
        sys.stdout.write(generate_latest(registry).decode())
        return 0
    addr, port = resolve_listen(cfg.listen)
    exporter.start()
    keeper = exporter.verdict
    try:
        start_http(addr, port, build_app(registry, keeper.http_body if keeper else None))
        if keeper is not None and cfg.agent_listen:
            a_addr, a_port = resolve_listen(cfg.agent_listen)
            start_agent(a_addr, a_port, keeper.agent_line)
            log.info("HAProxy agent-check on %s:%s", a_addr, a_port)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", addr, port, exc)
        return 1
    log.info("serving /metrics%s on %s:%s (jobs: %s)", " and /verdict" if keeper else "",
             addr, port, ", ".join(exporter.jobs))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    exporter.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
