"""``python -m vllm_fleet.entrypoints.ray_start <ray start arguments>``: Ray's own ``ray start``,
made to survive a busy host, then run in this process. Three changes around two start-up waits
of Ray 2.55 that have no setting and were missed on the 2-core lab at load 30 to 50:

1. The raylet gets the dashboard agent's listen port on its command line
   (``--dashboard_agent_listen_port``, a raylet flag Ray's ``start_raylet`` does not pass although
   ``ray start`` fixes the port for the agent). Without it the raylet waits for the agent to write
   its port file, a fixed wait of seconds (``NodeManager::WaitForDashboardAgentPorts``), and
   aborts when the agent's Python imports take longer: seen during a rolling restart under three
   clients, where the raylets of both workers aborted after 19 s and ``ray start`` waited on.
   ``RAY_agent_register_timeout_ms`` does not cover that wait. The port is the one the agent is
   told to listen on (its ``--listen-port``), so the two always agree.
2. ``ray start`` gives the raylet a hard-coded 30 s to register with the GCS (``Node.__init__``)
   and then aborts ("The current node timed out during startup"): the registration check
   (``ray._private.services.get_node``, which ``Node`` calls in that loop) keeps asking until
   FLEET_RAY_REGISTER_TIMEOUT seconds (default 300) have passed.
3. That longer wait ends at once when a process this node started has exited (the raylet
   aborted, the GCS died): ``ray start`` fails naming it, the container exits and Docker's
   restart policy starts a fresh node, instead of ``ray start`` waiting out its deadline for a
   raylet that is gone (seen: 10 minutes with a defunct raylet).
"""

from __future__ import annotations

import os
import shlex
import sys
import time

LISTEN_PORT_FLAG = "--dashboard_agent_listen_port="


class RayProcessExited(Exception):
    """A process of the starting node exited: its registration will never come."""


def patient_get_node(get_node, timeout_s: float, sleep=time.sleep, clock=time.monotonic,
                     exited=lambda: []):
    """get_node that retries RuntimeError ("node info not available yet") until timeout_s, and
    raises RayProcessExited as soon as exited() names a process of the node that is gone."""

    def inner(*args, **kwargs):
        deadline = clock() + timeout_s
        while True:
            try:
                return get_node(*args, **kwargs)
            except RuntimeError:
                gone = exited()
                if gone:
                    raise RayProcessExited(
                        f"Ray's {', '.join(gone)} exited while this node started (its log is in the "
                        "session's logs/ directory); Docker's restart policy starts the node again") from None
                if clock() >= deadline:
                    raise
                sleep(0.5)

    inner.__wrapped__ = get_node
    return inner


def raylet_command(command):
    """The raylet's command line with the agent's listen port (from --dashboard_agent_command's
    --listen-port) added as --dashboard_agent_listen_port, unless Ray passes it already."""
    if any(arg.startswith(LISTEN_PORT_FLAG) for arg in command):
        return command
    for arg in command:
        if arg.startswith("--dashboard_agent_command="):
            for word in shlex.split(arg.split("=", 1)[1]):
                if word.startswith("--listen-port="):
                    port = word.split("=", 1)[1]
                    if port.isdigit() and int(port) > 0:
                        return [*command, LISTEN_PORT_FLAG + port]
    return command


def pass_listen_port(start_ray_process, raylet_type="raylet"):
    """start_ray_process that gives a raylet its agent's listen port (raylet_command)."""

    def inner(command, process_type, *args, **kwargs):
        if process_type == raylet_type:
            command = raylet_command(command)
        return start_ray_process(command, process_type, *args, **kwargs)

    inner.__wrapped__ = start_ray_process
    return inner


def remember_starting_nodes(node_cls, nodes):
    """Node.start_ray_processes that appends the node to `nodes` first (for its dead_processes)."""
    original = node_cls.start_ray_processes

    def start_ray_processes(self, *args, **kwargs):
        nodes.append(self)
        return original(self, *args, **kwargs)

    start_ray_processes.__wrapped__ = original
    return start_ray_processes


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    timeout_s = float(os.environ.get("FLEET_RAY_REGISTER_TIMEOUT", "300"))
    from ray._private import ray_constants, services
    from ray._private.node import Node
    from ray.scripts.scripts import main as ray_main

    starting = []

    def exited():
        return sorted({kind for node in starting for kind, _ in node.dead_processes()})

    if not hasattr(services.get_node, "__wrapped__"):
        services.get_node = patient_get_node(services.get_node, timeout_s, exited=exited)
    if not hasattr(services.start_ray_process, "__wrapped__"):
        services.start_ray_process = pass_listen_port(services.start_ray_process,
                                                      ray_constants.PROCESS_TYPE_RAYLET)
    if not hasattr(Node.start_ray_processes, "__wrapped__"):
        Node.start_ray_processes = remember_starting_nodes(Node, starting)
    sys.argv = ["ray", *argv]
    return ray_main()


if __name__ == "__main__":
    sys.exit(main())
