"""Fixtures for tests/exporter; helpers live in exporter_testlib (a unique module name)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from exporter_testlib import promtool, state_dir, stub_engine  # noqa: E402,F401  (fixtures)
