"""Container entrypoints of the serving image: ``fleet-ray-node`` and ``fleet-serve``.

Stdlib only. Both read their settings from flags, then environment variables, then the fabric
role's env file (``/etc/vllm-fleet/fabric.env``, docker ``--env-file`` format), build one argument
list, and ``exec`` it so the container's PID 1 (behind ``--init``) signals the real process.
``--dry-run`` prints the argument list and environment as JSON instead (used by the unit tests).
"""
import json
import os
import sys

FABRIC_ENV = "/etc/vllm-fleet/fabric.env"


def read_env_file(path):
    """Parse a docker ``--env-file``: KEY=VALUE lines, ``#`` comments, no quoting, no expansion."""
    out = {}
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if key.startswith("export "):
            key = key[len("export "):].strip()
        out[key] = value
    return out


def merged_env(environ=None, fabric_env_path=None):
    """The process environment over the fabric env file (the container's own env wins)."""
    environ = dict(os.environ if environ is None else environ)
    path = fabric_env_path or environ.get("FLEET_FABRIC_ENV", FABRIC_ENV)
    merged = read_env_file(path)
    merged.update(environ)
    return merged


def first(env, *keys, default=None):
    """First non-empty value among env keys."""
    for key in keys:
        value = env.get(key)
        if value not in (None, ""):
            return value
    return default


def die(msg, code=2):
    print(f"{os.path.basename(sys.argv[0]) or 'fleet'}: error: {msg}", file=sys.stderr)
    sys.exit(code)


def launch(argv, env, dry_run=False, extra=None):
    """Print (dry run) or exec the command with the given environment."""
    if dry_run:
        print(json.dumps({"argv": argv, "env": env, **(extra or {})}, indent=2, sort_keys=True))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
    return 1  # not reached
