#!/usr/bin/env python3
"""Tiny HTTP client for the GPU scripts (the GPU machine has no curl).

    http_check.py health URL            exit 0 when URL answers 2xx within 5 s
    http_check.py chat PORT true|false  one chat completion (stream or not); prints the body
"""
import json
import sys
import urllib.request


def main() -> int:
    if sys.argv[1] == "health":
        try:
            urllib.request.urlopen(sys.argv[2], timeout=5)
            return 0
        except Exception:
            return 1
    port, stream = sys.argv[2], sys.argv[3] == "true"
    body = {"model": "tiny", "max_tokens": 16, "stream": stream,
            "messages": [{"role": "user", "content": "hello"}]}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    print(urllib.request.urlopen(req, timeout=60).read().decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
