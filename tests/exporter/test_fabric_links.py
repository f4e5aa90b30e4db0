"""fabric_link_down: a link the replica's inter-node traffic uses, down by the kernel's account,
makes the host unhealthy within a verdict cycle.

The links come from the fabric role's own fabric.json (built here by its writer, fabric_env).
Link states are read from sysfs: the IB ports from a fake /sys tree (no HCA exists here; the
fabric role's tests use the same layout), the socket interface from this machine's real
/sys/class/net ("lo" up, a name that does not exist gone), and on the lab by taking a lab host's
fabric NIC down (tests/lab/test_hang.py, cut-fabric)."""
import importlib.util
from pathlib import Path

import pytest
from vllm_fleet_exporter.fabric import fabric_links, links_down
from vllm_fleet_exporter.verdict import host_problems

_SOURCE = Path(__file__).resolve().parents[2] / "images/vllm_fleet/src/vllm_fleet/fabric_env.py"
_spec = importlib.util.spec_from_file_location("fabric_env_writer", _SOURCE)
fabric_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fabric_env)


def write_fabric_json(path: Path, interface: str, ib_ports: list[str]) -> None:
    node = {"host": "node2", "role": "worker", "interface": interface, "address": "172.28.20.12",
            "network": "172.28.20.0/24", "head_address": "172.28.20.11", "head_host": "node1",
            "route": None, "reasons": [], "warnings": []}
    ib = {"env": {"NCCL_IB_DISABLE": "0" if ib_ports else "1"}, "ib_ports": ib_ports,
          "link_layers": ["InfiniBand"] if ib_ports else [], "hcas": [], "table": [],
          "reasons": [], "warnings": []}
    path.write_text(fabric_env.render_json(fabric_env.build_result(node, ib)))


def fake_sys(tmp_path: Path, netdevs: dict, ports: dict) -> Path:
    """A fake /sys: class/net/<dev>/operstate, class/infiniband/<hca>/ports/<n>/state."""
    root = tmp_path / "fake_sys"
    for dev, state in netdevs.items():
        (root / "class/net" / dev).mkdir(parents=True)
        (root / "class/net" / dev / "operstate").write_text(state + "\n")
    for port, state in ports.items():
        hca, num = port.split(":")
        d = root / "class/infiniband" / hca / "ports" / num
        d.mkdir(parents=True)
        (d / "state").write_text(state + "\n")
    return root


def test_links_are_the_ones_the_fabric_role_wrote(tmp_path):
    path = tmp_path / "fabric.json"
    write_fabric_json(path, "fab0", ["mlx5_0:1", "mlx5_1:1"])
    assert fabric_links(str(path)) == ("fab0", ["mlx5_0:1", "mlx5_1:1"])
    assert fabric_links(str(tmp_path / "absent.json")) is None  # a host without a fabric
    (tmp_path / "bad.json").write_text("{")
    assert fabric_links(str(tmp_path / "bad.json")) is None  # the fabric collector reports it


@pytest.mark.parametrize("operstate,port_state,want", [
    ("up", "4: ACTIVE", []),
    ("unknown", "4: ACTIVE", []),  # many drivers pass traffic in "unknown"
    ("down", "4: ACTIVE", ["fabric interface fab0 is down"]),
    ("lowerlayerdown", "4: ACTIVE", ["fabric interface fab0 is lowerlayerdown"]),
    ("up", "1: DOWN", ["IB port mlx5_1:1 is DOWN"]),
    ("up", "2: INIT", ["IB port mlx5_1:1 is INIT"]),
    ("DOWN", "1: DOWN", ["fabric interface fab0 is down", "IB port mlx5_1:1 is DOWN"]),
])
def test_each_down_state_is_named(tmp_path, operstate, port_state, want):
    root = fake_sys(tmp_path, {"fab0": operstate}, {"mlx5_0:1": "4: ACTIVE", "mlx5_1:1": port_state})
    assert links_down("fab0", ["mlx5_0:1", "mlx5_1:1"], str(root)) == want


def test_a_link_that_vanished_is_down(tmp_path):
    root = fake_sys(tmp_path, {}, {})
    assert links_down("fab0", ["mlx5_0:1"], str(root)) == ["fabric interface fab0 is gone",
                                                           "IB port mlx5_0:1 is gone"]


def test_the_real_sysfs():
    assert links_down("lo", []) == []  # loopback: "unknown", passes traffic
    missing = "fleetnone0"
    assert not Path("/sys/class/net", missing).exists()
    assert links_down(missing, []) == [f"fabric interface {missing} is gone"]


def test_a_down_link_is_a_host_problem_naming_host_and_link():
    got = host_problems("node2", "/x", [], [], 1000.0, 10.0, True,
                        links_down=["fabric interface eth1 is down"])
    assert [(p.reason, p.detail) for p in got] == [("fabric_link_down", "node2: fabric interface eth1 is down")]


def test_exporter_verdict_follows_the_link_state(tmp_path):
    """The exporter end to end: with fabric_link_check on, the verdict turns unhealthy the cycle
    after the link goes down and healthy again once it is back; off (a one-host replica), a down
    link is not its problem."""
    from vllm_fleet_exporter.collector import FleetExporter
    from vllm_fleet_exporter.config import load_config

    fabric = tmp_path / "fabric.json"
    write_fabric_json(fabric, "fab0", [])
    root = fake_sys(tmp_path, {"fab0": "up"}, {})
    base = ["--state-dir", str(tmp_path), "--nvml", "off", "--host", "node3", "--verdict",
            "--no-expect-engine", "--fabric-file", str(fabric), "--sys-root", str(root)]
    watched = FleetExporter(load_config(base + ["--fabric-link-check"]))
    unwatched = FleetExporter(load_config(base))
    watched.run_all_once()
    assert watched.verdict.latest().state == "healthy", watched.verdict.latest().summary()
    (root / "class/net/fab0/operstate").write_text("down\n")
    for exp in (watched, unwatched):
        exp.run_all_once()
    v = watched.verdict.latest()
    assert v.state == "unhealthy" and [p.reason for p in v.problems] == ["fabric_link_down"]
    assert "node3: fabric interface fab0 is down" in v.summary()
    assert unwatched.verdict.latest().state == "healthy"
    (root / "class/net/fab0/operstate").write_text("up\n")
    watched.run_all_once()
    assert watched.verdict.latest().state == "healthy"
    # a redeploy that moves the fabric to another interface: the new file is read, not a cached copy
    (root / "class/net/fabric9").mkdir()
    (root / "class/net/fabric9/operstate").write_text("down\n")
    write_fabric_json(fabric, "fabric9", [])
    watched.run_all_once()
    assert "node3: fabric interface fabric9 is down" in watched.verdict.latest().summary()
