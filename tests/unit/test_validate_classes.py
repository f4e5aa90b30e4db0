"""Whole classes of bad inventories are refused before any host is contacted (issue 17).

Each case is an inventory as an operator would write it, with one slip. Every case runs the real
`ansible-playbook` on the validate playbook (the first play deploy.yml imports; its second play,
the SSH pre-flight, would contact the hosts) against TEST-NET-1 addresses (192.0.2.0/24, RFC 5737,
routed nowhere): the run must end with a non-zero exit before the pre-flight play starts, the
output must hold one line naming the host (or the inventory line), the variable and the value,
and no Python exception text. The cases run a few at a time (tests/unit/validate_runs.py), each
in its own process.

Classes (issue 17): 1 inventory parse slips and empty groups, 2 ranges/units/cross-setting rules,
3 replica and balancer consistency, 4 hand-set NCCL/Gloo/Ray settings and extra args, 5
connection variables and templates. The README's check-first command (deploy.yml --tags validate)
is run on a few of them too.
"""
from __future__ import annotations

import re

import pytest

from tests.unit.validate_runs import DEPLOY, VALIDATE, run_all, run_playbook, selected_cases

BASE = """\
# Two hosts with 4 GPUs each, TP=4 x PP=2 (inventory.example.ini's shape), on TEST-NET-1.
[fleet_head]
gpu-a ansible_host=192.0.2.1

[fleet_workers]
gpu-b ansible_host=192.0.2.2

[fleet_serving:children]
fleet_head
fleet_workers

[fleet_monitoring]
gpu-a

[fleet_loadbalancer]

[fleet_serving:vars]
fleet_engine=cuda
fleet_gpus_per_node=4

[all:vars]
ansible_user=ops
fleet_deployment=qwen32b
fleet_model_path=/data/models/qwen
fleet_served_model_name=qwen
fleet_tensor_parallel_size=4
fleet_pipeline_parallel_size=2
fleet_fabric_interface=ens1f0
"""

# Two one-host replicas behind a balancer (TP=4 inside each host).
BALANCED = """\
[fleet_head]
gpu-a ansible_host=192.0.2.1 fleet_replica=r1
gpu-c ansible_host=192.0.2.3 fleet_replica=r2

[fleet_workers]

[fleet_serving:children]
fleet_head
fleet_workers

[fleet_loadbalancer]
lb ansible_host=192.0.2.9 fleet_gpu_less=True

[fleet_serving:vars]
fleet_engine=cuda
fleet_gpus_per_node=4

[all:vars]
fleet_deployment=qwen32b
fleet_model_path=/data/models/qwen
fleet_served_model_name=qwen
fleet_tensor_parallel_size=4
fleet_api_key=longenough-key-1
"""


# A spare host for replica main (group fleet_spare), with the serving hosts' group vars.
SPARE_GROUP = "[fleet_spare]\n"
SPARE_VARS = "[fleet_spare:vars]\nfleet_engine=cuda\nfleet_gpus_per_node=4"


def edit(old: str, new: str, base: str = BASE) -> str:
    assert base.count(old) == 1, old
    return base.replace(old, new)


def host(name: str, extra: str, base: str = BASE) -> str:
    """Append key=value pairs to a host's line in its own group."""
    line = next(l for l in base.splitlines() if l.startswith(name + " ansible_host="))
    return edit(line + "\n", f"{line} {extra}\n", base)


def allvars(extra: str, base: str = BASE) -> str:
    return base.rstrip("\n") + "\n" + extra + "\n"


def problem(hostname: str, variable: str, value: str, reason: str) -> str:
    """The one line the validator prints for a problem (value as Python's repr, a prefix of it)."""
    return rf"host {re.escape(hostname)}: {re.escape(variable)}={re.escape(value)}.*{re.escape(reason)}"


def slip(text: str, reason: str) -> str:
    """The one line the inventory parser prints: <file>:<line>: '<text>': <reason>."""
    return rf"inventory\.ini:\d+: {re.escape(repr(text))}: .*{re.escape(reason)}"


CASES = [
    # --- 1: parse slips are errors; empty serving groups fail ----------------------------------
    ("yaml-key-in-vars", 1, edit("fleet_gpus_per_node=4", "fleet_gpus_per_node: 4"),
     slip("fleet_gpus_per_node: 4", "YAML-style 'key: value'")),
    ("yaml-key-on-host-line", 1, edit("gpu-b ansible_host=192.0.2.2", "gpu-b ansible_host: 192.0.2.2"),
     slip("gpu-b ansible_host: 192.0.2.2", "YAML-style 'key: value'")),
    ("header-without-bracket", 1, edit("[fleet_workers]", "[fleet_workers"),
     slip("[fleet_workers", "not a section header")),
    ("header-unknown-type", 1, edit("[fleet_serving:vars]", "[fleet_serving:var]"),
     slip("[fleet_serving:var]", "unknown section type 'var'")),
    ("group-name-with-dash", 1, edit("[fleet_workers]", "[fleet-workers]"),
     slip("[fleet-workers]", "did you mean [fleet_workers]?")),
    ("vars-without-vars-header", 1, edit("[fleet_serving:vars]", "[fleet_serving]"),
     slip("fleet_engine=cuda", "variables of the group go under [fleet_serving:vars]")),
    ("inline-comment-in-value", 1, edit("fleet_fabric_interface=ens1f0", "fleet_fabric_interface=ens1f0  # fabric NIC"),
     slip("fleet_fabric_interface=ens1f0  # fabric NIC", "would include the comment")),
    ("group-header-typo", 1, edit("[fleet_head]", "[fleet_haed]"),
     slip("fleet_head", "group 'fleet_head' has no [fleet_head] section in this file (is [fleet_haed] a typo")),
    ("group-header-typo-unreferenced", 1, edit("[fleet_monitoring]", "[fleet_monitorng]"),
     problem("(inventory)", "group", "'fleet_monitorng'", "did you mean fleet_monitoring?")),
    ("serving-children-missing", 1, edit("[fleet_serving:children]\nfleet_head\nfleet_workers\n", "").replace(
        "[fleet_serving:vars]", "[fleet_workers:vars]"),
     problem("(inventory)", "fleet_serving", "[]", "does not hold gpu-a, gpu-b")),
    ("no-host-at-all", 1, edit("gpu-a ansible_host=192.0.2.1", "# gpu-a ansible_host=192.0.2.1",
                               edit("gpu-b ansible_host=192.0.2.2", "# gpu-b ansible_host=192.0.2.2")
                               ).replace("[fleet_monitoring]\ngpu-a", "[fleet_monitoring]"),
     problem("(inventory)", "hosts", "[]", "the inventory has no host at all")),
    ("host-before-any-section", 1, "gpu-z ansible_host=192.0.2.7\n" + BASE,
     problem("gpu-z", "groups", "[]", "is in no group")),

    # --- 2: every setting's type, range and unit; cross-setting rules ---------------------------
    ("health-interval-zero", 2, allvars("exporter_health_interval=0"),
     problem("gpu-a", "exporter_health_interval", "0", "more than 0 seconds (0 would probe /health in a busy loop)")),
    ("scrape-interval-zero", 2, allvars("monitoring_scrape_interval=0s"),
     problem("gpu-a", "monitoring_scrape_interval", "'0s'", "Prometheus duration more than 0")),
    ("scrape-interval-no-unit", 2, allvars("monitoring_scrape_interval=15"),
     problem("gpu-a", "monitoring_scrape_interval", "15", "is not a Prometheus duration")),
    ("haproxy-timeout-without-unit", 2, allvars("loadbalancer_timeout_server=900"),
     problem("gpu-a", "loadbalancer_timeout_server", "900", "HAProxy reads a bare number as milliseconds")),
    ("haproxy-check-interval-zero", 2, allvars("loadbalancer_check_interval=0s"),
     problem("gpu-a", "loadbalancer_check_interval", "'0s'", "busy loop")),
    ("nofile-too-low", 2, allvars("host_tuning_nofile=1024"),
     problem("gpu-b", "host_tuning_nofile", "1024", "between 65536 and")),
    ("memlock-zero", 2, allvars("host_tuning_memlock=0"),
     problem("gpu-a", "host_tuning_memlock", "0", "at least 64 KiB or 'unlimited'")),
    ("shm-size-without-unit", 2, allvars("fleet_container_shm_size=16"),
     problem("gpu-a", "fleet_container_shm_size", "16", "a bare number is bytes")),
    ("shm-size-too-small", 2, allvars("fleet_container_shm_size=1m"),
     problem("gpu-b", "fleet_container_shm_size", "'1m'", "at least 67108864")),
    ("fabric-check-size-unit", 2, allvars("vllm_serve_fabric_check_max_size=1MB"),
     problem("gpu-a", "vllm_serve_fabric_check_max_size", "'1MB'", "is not a size with a unit")),
    ("build-host-not-in-inventory", 2, allvars("image_build_host=gpu-q"),
     problem("gpu-a", "image_build_host", "'gpu-q'", "is not a host of this inventory")),
    ("model-source-missing", 2, allvars("fleet_model_source=/nonexistent/vllm-fleet-model"),
     problem("gpu-a", "fleet_model_source", "'/nonexistent/vllm-fleet-model'", "does not exist on the controller")),
    ("scrape-timeout-over-interval", 2, allvars("monitoring_scrape_timeout=30s"),
     problem("gpu-a", "monitoring_scrape_timeout", "'30s'", "longer than monitoring_scrape_interval=10s")),
    ("expected-nodes-zero", 2, allvars("exporter_ray_expected_nodes=0"),
     problem("gpu-a", "exporter_ray_expected_nodes", "0", "must be -1 or at least 1")),
    ("process-pattern-not-regex", 2, host("gpu-b", """exporter_processes='[{"name": "engine", "pattern": "(vllm"}]'"""),
     problem("gpu-b", "exporter_processes", "[{'name': 'engine'", "pattern: is not a regular expression")),
    ("ray-memory-without-unit", 2, host("gpu-b", "ray_cluster_memory=2"),
     problem("gpu-b", "ray_cluster_memory", "2", "a bare number is bytes")),

    # --- 3: replica and balancer consistency --------------------------------------------------
    ("ray-port-differs-in-replica", 3, host("gpu-b", "fleet_ray_port=6390"),
     problem("gpu-b", "fleet_ray_port", "6390", "differs from the head gpu-a (6379)")),
    ("deployment-differs-in-replica", 3, host("gpu-b", "fleet_deployment=qwen32b-test"),
     problem("gpu-b", "fleet_deployment", "'qwen32b-test'", "differs from the head gpu-a ('qwen32b')")),
    ("model-path-differs-in-replica", 3, host("gpu-b", "fleet_model_path=/srv/models/qwen"),
     problem("gpu-b", "fleet_model_path", "'/srv/models/qwen'", "differs from the head gpu-a")),
    ("engine-differs-in-replica", 3, host("gpu-b", "fleet_engine=cpu"),
     problem("gpu-b", "fleet_engine", "'cpu'", "differs from the head gpu-a ('cuda')")),
    ("balancer-model-names-differ", 3, host("gpu-c", "fleet_served_model_name=qwen-b", BALANCED),
     problem("gpu-c", "fleet_served_model_name", "'qwen-b'", "differs from replica 'r1' (head gpu-a: 'qwen')")),
    ("balancer-api-keys-differ", 3, host("gpu-c", "fleet_api_key=other-key-2", BALANCED),
     problem("gpu-c", "fleet_api_key", "'(hidden)'", "behind the same balancer (lb)")),
    ("same-machine-two-names", 3, edit("[fleet_monitoring]\ngpu-a", "[fleet_monitoring]\nmon-1 ansible_host=192.0.2.1"),
     problem("mon-1", "ansible_host", "'192.0.2.1'", "same address and port as host gpu-a") + "|"
     + problem("gpu-a", "ansible_host", "'192.0.2.1'", "same address and port as host mon-1")),
    ("name-resolves-to-another-host", 3,
     edit("[fleet_monitoring]\ngpu-a", "[fleet_monitoring]\nmon-1 ansible_host=127.0.0.1\nlocalhost"),
     problem("localhost", "ansible_host", "(not set)", "resolves to 127.0.0.1, the address of host mon-1")),
    ("name-does-not-resolve", 3, edit("[fleet_monitoring]\ngpu-a", "[fleet_monitoring]\ngpu-mon.invalid"),
     problem("gpu-mon.invalid", "ansible_host", "(not set)", "does not resolve on the controller")),
    ("host-two-lines-two-values", 3, edit("[fleet_monitoring]\ngpu-a", "[fleet_monitoring]\ngpu-a ansible_host=192.0.2.11"),
     slip("gpu-a ansible_host=192.0.2.11", "ansible_host=192.0.2.11 here but ansible_host=192.0.2.1 on line 3")),
    ("registry-group-two-hosts", 3, allvars("[fleet_registry]\ngpu-a\ngpu-b"),
     problem("(inventory)", "fleet_registry", "['gpu-a', 'gpu-b']", "holds more than one host")),
    ("registry-and-image-registry", 3, allvars("image_registry=registry.example:5000/ml\n[fleet_registry]\ngpu-a"),
     problem("gpu-a", "image_registry", "'registry.example:5000/ml'", "or the in-fleet one ([fleet_registry]), not both")),
    ("spare-also-a-worker", 3, allvars("[fleet_spare]\ngpu-b"),
     problem("gpu-b", "groups", "'fleet_spare'", "is a spare and a serving host")),
    ("spare-of-no-replica", 3, allvars(f"{SPARE_GROUP}gpu-s ansible_host=192.0.2.7 fleet_replica=r9\n{SPARE_VARS}"),
     problem("gpu-s", "fleet_replica", "'r9'", "names no replica of the serving hosts (main)")),
    ("spare-without-serving-vars", 3, allvars(f"{SPARE_GROUP}gpu-s ansible_host=192.0.2.7"),
     problem("gpu-s", "fleet_gpus_per_node", "0", "must be at least 1 on a serving host of the cuda engine")),
    ("spare-tp-does-not-fit", 3, allvars(f"{SPARE_GROUP}gpu-s ansible_host=192.0.2.7 fleet_gpus_per_node=2\n"
                                         "[fleet_spare:vars]\nfleet_engine=cuda"),
     problem("gpu-s", "fleet_tensor_parallel_size", "4", "is larger than this node's 2 (fleet_gpus_per_node)")),
    ("registry-address-not-an-ip", 2, allvars("[fleet_registry]\ngpu-a\n[fleet_registry:vars]\nfleet_registry_address=gpu-a.lan"),
     problem("gpu-a", "fleet_registry_address", "'gpu-a.lan'", "is not an IP address")),

    # --- 4: hand-set NCCL/Gloo/Ray settings, free-form args, interface values -----------------
    ("env-nccl-socket-ifname", 4, host("gpu-b", """vllm_serve_env='{"NCCL_SOCKET_IFNAME": "eth0"}'"""),
     problem("gpu-b", "vllm_serve_env", "{'NCCL_SOCKET_IFNAME': 'eth0'}", "set fleet_fabric_interface instead")),
    ("env-gloo-socket-ifname", 4, allvars("""vllm_serve_env={"GLOO_SOCKET_IFNAME": "ens1f0"}"""),
     problem("gpu-a", "vllm_serve_env", "{'GLOO_SOCKET_IFNAME'", "set fleet_fabric_interface instead")),
    ("env-nccl-ib-hca", 4, host("gpu-a", """vllm_serve_env='{"NCCL_IB_HCA": "mlx5_0"}'"""),
     problem("gpu-a", "vllm_serve_env", "{'NCCL_IB_HCA': 'mlx5_0'}", "set fleet_nccl_ib_hca instead")),
    ("env-ray-address", 4, host("gpu-a", """vllm_serve_env='{"RAY_ADDRESS": "192.0.2.1:6379"}'"""),
     problem("gpu-a", "vllm_serve_env", "{'RAY_ADDRESS'", "RAY_ADDRESS is computed by the fleet")),
    ("env-value-not-a-string", 4, host("gpu-b", """vllm_serve_env='{"OMP_NUM_THREADS": 4}'"""),
     problem("gpu-b", "vllm_serve_env", "{'OMP_NUM_THREADS': 4}", "must be a string (quote it: '4')")),
    ("extra-arg-dtype", 4, allvars("fleet_extra_args=['--dtype=half']"),
     problem("gpu-a", "fleet_extra_args", "['--dtype=half']", "use fleet_dtype")),
    ("extra-arg-with-space", 4, allvars("fleet_extra_args=['--max-model-len 8192']"),
     problem("gpu-a", "fleet_extra_args", "['--max-model-len 8192']", "use fleet_max_model_len")),
    ("extra-arg-underscores", 4, allvars("fleet_extra_args=['--max_model_len', '8192']"),
     problem("gpu-b", "fleet_extra_args", "['--max_model_len', '8192']", "use fleet_max_model_len")),
    ("extra-arg-flag-and-value-in-one", 4, allvars("fleet_extra_args=['--kv-cache-dtype fp8']"),
     problem("gpu-a", "fleet_extra_args", "['--kv-cache-dtype fp8']", "one argument with a space in it")),
    ("interface-is-an-address", 4, host("gpu-b", "fleet_fabric_interface=10.10.0.5"),
     problem("gpu-b", "fleet_fabric_interface", "'10.10.0.5'", "is an address, not an interface name")),
    ("interface-is-loopback", 4, host("gpu-a", "fleet_fabric_interface=lo"),
     problem("gpu-a", "fleet_fabric_interface", "'lo'", "loopback")),
    ("interface-is-a-list", 4, edit("fleet_fabric_interface=ens1f0", "fleet_fabric_interface=ens1f0,ens1f1"),
     problem("gpu-a", "fleet_fabric_interface", "'ens1f0,ens1f1'", "names one interface")),
    ("hca-is-a-netdev", 4, allvars("fleet_nccl_ib_hca=ib0,ib1"),
     problem("gpu-a", "fleet_nccl_ib_hca", "'ib0,ib1'", "names network interfaces (ib0, ib1), not RDMA devices")),
    ("daemon-json-live-restore", 4, host("gpu-a", """container_runtime_daemon_extra='{"live-restore": False}'"""),
     problem("gpu-a", "container_runtime_daemon_extra", "{'live-restore': False}", "use container_runtime_live_restore")),
    ("listen-address-is-interface", 4, allvars("exporter_listen_address=eno1"),
     problem("gpu-a", "exporter_listen_address", "'eno1'", "not an IP address (an interface name?")),

    # --- 5: connection variables first; templates never fail raw -------------------------------
    ("ansible-port-not-a-number", 5, host("gpu-b", "ansible_port=ssh"),
     problem("gpu-b", "ansible_port", "'ssh'", "must be a whole number")),
    ("ansible-port-out-of-range", 5, host("gpu-a", "ansible_port=70000"),
     problem("gpu-a", "ansible_port", "70000", "port must be between 1 and 65535")),
    ("ansible-host-with-user", 5, edit("gpu-b ansible_host=192.0.2.2", "gpu-b ansible_host=ops@192.0.2.2"),
     problem("gpu-b", "ansible_host", "'ops@192.0.2.2'", "no scheme, user@ or spaces")),
    ("ansible-host-with-port", 5, edit("gpu-b ansible_host=192.0.2.2", "gpu-b ansible_host=192.0.2.2:2222"),
     problem("gpu-b", "ansible_host", "'192.0.2.2:2222'", "write ansible_host=192.0.2.2 ansible_port=2222")),
    ("ansible-connection-typo", 5, host("gpu-a", "ansible_connection=sssh"),
     problem("gpu-a", "ansible_connection", "'sssh'", "is not a connection plugin; did you mean ssh?")),
    ("ansible-become-not-bool", 5, allvars("ansible_become=maybe"),  # [all:vars] reaches localhost too
     problem("gpu-a", "ansible_become", "'maybe'", "must be a boolean")),
    ("ansible-shell-type-unknown", 5, allvars("ansible_shell_type=zsh"),
     problem("gpu-b", "ansible_shell_type", "'zsh'", "is not a shell plugin")),
    ("ansible-pipelining-not-bool", 5, allvars("ansible_pipelining=maybe"),
     problem("gpu-a", "ansible_pipelining", "'maybe'", "must be a boolean")),
    ("ansible-host-typo", 5, host("gpu-b", "ansible_hots=192.0.2.20"),
     problem("gpu-b", "ansible_hots", "'192.0.2.20'", "did you mean ansible_host?")),
    ("private-key-missing", 5, allvars("ansible_ssh_private_key_file=/nonexistent/id_ed25519"),
     problem("gpu-a", "ansible_ssh_private_key_file", "'/nonexistent/id_ed25519'", "does not exist on the controller")),
    ("python-interpreter-relative", 5, allvars("ansible_python_interpreter=python3"),
     problem("gpu-b", "ansible_python_interpreter", "'python3'", "must be an absolute path")),
    ("template-undefined-variable", 5, edit("fleet_model_path=/data/models/qwen",
                                            "fleet_model_path={{ model_root }}/qwen"),
     problem("gpu-a", "fleet_model_path", "'{{ model_root }}/qwen'", "it uses model_root, which is not defined")),
    ("template-syntax-error", 5, edit("fleet_served_model_name=qwen", "fleet_served_model_name={{ model_name }"),
     problem("gpu-a", "fleet_served_model_name", "'{{ model_name }'", "is not a valid template")),
    ("template-in-connection-variable", 5, host("gpu-b", "ansible_port='{{ ssh_port }}'"),
     problem("gpu-b", "ansible_port", "'{{ ssh_port }}'", "it uses ssh_port, which is not defined")),
]

# Python's own exception text, which must never reach an operator from validation.
PYTHON_EXCEPTION = re.compile(r"Traceback \(most recent call|\b[A-Z][A-Za-z]*(Error|Exception): |invalid literal for "
                              r"|not enough values to unpack|object has no attribute|NoneType|jinja2\.")


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    """The validate playbook's run on every selected case, a few at a time."""
    wanted = selected_cases(request, "case")
    return run_all({c[0]: c[2] for c in CASES if c[0] in wanted}, tmp_path_factory.mktemp("classes"))


def test_at_least_three_cases_per_class_and_thirty_in_all():
    per_class = {k: sum(1 for c in CASES if c[1] == k) for k in (1, 2, 3, 4, 5)}
    assert min(per_class.values()) >= 3, per_class
    assert len({c[0] for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_inventory_is_refused_before_any_host_is_contacted(results, case):
    case_id, _cls, _text, line = case
    proc = results[case_id]
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "PLAY [Pre-flight reachability]" not in out and "UNREACHABLE" not in out, out
    assert re.search(line, out), f"no line matching {line!r} in:\n{out}"
    assert not PYTHON_EXCEPTION.search(out), out


def test_base_inventories_of_these_cases_are_valid(tmp_path):
    controller = "localhost ansible_connection=local\n" + BASE  # the controller listed for itself, ungrouped
    spare = allvars(f"{SPARE_GROUP}gpu-s ansible_host=192.0.2.7\n{SPARE_VARS}")
    for name, text in (("base", BASE), ("balanced", BALANCED), ("controller-listed", controller), ("spare", spare)):
        proc = run_playbook(VALIDATE, text, tmp_path / name, "--skip-tags", "preflight")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "inventory valid" in proc.stdout


@pytest.mark.parametrize("case_id", ["yaml-key-in-vars", "group-header-typo", "no-host-at-all",
                                     "ansible-port-not-a-number"])
def test_readme_check_first_step_never_exits_0_on_a_broken_inventory(tmp_path, case_id):
    """README step 3, verbatim: `ansible-playbook -i inventory.ini deploy.yml --tags validate`."""
    text = next(c[2] for c in CASES if c[0] == case_id)
    proc = run_playbook(DEPLOY, text, tmp_path, "--tags", "validate")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "PLAY [Pre-flight reachability]" not in out, out
    assert not PYTHON_EXCEPTION.search(out), out
