#!/usr/bin/env python3
"""Smoke-test an OpenAI-compatible endpoint: non-streaming and streaming chat completions.

Usage: smoke.py BASE_URL MODEL [MAX_TOKENS [API_KEY_FILE]]   (no file: no key)
The key is read from a file (the vllm_serve role runs this inside the serving container, where the
engine key is mounted), never taken from the command line.
Prints one JSON line; exit 1 when either request fails or returns no tokens.
"""
import json
import sys
import time


def main():
    from openai import OpenAI

    base, model = sys.argv[1], sys.argv[2]
    max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    key = "none"
    if len(sys.argv) > 4:
        with open(sys.argv[4], encoding="utf-8") as fh:
            key = fh.read().strip()
    client = OpenAI(base_url=base, api_key=key, timeout=120, max_retries=0)
    out = {"base_url": base, "model": model}
    t = time.monotonic()
    r = client.chat.completions.create(model=model, max_tokens=max_tokens, messages=[
        {"role": "user", "content": "hello from the vllm-fleet smoke test"}])
    out["non_stream"] = {"tokens": r.usage.completion_tokens, "text": r.choices[0].message.content,
                         "finish_reason": r.choices[0].finish_reason,
                         "seconds": round(time.monotonic() - t, 3)}
    t = time.monotonic()
    chunks, text = 0, []
    for ch in client.chat.completions.create(model=model, max_tokens=max_tokens, stream=True,
                                             messages=[{"role": "user", "content": "stream it"}]):
        if ch.choices:
            chunks += 1
            text.append(ch.choices[0].delta.content or "")
    out["stream"] = {"chunks": chunks, "text": "".join(text),
                     "seconds": round(time.monotonic() - t, 3)}
    print(json.dumps(out))
    if out["non_stream"]["tokens"] < 1 or chunks < 1:
        sys.exit(1)


if __name__ == "__main__":
    main()
