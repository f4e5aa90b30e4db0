"""Per-tenant counters as the balancer's Lua service prints them (the real HAProxy end of this is
tests/unit/test_front_door.py)."""
from vllm_fleet_exporter.tenants import parse_tenants


def test_parse_tenant_lines_and_skip_garbage():
    text = ("team-a gpc0=3,http_req_cnt=6,http_req_rate=4\n"
            "team-b http_req_cnt=12,gpc0=0,http_req_rate=1\n"
            "\n"
            "bad name gpc0=1\n"
            "team-c http_req_cnt=x\n")
    got = parse_tenants(text)
    assert set(got) == {"team-a", "team-b", "team-c"}
    assert (got["team-a"].requests, got["team-a"].rate_limited, got["team-a"].rate) == (6, 3, 4)
    assert (got["team-b"].requests, got["team-b"].rate_limited) == (12, 0)
    assert got["team-c"].requests == 0
