"""The fabric check's report: the table node 0 prints (and the Ray driver relays), and the exit
codes every launcher returns. Its own module so that the CLI and the launchers both import it and
neither imports the other back."""

from __future__ import annotations

EXIT_OK, EXIT_FAIL, EXIT_TIMEOUT = 0, 1, 124


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_table(report: dict) -> str:
    lines = [f"fabric check {report['launch_id']}: backend {report['backend']}, "
             f"{report['world_size']} ranks",
             f"{'size':>10} {'latency_us':>12} {'algbw_GB/s':>11} {'busbw_GB/s':>11} correct"]
    for r in report["results"]:
        lines.append(f"{human(r['size_bytes']):>10} {r['latency_s'] * 1e6:12.1f} "
                     f"{r['algbw_Bps'] / 1e9:11.3f} {r['busbw_Bps'] / 1e9:11.3f} "
                     f"{'yes' if r['correct'] else 'NO'}")
    for p in report.get("pairs", []):
        flag = "BROKEN" if not p["ok"] else ("SLOW" if p["slow"] else "ok")
        lines.append(f"pair {p['a']}-{p['b']}: {p['latency_s'] * 1e6:.1f} us, busbw "
                     f"{p['busbw_Bps'] / 1e9:.3f} GB/s {flag}  [{p['hosts'][0]} <-> "
                     f"{p['hosts'][1]}]")
    if report.get("suspects"):
        lines.append("suspect: " + "; ".join(
            next(p["hosts"][0 if p["a"] == s else 1] for p in report["pairs"]
                 if s in (p["a"], p["b"])) for s in report["suspects"]))
    lines.append("RESULT: " + ("OK" if report["ok"] else "FAILED"))
    return "\n".join(lines)
