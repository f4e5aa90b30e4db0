#!/usr/bin/env python3
"""Load generator for a vllm-fleet endpoint, through the real OpenAI Python client.

Bounded twice: at most --requests requests, and no request starts after --duration seconds; each
request has its own --timeout, so the whole run ends within duration + timeout. SIGTERM/SIGINT stop
new requests and let in-flight ones finish (benchmarks/rolling_restart.py uses that).

  tools/loadgen.py --base-url https://lb:8443/v1 --api-key-file KEYFILE --ca-file ca.crt \
      --requests 500 --duration 120 --concurrency 8 --stream-ratio 0.5 --json out.json --fail-on-error

The key comes from a file (--api-key-file) or $OPENAI_API_KEY, never from the command line;
--ca-file trusts a private CA (the lab CA of a deployment: fleet-secrets/<deployment>/lab-ca/ca.crt).

Prints total / failed / p50 / p99 latency and TTFT (streamed requests); the JSON has the same plus
errors by kind and, with --per-request, every request. The client never retries (max_retries=0 by
default): a failure the client would have hidden counts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class Request:
    index: int
    stream: bool
    start: float                     # Unix seconds
    latency_s: float = 0.0
    ttft_s: float | None = None
    ok: bool = False
    error: str = ""
    completion_tokens: int = 0


@dataclass
class Config:
    base_url: str
    api_key: str = "EMPTY"
    model: str = ""
    requests: int = 100
    duration: float = 60.0
    concurrency: int = 4
    stream_ratio: float = 0.5
    max_tokens: int = 16
    prompt: str = "Say hello in one short sentence."
    timeout: float = 60.0
    retries: int = 0
    seed: int = 0
    extra_body: dict = field(default_factory=dict)
    think_time: float = 0.0          # seconds each worker waits between its requests
    ca_file: str = ""                # CA bundle to verify the server's TLS certificate (else the system's)


def percentile(values: list[float], q: float) -> float | None:
    """q-th percentile (0-100) with linear interpolation between closest ranks; None when empty."""
    if not values:
        return None
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def describe_error(exc: BaseException) -> str:
    import openai
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection error"
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}"
    return f"{type(exc).__name__}: {exc}"[:200]


class LoadGenerator:
    def __init__(self, config: Config):
        self.config = config
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.issued = 0
        self.results: list[Request] = []
        self.rng = random.Random(config.seed)
        self.started = self.ended = 0.0

    def client(self):
        import openai
        http_client = openai.DefaultHttpxClient(verify=self.config.ca_file) if self.config.ca_file else None
        return openai.OpenAI(base_url=self.config.base_url, api_key=self.config.api_key or "EMPTY",
                             timeout=self.config.timeout, max_retries=self.config.retries,
                             http_client=http_client)

    def resolve_model(self) -> str:
        if self.config.model:
            return self.config.model
        models = self.client().models.list()
        return models.data[0].id

    def next_request(self, deadline: float) -> tuple[int, bool] | None:
        with self.lock:
            if self.stop_event.is_set() or self.issued >= self.config.requests or time.monotonic() >= deadline:
                return None
            index = self.issued
            self.issued += 1
            return index, self.rng.random() < self.config.stream_ratio

    def one(self, client, model: str, index: int, stream: bool) -> Request:
        cfg = self.config
        req = Request(index=index, stream=stream, start=time.time())
        t0 = time.monotonic()
        messages = [{"role": "user", "content": cfg.prompt}]
        try:
            if stream:
                finish = None
                with client.chat.completions.create(model=model, messages=messages, max_tokens=cfg.max_tokens,
                                                    stream=True, extra_body=cfg.extra_body or None) as events:
                    for event in events:
                        for choice in event.choices:
                            if req.ttft_s is None and (choice.delta.content or choice.finish_reason):
                                req.ttft_s = time.monotonic() - t0
                            if choice.delta.content:
                                req.completion_tokens += 1
                            finish = choice.finish_reason or finish
                if finish is None:
                    raise RuntimeError("stream ended without a finish_reason (cut off)")
            else:
                resp = client.chat.completions.create(model=model, messages=messages, max_tokens=cfg.max_tokens,
                                                      stream=False, extra_body=cfg.extra_body or None)
                if not resp.choices:
                    raise RuntimeError("response without choices")
                req.completion_tokens = resp.usage.completion_tokens if resp.usage else 0
            req.ok = True
        except Exception as exc:  # every failure is counted, none is raised
            req.error = describe_error(exc)
        req.latency_s = time.monotonic() - t0
        return req

    def worker(self, model: str, deadline: float) -> None:
        client = self.client()
        while True:
            job = self.next_request(deadline)
            if job is None:
                return
            result = self.one(client, model, *job)
            with self.lock:
                self.results.append(result)
            if self.config.think_time > 0:
                self.stop_event.wait(self.config.think_time)  # a stop ends the pause at once

    def run(self) -> dict:
        cfg = self.config
        model = self.resolve_model()
        self.started = time.time()
        deadline = time.monotonic() + cfg.duration
        threads = [threading.Thread(target=self.worker, args=(model, deadline), daemon=True)
                   for _ in range(max(1, cfg.concurrency))]
        for t in threads:
            t.start()
        hard_stop = deadline + cfg.timeout + 5  # in-flight requests end by their own timeout
        for t in threads:
            t.join(max(0.0, hard_stop - time.monotonic()))
        abandoned = sum(t.is_alive() for t in threads)
        self.ended = time.time()
        return self.summary(model, abandoned)

    def summary(self, model: str, abandoned: int = 0) -> dict:
        with self.lock:
            results = sorted(self.results, key=lambda r: r.index)
        ok = [r for r in results if r.ok]
        failed = [r for r in results if not r.ok]
        lat = [r.latency_s for r in ok]
        ttft = [r.ttft_s for r in ok if r.stream and r.ttft_s is not None]
        duration = max(self.ended - self.started, 1e-9)
        return {
            "model": model, "base_url": self.config.base_url,
            "started": self.started, "ended": self.ended, "duration_s": round(duration, 3),
            "total": len(results) + abandoned, "ok": len(ok), "failed": len(failed) + abandoned,
            "abandoned": abandoned,
            "stream": sum(r.stream for r in results), "non_stream": sum(not r.stream for r in results),
            "requests_per_s": round(len(results) / duration, 3),
            "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
            "latency_max_s": max(lat) if lat else None,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "errors": dict(Counter(r.error for r in failed)),
            "config": {k: v for k, v in asdict(self.config).items() if k != "api_key"},
            "requests": [asdict(r) for r in results],
        }


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def report(summary: dict) -> str:
    lines = [
        f"loadgen: {summary['total']} requests in {summary['duration_s']:.1f}s "
        f"({summary['requests_per_s']:.1f} req/s) to {summary['base_url']} model {summary['model']}",
        f"  ok {summary['ok']}  failed {summary['failed']}  "
        f"(stream {summary['stream']}, non-stream {summary['non_stream']})",
        f"  latency p50 {fmt(summary['latency_p50_s'])}  p99 {fmt(summary['latency_p99_s'])}  "
        f"max {fmt(summary['latency_max_s'])}",
        f"  ttft    p50 {fmt(summary['ttft_p50_s'])}  p99 {fmt(summary['ttft_p99_s'])}  (streamed requests)",
    ]
    for error, count in sorted(summary["errors"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  error x{count}: {error}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="OpenAI base URL, e.g. https://lb:8443/v1")
    p.add_argument("--api-key-file", default="",
                   help="file holding the API key (default: $OPENAI_API_KEY, else none); never the key itself")
    p.add_argument("--ca-file", default="", help="CA bundle for the server's TLS certificate (e.g. the lab CA)")
    p.add_argument("--model", default="", help="model name (default: the first of /v1/models)")
    p.add_argument("--requests", type=int, default=100, help="at most this many requests (default 100)")
    p.add_argument("--duration", type=float, default=60.0, help="no request starts after this many seconds")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    p.add_argument("--stream-ratio", type=float, default=0.5, help="share of streamed requests, 0..1")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt", default=Config.prompt)
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    p.add_argument("--retries", type=int, default=0, help="OpenAI client retries (default 0: count every failure)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stream/non-stream mix")
    p.add_argument("--extra-body", default="{}", help='JSON merged into each request, e.g. {"ignore_eos": true}')
    p.add_argument("--json", dest="json_path", default="", help="write the summary as JSON here")
    p.add_argument("--per-request", action="store_true", help="keep every request in the JSON")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 when any request failed")
    p.add_argument("--think-time", type=float, default=0.0,
                   help="seconds each worker waits between its requests (default 0: back to back)")
    args = p.parse_args(argv)
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as fh:
                args.api_key = fh.readline().strip()
        except OSError as exc:
            p.error(f"--api-key-file {args.api_key_file}: {exc.strerror}")
    else:
        args.api_key = os.environ.get("OPENAI_API_KEY", "EMPTY")
    if args.ca_file and not os.path.isfile(args.ca_file):
        p.error(f"--ca-file {args.ca_file}: no such file")
    if args.requests < 1 or args.duration <= 0 or args.concurrency < 1 or not 0 <= args.stream_ratio <= 1 \
            or args.think_time < 0:
        p.error("--requests and --concurrency must be >= 1, --duration > 0, --stream-ratio in [0, 1], "
                "--think-time >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = Config(base_url=args.base_url, api_key=args.api_key, model=args.model, requests=args.requests,
                    duration=args.duration, concurrency=args.concurrency, stream_ratio=args.stream_ratio,
                    max_tokens=args.max_tokens, prompt=args.prompt, timeout=args.timeout, retries=args.retries,
                    seed=args.seed, extra_body=json.loads(args.extra_body), think_time=args.think_time,
                    ca_file=args.ca_file)
    gen = LoadGenerator(config)

    def stop(signum, _frame):
        print(f"loadgen: signal {signum}: no new requests, finishing those in flight", file=sys.stderr)
        gen.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        summary = gen.run()
    except Exception as exc:  # e.g. /v1/models unreachable before the first request
        print(f"loadgen: cannot start: {describe_error(exc)}", file=sys.stderr)
        return 2
    print(report(summary), flush=True)
    if args.json_path:
        if not args.per_request:
            summary = dict(summary, requests=[r for r in summary["requests"] if not r["ok"]])
        tmp = args.json_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=1)
        os.replace(tmp, args.json_path)
    if args.fail_on_error and summary["failed"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
