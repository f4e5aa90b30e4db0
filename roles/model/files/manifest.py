#!/usr/bin/env python3
"""Print a sha256sum-format manifest of a model directory (sorted, relative paths).

Usage: manifest.py DIR [EXCLUDE_NAME]   (the manifest's own name is excluded)
"""
import hashlib
import os
import sys


def main():
    root = sys.argv[1]
    exclude = sys.argv[2] if len(sys.argv) > 2 else "MANIFEST.sha256"
    if not os.path.isdir(root):
        sys.exit(f"model directory {root} does not exist")
    rows = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for name in files:
            rel = os.path.relpath(os.path.join(d, name), root)
            if rel == exclude or name.startswith("."):
                continue
            h = hashlib.sha256()
            with open(os.path.join(d, name), "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            rows.append(f"{h.hexdigest()}  {rel}")
    if not rows:
        sys.exit(f"model directory {root} holds no files")
    print("\n".join(sorted(rows, key=lambda r: r[66:])))


if __name__ == "__main__":
    main()
