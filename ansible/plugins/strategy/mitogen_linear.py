# Mitogen's linear strategy (PyPI `mitogen`, pinned in pyproject.toml), found by its name through
# ansible.cfg's strategy_plugins instead of a path into the venv's site-packages. Mitogen keeps one
# Python interpreter per host for the whole run and runs modules in it: no new SSH session, no
# module upload and no Python start per task (docs/benchmarks/2026-12-08-lab-connection-layer.md).
from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule  # noqa: F401
