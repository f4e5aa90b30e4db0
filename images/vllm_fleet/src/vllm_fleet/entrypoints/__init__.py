"""Container entrypoints of the serving image: ``fleet-ray-node`` and ``fleet-serve``.

Stdlib only. Both read their settings from flags, then environment variables, then the fabric
role's env file (``/etc/vllm-fleet/fabric.env``, docker ``--env-file`` format), build one argument
list, and ``exec`` it so the container's PID 1 (behind ``--init``) signals the real process.
``--dry-run`` prints the argument list and environment as JSON instead (used by the unit tests).
"""
import json
import os
import sys

from ..fabric_env import load_env_file

FABRIC_ENV = "/etc/vllm-fleet/fabric.env"


def merged_env(environ=None, fabric_env_path=None):
    """The process environment over the fabric env file (the container's own env wins)."""
    environ = dict(os.environ if environ is None else environ)
    path = fabric_env_path or environ.get("FLEET_FABRIC_ENV", FABRIC_ENV)
    merged = load_env_file(path)  # fabric_env's, the one reader of the file
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


def exec_or_print(argv, env, dry_run=False, extra=None):
    """Exec the command with the given environment (this process becomes it), or print it as JSON
    (dry run). Not a "launch": that word is the launch id's and launch.py's."""
    if dry_run:
        print(json.dumps({"argv": argv, "env": env, **(extra or {})}, indent=2, sort_keys=True))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
    return 1  # not reached
