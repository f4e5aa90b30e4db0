"""Fabric decisions (vllm_fleet.fabric_env, shared by the fabric role and the serving image).

Each fake /sys/class/infiniband layout has its expected NCCL variables spelled out here: a changed
decision fails a test. Interface choice is tested with canned `ip` output (by route, not name).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))

from ansible_adhoc import run_module  # noqa: E402
from fake_sysfs import FAKE_FABRIC_HOSTS, FAKE_IB_LAYOUTS, make_fake_infiniband  # noqa: E402

SYMLINK = REPO / "ansible" / "plugins" / "module_utils" / "fleet_fabric_env.py"
SOURCE = REPO / "images" / "vllm_fleet" / "src" / "vllm_fleet" / "fabric_env.py"


def _load():
    spec = importlib.util.spec_from_file_location("fleet_fabric_env_under_test", SYMLINK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fe = _load()

# --- canned `ip` output: management eth0 (default route), fabric eth1/fab0 -------------------------

HEAD_ADDR = (
    "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
    "20: eth0    inet 172.28.10.11/24 brd 172.28.10.255 scope global eth0\\       valid_lft forever\n"
    "22: eth1    inet 172.28.20.11/24 brd 172.28.20.255 scope global eth1\\       valid_lft forever\n"
    "3: docker0    inet 172.17.0.1/16 brd 172.17.255.255 scope global docker0\\       valid_lft forever\n")
WORKER_ADDR = (
    "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
    "20: eth0    inet 172.28.10.13/24 brd 172.28.10.255 scope global eth0\\       valid_lft forever\n"
    "22: fab0    inet 172.28.20.13/24 brd 172.28.20.255 scope global fab0\\       valid_lft forever\n")
DEFAULT = "default via 172.28.10.1 dev eth0 \n"
ROUTE_DIRECT = "172.28.20.11 dev fab0 src 172.28.20.13 uid 0 \n    cache \n"


def runner_for(addr: str, default: str = DEFAULT, routes: dict | None = None):
    routes = routes or {}

    def runner(argv):
        args = argv[1:]
        if args == ["-o", "-4", "addr", "show"]:
            return 0, addr, ""
        if args == ["-4", "route", "show", "default"]:
            return 0, default, ""
        if args[:2] == ["route", "get"]:
            if args[2] in routes:
                return 0, routes[args[2]], ""
            return 2, "", "RTNETLINK answers: Network is unreachable"
        raise AssertionError("unexpected ip call %r" % argv)
    return runner


def head_result(tmp_path, layout="none", **kw):
    root = make_fake_infiniband(tmp_path / ("head-" + layout), layout)
    return fe.detect(host="node1", role="head", interface=kw.pop("interface", "eth1"),
                     sysfs_root=str(root), runner=runner_for(HEAD_ADDR), **kw)


def worker_result(tmp_path, head, layout="none", routes=None, addr=WORKER_ADDR, default=DEFAULT, **kw):
    root = make_fake_infiniband(tmp_path / ("worker-" + layout), layout)
    return fe.detect(host="node3", role="worker", head_host="node1", head=head,
                     head_address=head["address"], sysfs_root=str(root),
                     runner=runner_for(addr, default, {"172.28.20.11": ROUTE_DIRECT} if routes is None else routes),
                     **kw)


def ib_env(result):
    return {k: v for k, v in result["env"].items() if k.startswith("NCCL_IB_")}


# --- the symlink and parsing ---------------------------------------------------------------------

def test_module_utils_is_a_relative_symlink_to_the_image_module():
    assert SYMLINK.is_symlink()
    assert not os.path.isabs(os.readlink(SYMLINK))
    assert SYMLINK.resolve() == SOURCE.resolve()


def test_fabric_env_is_stdlib_only():
    text = SOURCE.read_text()
    imports = {line.split()[1].split(".")[0] for line in text.splitlines()
               if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "ipaddress", "json", "os", "re", "subprocess", "typing"}


def test_parse_route_get_direct_gateway_local():
    assert fe.parse_route_get(ROUTE_DIRECT) == {
        "type": "unicast", "dst": "172.28.20.11", "gateway": None, "dev": "fab0", "src": "172.28.20.13"}
    via = fe.parse_route_get("10.1.2.3 via 172.28.10.1 dev eth0 src 172.28.10.13 uid 1000")
    assert (via["gateway"], via["dev"], via["src"]) == ("172.28.10.1", "eth0", "172.28.10.13")
    assert fe.parse_route_get("local 172.28.20.11 dev lo src 172.28.20.11 uid 0")["type"] == "local"


def test_parse_addr_show_strips_peer_suffix_and_skips_host_scope():
    addrs = fe.parse_addr_show(HEAD_ADDR + "9: eth2@if10    inet 10.0.0.2/24 scope global eth2\\ x\n")
    assert addrs == {"eth0": ["172.28.10.11/24"], "eth1": ["172.28.20.11/24"],
                     "docker0": ["172.17.0.1/16"], "eth2": ["10.0.0.2/24"]}
    assert fe.parse_default_routes(DEFAULT) == [{"gateway": "172.28.10.1", "dev": "eth0"}]


# --- at least 6 fake /sys/class/infiniband layouts, each with its expected NCCL variables ---------

IB_EXPECTED = {
    "none": {"NCCL_IB_DISABLE": "1"},
    "ib_single": {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "=mlx5_0:1"},
    "roce_v2": {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "=mlx5_0:1", "NCCL_IB_GID_INDEX": "3"},
    "ib_port_down": {"NCCL_IB_DISABLE": "1"},
    "two_hcas": {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "=mlx5_0:1,mlx5_1:1"},
    "two_hcas_one_down": {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "=mlx5_0:1"},
    "names_node_a": {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "=mlx5_0:1,mlx5_1:1"},
    "names_node_b": {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "=ibp12s0:1,mlx5_4:1"},
    "roce_mixed_gid": {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "=mlx5_0:1,mlx5_1:1",
                       "NCCL_IB_ROCE_VERSION_NUM": "2"},
}


def test_every_layout_has_an_expectation():
    assert set(IB_EXPECTED) | {"roce_no_ip"} == set(FAKE_IB_LAYOUTS)
    assert len(IB_EXPECTED) >= 6


@pytest.mark.parametrize("layout", sorted(IB_EXPECTED))
def test_ib_layout_gives_expected_nccl_variables(tmp_path, layout):
    result = head_result(tmp_path, layout)
    assert ib_env(result) == IB_EXPECTED[layout]
    # the socket side never depends on the HCAs
    assert result["env"]["NCCL_SOCKET_IFNAME"] == "=eth1"
    assert result["env"]["GLOO_SOCKET_IFNAME"] == "eth1"


def test_read_infiniband_reads_states_layers_and_gid_types(tmp_path):
    hcas = fe.read_infiniband(str(make_fake_infiniband(tmp_path, "roce_v2")))
    port = hcas[0]["ports"][0]
    assert (hcas[0]["name"], port["port"], port["state"], port["link_layer"]) == ("mlx5_0", 1, "ACTIVE", "Ethernet")
    assert [(g["index"], g["type"]) for g in port["gids"]] == [
        (0, "IB/RoCE v1"), (1, "RoCE v2"), (2, "IB/RoCE v1"), (3, "RoCE v2")]  # zero GIDs skipped
    assert fe.select_gid_index(port)[0] == 3


def test_down_port_with_nccl_ib_on_fails_naming_host_and_variable(tmp_path):
    with pytest.raises(fe.FabricError, match=r"host node1: fleet_nccl_ib=on .*mlx5_0 port 1 DOWN"):
        head_result(tmp_path, "ib_port_down", nccl_ib="on")


def test_roce_port_without_ipv4_gid_fails(tmp_path):
    with pytest.raises(fe.FabricError, match=r"host node1: RoCE port mlx5_0:1 has no usable RoCE GID"):
        head_result(tmp_path, "roce_no_ip")


def test_nccl_ib_off_wins_over_active_hcas(tmp_path):
    result = head_result(tmp_path, "two_hcas", nccl_ib="off")
    assert ib_env(result) == {"NCCL_IB_DISABLE": "1"}
    assert "IB disabled by fleet_nccl_ib=off" in result["reasons"]


def test_nccl_ib_hca_override_wins(tmp_path):
    result = head_result(tmp_path, "two_hcas", ib_hca="=mlx5_1:1")
    assert ib_env(result) == {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "=mlx5_1:1"}
    missing = head_result(tmp_path / "b", "none", ib_hca="mlx5_9:1")
    assert ib_env(missing)["NCCL_IB_HCA"] == "mlx5_9:1"
    assert any("mlx5_9" in w for w in missing["warnings"])


# --- head/worker agreement ---------------------------------------------------------------------

def test_different_hca_names_per_node_each_get_their_own(tmp_path):
    head = head_result(tmp_path, "names_node_a")
    worker = worker_result(tmp_path, head, "names_node_b")
    assert ib_env(head)["NCCL_IB_HCA"] == "=mlx5_0:1,mlx5_1:1"
    assert ib_env(worker)["NCCL_IB_HCA"] == "=ibp12s0:1,mlx5_4:1"


def test_ib_on_head_but_not_on_worker_fails_naming_both(tmp_path):
    head = head_result(tmp_path, "ib_single")
    with pytest.raises(fe.FabricError, match=r"host node3: its head node1 uses InfiniBand/RoCE but this host"):
        worker_result(tmp_path, head, "ib_port_down")
    with pytest.raises(fe.FabricError, match=r"host node3: fleet_nccl_ib=off but its head node1 uses"):
        worker_result(tmp_path / "off", head, "ib_single", nccl_ib="off")


def test_worker_auto_follows_a_head_without_ib(tmp_path):
    head = head_result(tmp_path, "none")
    worker = worker_result(tmp_path, head, "ib_single")
    assert ib_env(worker) == {"NCCL_IB_DISABLE": "1"}
    assert any("head node1 does not use" in r for r in worker["reasons"])
    with pytest.raises(fe.FabricError, match=r"host node3: fleet_nccl_ib=on requires .* head node1"):
        worker_result(tmp_path / "on", head, "ib_single", nccl_ib="on")


# --- interface by route ------------------------------------------------------------------------

def test_worker_picks_the_interface_routing_to_the_head_not_by_name(tmp_path):
    head = head_result(tmp_path)
    worker = worker_result(tmp_path, head)
    assert (worker["interface"], worker["address"]) == ("fab0", "172.28.20.13")
    assert worker["env"] == {"NCCL_SOCKET_IFNAME": "=fab0", "GLOO_SOCKET_IFNAME": "fab0",
                             "VLLM_HOST_IP": "172.28.20.13", "FLEET_RAY_NODE_IP": "172.28.20.13",
                             "NCCL_IB_DISABLE": "1"}
    assert worker["warnings"] == []


def test_head_without_interface_uses_its_only_non_default_route_interface(tmp_path):
    head = head_result(tmp_path, interface="")  # docker0 is ignored as virtual
    assert (head["interface"], head["address"]) == ("eth1", "172.28.20.11")


def test_head_with_two_candidates_asks_for_fleet_fabric_interface(tmp_path):
    addr = HEAD_ADDR + "23: eth2    inet 10.9.0.11/24 brd 10.9.0.255 scope global eth2\\ x\n"
    with pytest.raises(fe.FabricError, match=r"host node1 \(head\): .*2 non-default-route.*eth1, eth2.*"
                                             r"set fleet_fabric_interface"):
        fe.detect(host="node1", role="head", sysfs_root=str(tmp_path), runner=runner_for(addr))


def test_head_interface_that_does_not_exist_fails(tmp_path):
    with pytest.raises(fe.FabricError, match=r"host node1: fleet_fabric_interface='ens9' has no global IPv4"):
        head_result(tmp_path, interface="ens9")


def test_route_via_management_default_gateway_fails(tmp_path):
    head = head_result(tmp_path)
    routes = {"172.28.20.11": "172.28.20.11 via 172.28.10.1 dev eth0 src 172.28.10.13 uid 0\n"}
    addr = WORKER_ADDR.replace("172.28.20.13/24", "172.28.30.13/24")
    with pytest.raises(fe.FabricError, match=r"host node3: .*default gateway 172.28.10.1 on eth0 instead of a "
                                             r"directly connected"):
        worker_result(tmp_path, head, routes=routes, addr=addr)


def test_routed_fabric_needs_allow_routed(tmp_path):
    head = head_result(tmp_path)
    routes = {"172.28.20.11": "172.28.20.11 via 172.28.30.1 dev fab0 src 172.28.30.13 uid 0\n"}
    addr = WORKER_ADDR.replace("172.28.20.13/24", "172.28.30.13/24")
    with pytest.raises(fe.FabricError, match=r"fabric_allow_routed"):
        worker_result(tmp_path, head, routes=routes, addr=addr)
    ok = worker_result(tmp_path / "b", head, routes=routes, addr=addr, allow_routed=True)
    assert (ok["interface"], ok["address"], ok["route"]["gateway"]) == ("fab0", "172.28.30.13", "172.28.30.1")


def test_no_route_to_head_fails_naming_host_and_head(tmp_path):
    head = head_result(tmp_path)
    with pytest.raises(fe.FabricError, match=r"host node3: no route to head node1's fabric address 172.28.20.11"):
        worker_result(tmp_path, head, routes={})


def test_worker_override_wins_with_a_warning(tmp_path):
    head = head_result(tmp_path)
    addr = WORKER_ADDR + "24: ens2    inet 172.28.20.99/24 scope global ens2\\ x\n"
    result = worker_result(tmp_path, head, addr=addr, interface="ens2")
    assert (result["interface"], result["address"]) == ("ens2", "172.28.20.99")
    assert any("overrides fab0" in w for w in result["warnings"])


def test_rendered_files(tmp_path):
    head = head_result(tmp_path, "roce_v2")
    env_text = fe.render_env_file(head)
    assert env_text.splitlines()[1:] == [
        "NCCL_SOCKET_IFNAME==eth1", "GLOO_SOCKET_IFNAME=eth1", "VLLM_HOST_IP=172.28.20.11",
        "FLEET_RAY_NODE_IP=172.28.20.11", "NCCL_IB_DISABLE=0", "NCCL_IB_HCA==mlx5_0:1", "NCCL_IB_GID_INDEX=3"]
    assert fe.render_nccl_conf(head).splitlines()[1:] == [
        "NCCL_SOCKET_IFNAME==eth1", "NCCL_IB_DISABLE=0", "NCCL_IB_HCA==mlx5_0:1", "NCCL_IB_GID_INDEX=3"]
    assert json.loads(fe.render_json(head))["env"] == head["env"]
    assert fe.render_json(head) == fe.render_json(head_result(tmp_path / "again", "roce_v2"))  # idempotent
    path = tmp_path / "fabric.env"
    path.write_text(env_text)
    assert fe.load_env_file(str(path)) == head["env"]
    assert fe.load_env_file(str(tmp_path / "missing.env")) == {}


# --- whole server layouts: the expert's choice, written next to each fake tree -------------------

def server_result(tmp_path, name):
    spec = FAKE_FABRIC_HOSTS[name]
    root = make_fake_infiniband(tmp_path / name, spec["ib"])
    return fe.detect(host="node1", role="head", interface=spec["interface"], dedicated=spec.get("dedicated", False),
                     rdma_subnets=spec.get("rdma_subnets", []), sysfs_root=str(root),
                     runner=runner_for(spec["addr"], spec["default"]))


SERVED = sorted(n for n, spec in FAKE_FABRIC_HOSTS.items() if "error" not in spec["expect"])
REFUSED = sorted(n for n, spec in FAKE_FABRIC_HOSTS.items() if "error" in spec["expect"])


def test_at_least_eight_server_layouts_each_with_a_reason():
    assert len(FAKE_FABRIC_HOSTS) >= 8
    assert all(spec["model"] and spec["why"] and spec["expect"] for spec in FAKE_FABRIC_HOSTS.values())


@pytest.mark.parametrize("name", SERVED)
def test_server_layout_gets_the_experts_nccl_settings(tmp_path, name):
    expect = FAKE_FABRIC_HOSTS[name]["expect"]
    result = server_result(tmp_path, name)
    env = result["env"]
    assert (result["interface"], env["NCCL_SOCKET_IFNAME"], env["GLOO_SOCKET_IFNAME"]) == (
        expect["socket"], "=" + expect["socket"], expect["socket"])
    assert env.get("NCCL_IB_HCA") == expect["NCCL_IB_HCA"]
    assert env["NCCL_IB_DISABLE"] == ("1" if expect["NCCL_IB_HCA"] is None else "0")
    assert env.get("NCCL_IB_GID_INDEX") == expect["NCCL_IB_GID_INDEX"]
    rows = {"%s:%s" % (r["hca"], r["port"]): r for r in result["ib"]["table"]}
    assert len(rows) == sum(len([k for k in ports if isinstance(k, int)])
                            for ports in FAKE_FABRIC_HOSTS[name]["ib"].values()), "one table row per port"
    for port, words in expect["rows"].items():
        assert words in rows[port]["why"], (port, rows[port])
    used = sorted(p for p, r in rows.items() if r["used"])
    assert used == sorted(p.lstrip("=") for p in (expect["NCCL_IB_HCA"] or "").split(",") if p)
    wanted = expect.get("warnings", [])
    assert len(result["warnings"]) == len(wanted), result["warnings"]
    assert all(re.search(p, w) for p, w in zip(wanted, result["warnings"])), result["warnings"]


@pytest.mark.parametrize("name", REFUSED)
def test_server_layout_that_must_stop_the_deploy_names_host_and_cause(tmp_path, name):
    with pytest.raises(fe.FabricError, match=FAKE_FABRIC_HOSTS[name]["expect"]["error"]):
        server_result(tmp_path, name)


def test_decision_table_shows_every_port_with_used_or_why_not(tmp_path):
    text = fe.render_table(server_result(tmp_path, "dgx_8ib_rails_roce_mgmt"))
    lines = text.splitlines()
    assert lines[0] == ("node1 (head): sockets on ibp24s0 172.16.0.21 (172.16.0.0/16); NCCL_IB_HCA="
                        "=mlx5_0:1,mlx5_1:1,mlx5_2:1,mlx5_3:1,mlx5_4:1,mlx5_5:1,mlx5_6:1,mlx5_7:1")
    assert lines[1].split() == ["HCA", "PORT", "STATE", "LINK", "NETDEV", "SUBNET", "GID", "USED"]
    assert lines[2].split() == ["mlx5_0", "1", "ACTIVE", "InfiniBand", "ibp24s0", "172.16.0.0/16", "-",
                                "yes:", "ACTIVE", "InfiniBand"]
    assert lines[3].split()[:7] == ["mlx5_1", "1", "ACTIVE", "InfiniBand", "ibp64s0", "-", "-"]
    assert lines[10].split()[:7] == ["mlx5_8", "1", "ACTIVE", "Ethernet", "enp170s0f0np0", "10.0.0.0/24", "3"]
    assert lines[10].endswith("no: netdev enp170s0f0np0 carries the default route (management)")
    assert len(lines) == 11
    assert fe.render_table(head_result(tmp_path / "none")).splitlines()[1] == \
        "  no RDMA device under /sys/class/infiniband"


def test_worker_whose_route_to_the_head_is_on_the_management_nic_is_refused_unless_dedicated(tmp_path):
    """One network for everything: the head's fabric address is reached directly on eth0, which also
    carries the default route (issue 15 item 6)."""
    head = {"address": "172.28.10.11", "env": {"NCCL_IB_DISABLE": "1"}}
    routes = {"172.28.10.11": "172.28.10.11 dev eth0 src 172.28.10.13 uid 0\n"}
    with pytest.raises(fe.FabricError, match=r"host node3: fabric interface eth0 \(routes to head node1\) carries "
                                             r"the default route \(default via 172.28.10.1 dev eth0\)"):
        worker_result(tmp_path, head, routes=routes)
    ok = worker_result(tmp_path / "dedicated", head, routes=routes, dedicated=True)
    assert (ok["interface"], ok["address"]) == ("eth0", "172.28.10.13")
    assert any("fleet_fabric_dedicated=true" in w for w in ok["warnings"])


# --- the module through ansible's real invocation --------------------------------------------------

def test_fleet_fabric_facts_module_smoke(tmp_path):
    root = make_fake_infiniband(tmp_path / "sys", "roce_v2")
    data = tmp_path / "ip.json"
    data.write_text(json.dumps({"addr": WORKER_ADDR, "default": DEFAULT, "routes": {"172.28.20.11": ROUTE_DIRECT}}))
    head = {"address": "172.28.20.11", "env": {"NCCL_IB_DISABLE": "0"}, "ib": {"link_layers": ["Ethernet"]}}
    args = {"host": "node3", "role": "worker", "head_host": "node1", "head": head,
            "sysfs_root": str(root), "ip_command": str(FIXTURES / "stub_ip")}
    result = run_module("fleet_fabric_facts", args, env={"STUB_IP_DATA": str(data)})
    assert not result.get("failed"), result
    assert result["changed"] is False
    assert result["fabric"]["env"]["NCCL_SOCKET_IFNAME"] == "=fab0"
    assert result["fabric"]["env"]["NCCL_IB_GID_INDEX"] == "3"
    assert result["summary"].startswith("node3 (worker): fab0 172.28.20.13 -> head 172.28.20.11; IB =mlx5_0:1")

    failed = run_module("fleet_fabric_facts", dict(args, head=dict(head, address="172.28.99.1")),
                        env={"STUB_IP_DATA": str(data)})
    assert failed["failed"] and "host node3: no route to head node1" in failed["msg"]


# --- the one reader of fabric.env (filters fleet_fabric_env, fleet_fabric_node_ip) -----------------

def _filters():
    path = REPO / "ansible" / "plugins" / "filter" / "fleet_fabric.py"
    spec = importlib.util.spec_from_file_location("fleet_fabric_filters_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FilterModule().filters()


# The roles' Jinja before issue 19 (ray_cluster, vllm_serve, firewall, model fanout).
OLD_REGEX = r"(?m)^ *([A-Za-z_][A-Za-z0-9_]*) *=(.*)$"


def test_one_reader_reads_what_the_role_writes(tmp_path):
    head = head_result(tmp_path, "roce_v2")
    text = fe.render_env_file(head)
    filters = _filters()
    env = filters["fleet_fabric_env"](text)
    assert env == head["env"] == fe.parse_env_text(text) == dict(re.findall(OLD_REGEX, text))
    assert env["NCCL_SOCKET_IFNAME"] == "=eth1", "NCCL's exact-match '=' stays in the value"
    assert filters["fleet_fabric_node_ip"](env) == "172.28.20.11" == fe.node_ip(env)
    assert fe.parse_env_text(text.replace("\n", "\r\n")) == env
    assert filters["fleet_fabric_env"]("") == {} and filters["fleet_fabric_env"](None) == {}


def test_node_address_order():
    assert fe.NODE_IP_KEYS == ("FLEET_RAY_NODE_IP", "VLLM_HOST_IP")
    ip = _filters()["fleet_fabric_node_ip"]
    assert ip({"FLEET_RAY_NODE_IP": "10.0.0.1", "VLLM_HOST_IP": "10.0.0.2"}) == "10.0.0.1"
    assert ip({"VLLM_HOST_IP": "10.0.0.2"}) == "10.0.0.2"
    assert ip({"FLEET_RAY_NODE_IP": "", "VLLM_HOST_IP": "10.0.0.2"}) == "10.0.0.2"
    assert ip({"NCCL_IB_DISABLE": "1"}) == "" == ip({}) == ip(None)
