"""``python -m vllm_fleet.entrypoints.ray_start <ray start arguments>``: Ray's own ``ray start``,
with its fixed 30 s wait for the new node to register made a setting.

Why: Ray 2.55's ``Node.__init__`` (``ray/_private/node.py``) gives the raylet a hard-coded 30 s to
register with the GCS and then aborts ``ray start`` ("The current node timed out during
startup"); on a busy host (the raylet waits for its dashboard agent, which may need a minute to
import under load) the head then restarts in a loop. Ray has no setting for it, so this wrapper
lets the registration check (``ray._private.services.get_node``, which ``Node`` calls in that
loop) keep asking until FLEET_RAY_REGISTER_TIMEOUT seconds (default 300) have passed, then runs
Ray's CLI in this process. The raylet's own wait for its agents is Ray's setting
``RAY_agent_register_timeout_ms``, which the ray_cluster role sets to the same bound.
"""

from __future__ import annotations

import os
import sys
import time


def patient_get_node(get_node, timeout_s: float, sleep=time.sleep, clock=time.monotonic):
    """get_node that retries RuntimeError ("node info not available yet") until timeout_s."""

    def inner(*args, **kwargs):
        deadline = clock() + timeout_s
        while True:
            try:
                return get_node(*args, **kwargs)
            except RuntimeError:
                if clock() >= deadline:
                    raise
                sleep(0.5)

    inner.__wrapped__ = get_node
    return inner


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    timeout_s = float(os.environ.get("FLEET_RAY_REGISTER_TIMEOUT", "300"))
    from ray._private import services
    from ray.scripts.scripts import main as ray_main

    if not hasattr(services.get_node, "__wrapped__"):
        services.get_node = patient_get_node(services.get_node, timeout_s)
    sys.argv = ["ray", *argv]
    return ray_main()


if __name__ == "__main__":
    sys.exit(main())
