"""Bad inventories are rejected by deploy.yml before any host is contacted.

Each case runs the real `ansible-playbook` on an INI inventory modelled on inventory.example.ini:
the validate playbook deploy.yml starts with for the cases (tests/unit/validate_runs.py), deploy.yml
itself for the rest. The hosts point at closed ports on 127.0.0.1, so if validation let a bad
inventory through, the pre-flight play would run and the test would see it.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.unit.validate_runs import run_all, selected_cases

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = str(REPO / "deploy.yml")


def base_inventory() -> dict:
    """A valid 2-node TP=4×PP=2 inventory, as nested dicts we can break one piece at a time."""
    return {
        "fleet_head": {"gpu-a": {"ansible_host": "127.0.0.1", "ansible_port": "22901"}},
        "fleet_workers": {"gpu-b": {"ansible_host": "127.0.0.1", "ansible_port": "22902"}},
        "fleet_monitoring": {"gpu-a": {}},
        "fleet_serving:children": ["fleet_head", "fleet_workers"],
        "fleet_serving:vars": {"fleet_engine": "cuda", "fleet_gpus_per_node": "4"},
        "all:vars": {
            "fleet_deployment": "qwen32b",
            "fleet_model_path": "/data/models/Qwen2.5-32B-Instruct-GPTQ-Int4",
            "fleet_served_model_name": "Qwen2.5-32B-Instruct-GPTQ-Int4",
            "fleet_quantization": "gptq_marlin",
            "fleet_tensor_parallel_size": "4",
            "fleet_pipeline_parallel_size": "2",
            "fleet_max_model_len": "4096",
            "fleet_gpu_memory_utilization": "0.90",
            "fleet_api_port": "8009",
            "fleet_fabric_interface": "eth0",
        },
    }


def render(inv: dict) -> str:
    out = []
    for section, body in inv.items():
        out.append(f"[{section}]")
        if isinstance(body, list):
            out += body
        elif section.endswith(":vars"):
            out += [f"{k}={v}" for k, v in body.items()]
        else:
            out += [" ".join([host] + [f"{k}={v}" for k, v in hv.items()]) for host, hv in body.items()]
        out.append("")
    return "\n".join(out)


def run_deploy(tmp_path: Path, inv: dict, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "inventory.ini"
    path.write_text(render(inv))
    return subprocess.run(["ansible-playbook", "-i", str(path), PLAYBOOK, *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=180)


def head(inv, **kv):
    inv["fleet_head"]["gpu-a"].update(kv)
    return inv


def worker(inv, **kv):
    inv["fleet_workers"]["gpu-b"].update(kv)
    return inv


def allvars(inv, **kv):
    inv["all:vars"].update(kv)
    return inv


def serving_vars(inv, **kv):
    inv["fleet_serving:vars"].update(kv)
    return inv


def no_head(inv):
    inv["fleet_head"] = {}
    inv["fleet_monitoring"] = {}
    inv["fleet_workers"]["gpu-a"] = {"ansible_host": "127.0.0.1", "ansible_port": "22901"}
    return inv


def two_heads(inv):
    inv["fleet_head"]["gpu-b"] = inv["fleet_workers"].pop("gpu-b")
    return inv


def head_also_worker(inv):
    inv["fleet_workers"]["gpu-a"] = {}
    return inv


def extra_host(inv, name="gpu-c", **kv):
    inv["fleet_workers"][name] = {"ansible_host": "127.0.0.1", "ansible_port": "22903", **kv}
    return inv


# (id, how to break the base inventory, host named, variable named, words in the reason)
CASES = [
    ("no-head", no_head, "(inventory)", "fleet_head", "no host in group fleet_head"),
    ("two-heads", two_heads, "gpu-b", "fleet_replica", "two heads"),
    ("head-and-worker", head_also_worker, "gpu-a", "groups", "either a head or a worker"),
    ("duplicate-ansible-host", lambda i: worker(i, ansible_port="22901"), "gpu-b", "ansible_host", "same address"),
    ("tp-x-pp-over-gpus", lambda i: worker(i, fleet_gpus_per_node=2), "gpu-a", "fleet_tensor_parallel_size",
     "TP×PP = 4×2 = 8 is more than the 6 devices"),
    ("tp-over-gpus-per-node", lambda i: worker(i, fleet_gpus_per_node=2), "gpu-b", "fleet_tensor_parallel_size",
     "larger than this node's 2"),
    ("pp-over-nodes", lambda i: allvars(i, fleet_pipeline_parallel_size="3"), "gpu-a",
     "fleet_pipeline_parallel_size", "larger than the 2 serving node"),
    ("relative-model-path", lambda i: allvars(i, fleet_model_path="models/qwen"), "gpu-a", "fleet_model_path",
     "absolute path"),
    ("dotdot-model-path", lambda i: allvars(i, fleet_model_path="/data/../etc"), "gpu-b", "fleet_model_path",
     "without '..'"),
    ("empty-model-path", lambda i: allvars(i, fleet_model_path=""), "gpu-a", "fleet_model_path", "is empty"),
    ("relative-model-source", lambda i: allvars(i, fleet_model_source="./qwen"), "gpu-a", "fleet_model_source",
     "absolute path on the controller"),
    ("model-source-unknown-scheme", lambda i: allvars(i, fleet_model_source="ftp://mirror/qwen"), "gpu-a",
     "fleet_model_source", "unknown scheme 'ftp:'"),
    ("model-source-hf-revision-missing", lambda i: allvars(i, fleet_model_source="hf://Qwen/Qwen2.5-32B"), "gpu-b",
     "fleet_model_source", "the revision is missing"),
    ("model-source-hf-branch", lambda i: allvars(i, fleet_model_source="hf://Qwen/Qwen2.5-32B@main"), "gpu-a",
     "fleet_model_source", "revision 'main' is not a 40-hex commit id"),
    ("model-source-s3-bucket-missing", lambda i: allvars(i, fleet_model_source="s3:///models/qwen"), "gpu-a",
     "fleet_model_source", "the bucket is missing"),
    ("model-source-credentials-in-url", lambda i: allvars(i, fleet_model_source="https://u:pw@mirror/qwen/"),
     "gpu-a", "fleet_model_source", "credentials do not belong in the URL"),
    ("model-source-node-relative", lambda i: allvars(i, fleet_model_source="node:models/qwen"), "gpu-b",
     "fleet_model_source", "node: needs an absolute path"),
    ("pinned-manifest-not-sha256", lambda i: allvars(i, model_manifest="{'model.safetensors': 'abc'}"), "gpu-a",
     "model_manifest", "is not a 64-hex sha256"),
    ("empty-model-name", lambda i: allvars(i, fleet_served_model_name=""), "gpu-a", "fleet_served_model_name",
     "is empty"),
    ("port-out-of-range", lambda i: allvars(i, fleet_api_port="70000"), "gpu-b", "fleet_api_port", "between 1 and 65535"),
    ("port-zero", lambda i: head(i, fleet_exporter_port=0), "gpu-a", "fleet_exporter_port", "between 1 and 65535"),
    ("port-not-a-number", lambda i: allvars(i, fleet_api_port="http"), "gpu-a", "fleet_api_port", "whole number"),
    ("port-clashes-with-ray", lambda i: allvars(i, fleet_api_port="6379"), "gpu-a", "fleet_api_port",
     "clashes with fleet_ray_port"),
    ("port-in-ray-worker-range", lambda i: allvars(i, fleet_api_port="10500"), "gpu-b", "fleet_api_port",
     "inside Ray's worker port range"),
    ("ray-worker-range-inverted", lambda i: allvars(i, fleet_ray_min_worker_port="12000",
                                                    fleet_ray_max_worker_port="11000"),
     "gpu-a", "fleet_ray_min_worker_port", "above fleet_ray_max_worker_port"),
    ("bool-as-string", lambda i: worker(i, fleet_gpu_less="yes"), "gpu-b", "fleet_gpu_less", "not a boolean"),
    ("bool-as-quoted-false", lambda i: allvars(i, fleet_gpu_less="false"), "gpu-a", "fleet_gpu_less",
     "not a boolean"),
    ("misspelled-variable", lambda i: worker(i, fleet_tensor_paralel_size=4), "gpu-b", "fleet_tensor_paralel_size",
     "did you mean fleet_tensor_parallel_size"),
    ("unknown-variable", lambda i: allvars(i, fleet_turbo="1"), "gpu-a", "fleet_turbo", "unknown fleet_"),
    ("interface-too-long", lambda i: worker(i, fleet_fabric_interface="enp129s0f1np1xyz"), "gpu-b",
     "fleet_fabric_interface", "not a possible Linux interface name"),
    ("interface-with-slash", lambda i: head(i, fleet_fabric_interface="eth0/1"), "gpu-a", "fleet_fabric_interface",
     "not a possible Linux interface name"),
    ("gpu-mem-zero", lambda i: allvars(i, fleet_gpu_memory_utilization="0"), "gpu-a",
     "fleet_gpu_memory_utilization", "(0, 1]"),
    ("gpu-mem-above-one", lambda i: worker(i, fleet_gpu_memory_utilization=1.5), "gpu-b",
     "fleet_gpu_memory_utilization", "(0, 1]"),
    ("gpu-mem-text", lambda i: allvars(i, fleet_gpu_memory_utilization="most"), "gpu-a",
     "fleet_gpu_memory_utilization", "must be a number"),
    ("tp-zero", lambda i: allvars(i, fleet_tensor_parallel_size="0"), "gpu-a", "fleet_tensor_parallel_size",
     "at least 1"),
    ("engine-unknown", lambda i: serving_vars(i, fleet_engine="tpu"), "gpu-a", "fleet_engine", "one of cuda, cpu"),
    ("cuda-on-gpu-less-host", lambda i: worker(i, fleet_gpu_less=True), "gpu-b", "fleet_engine",
     "fleet_gpu_less=True"),
    ("gpus-per-node-missing", lambda i: inv_without_gpus(i), "gpu-a", "fleet_gpus_per_node", "at least 1"),
    ("tp-differs-in-replica", lambda i: worker(i, fleet_tensor_parallel_size=2), "gpu-b",
     "fleet_tensor_parallel_size", "differs from the head gpu-a"),
    ("extra-args-not-list", lambda i: allvars(i, fleet_extra_args="--enforce-eager"), "gpu-a", "fleet_extra_args",
     "must be a list"),
    ("extra-args-managed-flag", lambda i: allvars(i, fleet_extra_args="['--tensor-parallel-size=8']"), "gpu-a",
     "fleet_extra_args", "use fleet_tensor_parallel_size"),
    ("api-key-on-command-line", lambda i: allvars(i, fleet_extra_args="['--api-key=s3cret']"), "gpu-b",
     "fleet_extra_args", "secret never belongs on the command line"),
    ("ib-off-with-hca", lambda i: worker(i, fleet_nccl_ib="off", fleet_nccl_ib_hca="mlx5_0"), "gpu-b",
     "fleet_nccl_ib_hca", "fleet_nccl_ib=off"),
    ("ib-hca-syntax", lambda i: head(i, fleet_nccl_ib_hca="mlx5_0;mlx5_1"), "gpu-a", "fleet_nccl_ib_hca",
     "not an NCCL_IB_HCA list"),
    ("nccl-ib-choice", lambda i: worker(i, fleet_nccl_ib="maybe"), "gpu-b", "fleet_nccl_ib", "one of auto, on, off"),
    ("deployment-name", lambda i: allvars(i, fleet_deployment="Qwen_32B"), "gpu-a", "fleet_deployment",
     "lower-case letters"),
    ("image-reference", lambda i: allvars(i, fleet_image="vllm fleet:latest"), "gpu-a", "fleet_image",
     "not an image reference"),
    ("replica-without-head", lambda i: extra_host(i, fleet_replica="r2"), "gpu-c", "fleet_replica",
     "has no host in fleet_head"),
    ("api-port-in-launch-range", lambda i: allvars(i, fleet_api_port="21000"), "gpu-a", "fleet_api_port",
     "inside the launch port range 20000-32767"),
    ("api-auth-choice", lambda i: allvars(i, fleet_api_auth="sometimes"), "gpu-a", "fleet_api_auth",
     "one of auto, on, off"),
    ("tenant-name", lambda i: balancer(i, loadbalancer_api_keys="'[{\"name\": \"team/a\"}]'"), "lb",
     "loadbalancer_api_keys[0].name", "letters, digits"),
    ("tenant-twice", lambda i: balancer(i, loadbalancer_api_keys='\'[{"name": "a"}, {"name": "a"}]\''), "lb",
     "loadbalancer_api_keys[1].name", "two tenants have this name"),
    ("tenant-short-key", lambda i: balancer(i, loadbalancer_api_keys='\'[{"name": "a", "key": "short"}]\''), "lb",
     "loadbalancer_api_keys[0].key", "at least 16 characters"),
    ("tenant-unknown-field", lambda i: balancer(i, loadbalancer_api_keys='\'[{"name": "a", "rate_limt": 3}]\''), "lb",
     "loadbalancer_api_keys[0].rate_limt", "did you mean rate_limit"),
    ("tenant-negative-limit", lambda i: balancer(i, loadbalancer_api_keys='\'[{"name": "a", "rate_limit": -1}]\''), "lb",
     "loadbalancer_api_keys[0].rate_limit", ">= 0"),
    ("tls-cert-without-key", lambda i: balancer(i, loadbalancer_tls_cert_file="/etc/hostname"), "lb",
     "loadbalancer_tls_key_file", "set both"),
    ("tls-cert-missing", lambda i: balancer(i, loadbalancer_tls_cert_file="/nonexistent/cert.pem",
                                            loadbalancer_tls_key_file="/etc/hostname"), "lb",
     "loadbalancer_tls_cert_file", "no such file on the controller"),
]


def balancer(inv, **kv):
    inv["fleet_loadbalancer"] = {"lb": {"ansible_host": "127.0.0.1", "ansible_port": "22904", **kv}}
    return inv


def inv_without_gpus(inv):
    del inv["fleet_serving:vars"]["fleet_gpus_per_node"]
    return inv


def test_at_least_25_distinct_bad_inputs():
    assert len({c[0] for c in CASES}) == len(CASES) >= 25


def test_deploy_yml_validates_first_with_the_validate_playbook():
    """What the cases below show for 00_validate.yml holds for deploy.yml: it is its first import."""
    first = yaml.safe_load((REPO / "deploy.yml").read_text())[0]
    assert first["ansible.builtin.import_playbook"] == "ansible/playbooks/00_validate.yml"


@pytest.fixture(scope="module")
def case_runs(request, tmp_path_factory):
    wanted = selected_cases(request, "case")
    return run_all({c[0]: render(c[1](base_inventory())) for c in CASES if c[0] in wanted},
                   tmp_path_factory.mktemp("cases"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_inventory_is_rejected_before_any_host(case_runs, case):
    case_id, _, host, variable, reason = case
    proc = case_runs[case_id]
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "nothing was changed on any host" in out, out
    # The pre-flight play (first one to contact hosts) never started.
    assert "PLAY [Pre-flight reachability]" not in out, out
    assert f"host {host}: {variable}=" in out, out
    assert reason in out, out


def test_valid_example_inventory_passes(tmp_path):
    proc = subprocess.run(["ansible-playbook", "-i", str(REPO / "inventory.example.ini"), PLAYBOOK,
                           "--tags", "validate", "--skip-tags", "preflight"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "inventory valid: 2 host(s), 2 serving" in proc.stdout


def test_scale_lab_inventory_with_spares_is_valid(tmp_path):
    """`lab.py up --spares 3`'s inventory (the scale lab's light hosts) passes as it is written."""
    from tests.lab import lab
    key = tmp_path / "id_ed25519"
    key.write_text("")
    text = lab.inventory_text(4, key, 3).replace(str(lab.STATE_DIR / "models" / "tiny-llama"), str(tmp_path))
    assert "[fleet_spare]\nnode5 " in text and "\nnode7 " in text and "node8" not in text
    (tmp_path / "inventory.ini").write_text(text)
    proc = subprocess.run(["ansible-playbook", "-i", str(tmp_path / "inventory.ini"), PLAYBOOK,
                           "--tags", "validate", "--skip-tags", "preflight"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "inventory valid: 7 host(s), 4 serving, 3 spare" in proc.stdout


def test_base_inventory_of_these_tests_is_valid(tmp_path):
    proc = run_deploy(tmp_path, base_inventory(), "--tags", "validate", "--skip-tags", "preflight")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_all_problems_are_reported_at_once(tmp_path):
    inv = allvars(base_inventory(), fleet_api_port="0", fleet_served_model_name="")
    proc = run_deploy(tmp_path, worker(inv, fleet_gpu_less="no"))
    out = proc.stdout + proc.stderr
    assert "fleet_api_port=0" in out and "fleet_served_model_name=''" in out and "fleet_gpu_less='no'" in out
    assert re.search(r"\b(\d+) problem\(s\)", out) and int(re.search(r"\b(\d+) problem\(s\)", out).group(1)) >= 4


def test_limit_does_not_skip_validation(tmp_path):
    """--limit to one host still validates the whole inventory (the head's bad value is named)."""
    proc = run_deploy(tmp_path, head(base_inventory(), fleet_gpu_memory_utilization=2), "--limit", "gpu-b")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "host gpu-a: fleet_gpu_memory_utilization=2" in out, out
    assert "PLAY [Pre-flight reachability]" not in out, out


def test_misspelled_role_setting_is_rejected_with_a_suggestion(tmp_path):
    """Role settings (<role>_*) are checked like fleet_* ones."""
    proc = run_deploy(tmp_path, worker(base_inventory(), gpu_driver_brnach="550"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "host gpu-b: gpu_driver_brnach=550: unknown gpu_driver_* variable; did you mean gpu_driver_branch?" in out


def run_rolling_restart(tmp_path: Path, inv: dict, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "inventory.ini"
    path.write_text(render(inv))
    return subprocess.run(["ansible-playbook", "-i", str(path), str(REPO / "rolling_restart.yml"), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=180)


def test_rolling_restart_refuses_a_misspelled_setting_given_with_e_before_any_change(tmp_path):
    """The rolling_restart role's settings are checked like the inventory's, -e included (extra vars
    reach hostvars, which the validator reads): nothing is contacted, nothing drained."""
    proc = run_rolling_restart(tmp_path, base_inventory(), "-e", "rolling_restart_bach=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert ("host gpu-a: rolling_restart_bach='2': unknown rolling_restart_* variable; "
            "did you mean rolling_restart_batch?") in out, out
    assert "nothing was changed on any host" in out, out
    assert "Reach every selected serving host" not in out, out
    assert "PLAY [Rolling restart - one batch" not in out, out


def test_rolling_restart_says_how_to_give_a_boolean_on_the_command_line(tmp_path):
    proc = run_rolling_restart(tmp_path, base_inventory(), "-e", "rolling_restart_force=true")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert ("host gpu-b: rolling_restart_force='true': is the string 'true', not a boolean: "
            "-e rolling_restart_force=true always gives a string; give it as JSON: "
            "-e '{\"rolling_restart_force\": true}'") in out, out
    assert "Reach every selected serving host" not in out, out
