#!/usr/bin/env python3
"""Serving throughput of several OpenAI endpoints, interleaved rounds (A, B, C, then rotated).

Same model, same load on each: --requests chat completions per round at --concurrency, each
generating exactly --max-tokens (ignore_eos). Prints tokens/s per round and each endpoint's median
against the first one, e.g. with-plugin vs the same vLLM without the plugin.

    python benchmarks/serving_ab.py --endpoint with-plugin=http://127.0.0.1:8001/v1 \\
        --endpoint without-plugin=http://127.0.0.1:8002/v1 --model tiny \\
        [--rounds 6] [--requests 64] [--concurrency 16] [--max-tokens 128] [--json F]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def one_round(client, model: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    def call(i: int) -> int:
        resp = client.chat.completions.create(
            model=model, max_tokens=max_tokens, temperature=0.0,
            messages=[{"role": "user", "content": f"request {i}: the cluster serves tokens"}],
            extra_body={"ignore_eos": True})
        return resp.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        tokens = sum(pool.map(call, range(requests)))
    wall = time.perf_counter() - start
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", action="append", required=True, metavar="LABEL=URL",
                    help="an endpoint (…/v1); give two or more; the first is the reference")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    ap.add_argument("--json")
    args = ap.parse_args()
    from openai import OpenAI

    endpoints = [e.split("=", 1) for e in args.endpoint]
    clients = {label: OpenAI(base_url=url, api_key="none", timeout=args.timeout, max_retries=0)
               for label, url in endpoints}
    for client in clients.values():  # warm-up, not counted
        one_round(client, args.model, args.concurrency, args.concurrency, 16)
    results = {label: [] for label in clients}
    print(f"{'round':>5} {'endpoint':>12} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for r in range(args.rounds):
        labels = list(clients)
        order = labels[r % len(labels):] + labels[:r % len(labels)]  # rotate: no order bias
        for label in order:
            res = one_round(clients[label], args.model, args.requests, args.concurrency, args.max_tokens)
            results[label].append(res)
            print(f"{r:>5} {label:>12} {res['tokens']:>7} {res['seconds']:8.2f} {res['tokens_per_s']:9.1f}",
                  flush=True)
    med = {label: statistics.median(x["tokens_per_s"] for x in runs) for label, runs in results.items()}
    ref = endpoints[0][0]
    print(f"{'endpoint':>16} {'median tokens/s':>16} {'vs ' + ref:>22}")
    for label in clients:
        print(f"{label:>16} {med[label]:16.1f} {(med[label] / med[ref] - 1) * 100:+21.2f} %")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rounds": results, "median_tokens_per_s": med, "reference": ref}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
