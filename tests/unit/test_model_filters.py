"""The model role's pure parts: fleet_model_source parsing, the fan-out plan, deadlines."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "fleet_model_filters", Path(__file__).resolve().parents[2] / "ansible/plugins/filter/fleet_model.py")
_FILTERS = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_FILTERS)
parse_source, fleet_model_fanout, fleet_model_deadline = (_FILTERS.parse_source, _FILTERS.fleet_model_fanout,
                                                          _FILTERS.fleet_model_deadline)


@pytest.mark.parametrize("source, expected", [
    ("", {"scheme": "none"}),
    ("/srv/models/qwen/", {"scheme": "controller", "path": "/srv/models/qwen"}),
    ("node:/mnt/nfs/qwen", {"scheme": "node", "path": "/mnt/nfs/qwen"}),
    ("hf://Qwen/Qwen2.5-32B-Instruct-GPTQ-Int4@" + "a" * 40,
     {"scheme": "hf", "repo": "Qwen/Qwen2.5-32B-Instruct-GPTQ-Int4", "revision": "a" * 40}),
    ("hf://gpt2@" + "0" * 40, {"scheme": "hf", "repo": "gpt2"}),
    ("s3://models/qwen/32b", {"scheme": "s3", "bucket": "models", "prefix": "qwen/32b"}),
    ("https://mirror.internal/models/qwen", {"scheme": "http", "url": "https://mirror.internal/models/qwen/"}),
])
def test_each_scheme_parses(source, expected):
    got = parse_source(source)
    assert {k: got[k] for k in expected} == expected


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 63])
def test_fanout_doubles_and_every_receiver_pulls_once_from_a_node_that_already_has_it(n):
    receivers = [f"n{i}" for i in range(1, n + 1)]
    rounds = fleet_model_fanout(receivers, "seed")
    assert len(rounds) == math.ceil(math.log2(n + 1))
    have = {"seed"}
    pulled = []
    for pairs in rounds:
        senders = [p["sender"] for p in pairs]
        assert len(senders) == len(set(senders)), "a node sends once per round"
        assert set(senders) <= have
        have |= {p["receiver"] for p in pairs}
        pulled += [p["receiver"] for p in pairs]
    assert sorted(pulled) == sorted(receivers)


def test_deadline_grows_with_size():
    assert fleet_model_deadline(0, 20, 300) == 300
    assert fleet_model_deadline(140 * 2**30, 20, 300) == 300 + 7168
