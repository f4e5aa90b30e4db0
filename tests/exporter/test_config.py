import json

import pytest

from vllm_fleet_exporter.config import ConfigError, load_config, parse_listen


def test_file_then_flags(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"engine_url": "http://a:8000", "canary_interval_s": 7,
                             "processes": [{"name": "engine", "pattern": "vllm", "expected": 1}],
                             "ray_expected_nodes": 3}))
    cfg = load_config(["--config", str(f), "--canary-interval-s", "9", "--no-canary"])
    assert cfg.engine_url == "http://a:8000" and cfg.canary_interval_s == 9.0
    assert cfg.canary_enabled is False and cfg.ray_expected_nodes == 3
    assert cfg.processes[0].name == "engine"


def test_unknown_key_is_an_error(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"engine_ulr": "x"}))
    with pytest.raises(ConfigError, match="engine_ulr"):
        load_config(["--config", str(f)])


def test_no_api_key_flag():
    with pytest.raises(SystemExit):
        load_config(["--api-key", "secret"])  # only --api-key-file exists


@pytest.mark.parametrize("listen,expected", [
    ("10.0.0.5:9445", ("10.0.0.5", 9445)), ("[fd00::1]:9", ("fd00::1", 9)),
    ("auto:9445", ("auto", 9445)), (":9445", ("", 9445)), ("10.0.0.5", ("10.0.0.5", 9445))])
def test_parse_listen(listen, expected):
    assert parse_listen(listen) == expected


def test_bad_listen():
    with pytest.raises(ConfigError):
        parse_listen("1.2.3.4:99999")
