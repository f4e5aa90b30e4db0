"""Ray token authentication (Ray >= 2.52): what a process needs before it talks to Ray.

With ``RAY_AUTH_MODE=token`` every Ray RPC (GCS, raylet, ...) and every dashboard call carries the
cluster's token. Ray takes it from ``RAY_AUTH_TOKEN`` (the value itself), else the file
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``; an unreadable RAY_AUTH_TOKEN_PATH aborts the
process. The fleet passes a file (mounted read-only, root only), never the value in the
environment, so the token does not show in ``docker inspect`` or /proc/<pid>/environ.
Stdlib only.
"""

from __future__ import annotations

import os


def enabled(env) -> bool:
    return str(env.get("RAY_AUTH_MODE", "")).strip().lower() == "token"


def use_token_file(env: dict, path: str) -> None:
    """Turn token authentication on for this process (and its children) with the token in path."""
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = path
    env.pop("RAY_AUTH_TOKEN", None)


def token_problem(env) -> str | None:
    """Why Ray would refuse to start or to connect with this environment, or None."""
    if not enabled(env) or env.get("RAY_AUTH_TOKEN"):
        return None
    path = env.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray",
                                                           "auth_token")
    try:
        with open(path, encoding="utf-8") as fh:
            if fh.read().strip():
                return None
        return f"RAY_AUTH_MODE=token but the token file {path} is empty"
    except OSError as exc:
        return (f"RAY_AUTH_MODE=token but the token file {path} cannot be read "
                f"({exc.strerror}); the ray_cluster role writes it (fleet_ray_auth)")
