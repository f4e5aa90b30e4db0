"""Where a client of a deployment connects, from its inventory (`ansible-inventory --list`).

* front_door(): the first balancer's URL (https://<balancer>:<loadbalancer_tls_port>/v1 while TLS is
  on, else http on loadbalancer_frontend_port), the lab CA to trust when the deployment generated
  it, and a tenant's key file when the deployment generated that key;
* head(): a replica head's API URL (where vLLM listens: the address the balancer uses) and the
  engine key file when generated.

Files, never keys: callers pass the paths on (loadgen --api-key-file / --ca-file). Stdlib + PyYAML.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def inventory_list(inventory: str | Path, ansible_inventory: str = "ansible-inventory") -> dict:
    out = subprocess.run([ansible_inventory, "-i", str(inventory), "--list"], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    return json.loads(out)


def _defaults(role: str) -> dict:
    return yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml").read_text()) or {}


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def secrets_dir(inventory: str | Path, hv: dict) -> Path:
    """fleet_secrets_dir/<deployment> on the controller (the default is beside the inventory)."""
    base = hv.get("fleet_secrets_dir") or str(Path(inventory).resolve().parent / "fleet-secrets")
    return Path(base) / hv.get("fleet_deployment", _defaults("fleet")["fleet_deployment"])


def _existing(path: Path) -> str:
    return str(path) if path.is_file() else ""


def front_door(inventory: str | Path, inv: dict, tenant: str = "") -> dict:
    """{url, ca_file, key_file, tenant, model} of the first balancer; raises LookupError without one."""
    hostvars = inv.get("_meta", {}).get("hostvars", {})
    balancers = inv.get("fleet_loadbalancer", {}).get("hosts", [])
    if not balancers:
        raise LookupError("no host in fleet_loadbalancer")
    lb = balancers[0]
    hv, d = hostvars.get(lb, {}), _defaults("loadbalancer")
    address = str(hv.get("loadbalancer_frontend_address") or hv.get("ansible_host") or lb)
    tls = hv.get("loadbalancer_tls", d["loadbalancer_tls"])
    if isinstance(tls, str):
        tls = tls.strip().lower() in ("1", "true", "yes", "on")
    port = hv.get("loadbalancer_tls_port", d["loadbalancer_tls_port"]) if tls else \
        hv.get("loadbalancer_frontend_port", d["loadbalancer_frontend_port"])
    tenants = hv.get("loadbalancer_api_keys") or [{"name": "default"}]
    if isinstance(tenants, str):
        tenants = yaml.safe_load(tenants)
    name = tenant or tenants[0]["name"]
    sec = secrets_dir(inventory, hv)
    lab_ca = not hv.get("loadbalancer_tls_cert_file") and tls
    model = next((v["fleet_served_model_name"] for v in hostvars.values() if v.get("fleet_served_model_name")), "")
    return {"url": f"{'https' if tls else 'http'}://{_url_host(address)}:{port}/v1",
            "ca_file": _existing(sec / "lab-ca" / "ca.crt") if lab_ca else "",
            "key_file": _existing(sec / "api-keys" / name), "tenant": name, "model": model}


def head(inventory: str | Path, inv: dict, name: str) -> dict:
    """{url, key_file, model} of a replica head's own API (reachable from the hosts the firewall
    lets in: the balancers, monitoring, the replica, firewall_api_sources)."""
    hv = inv.get("_meta", {}).get("hostvars", {}).get(name, {})
    address = next(str(hv[k]) for k in ("vllm_serve_api_host", "loadbalancer_server_address", "ansible_host")
                   if hv.get(k) and hv[k] not in ("0.0.0.0", "::"))
    port = hv.get("fleet_api_port", _defaults("fleet")["fleet_api_port"])
    return {"url": f"http://{_url_host(address)}:{port}/v1",
            "key_file": _existing(secrets_dir(inventory, hv) / "engine-api-key"),
            "model": hv.get("fleet_served_model_name") or hv.get("fleet_model_path", "")}


def read_key(path: str) -> str:
    """The key in a key file ('' for no file): for in-process clients (tests)."""
    if not path:
        return ""
    with open(path, encoding="utf-8") as fh:
        return fh.readline().strip()


if __name__ == "__main__":  # tools/fleet_endpoint.py INVENTORY: print the front door (no secrets)
    import sys

    print(json.dumps(front_door(sys.argv[1], inventory_list(sys.argv[1])), indent=1))
