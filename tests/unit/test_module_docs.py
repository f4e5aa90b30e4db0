"""Every module of ours documents itself in a form ansible-doc reads (a YAML slip in DOCUMENTATION
is only a printed warning in ansible-lint, and `ansible-doc` then shows nothing), and documents
exactly the options its argument_spec takes."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.ansible_adhoc import REPO

MODULES = sorted((REPO / "ansible" / "plugins" / "modules").glob("fleet_*.py"))


def spec_options(path: Path) -> set[str]:
    """The keys of argument_spec=dict(...) in the module's source."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.keyword) and node.arg == "argument_spec" and isinstance(node.value, ast.Call):
            return {kw.arg for kw in node.value.keywords}
    raise AssertionError(f"{path.name}: no argument_spec=dict(...)")


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_module_documentation_parses_and_names_its_options(path):
    doc = subprocess.run([str(Path(sys.executable).parent / "ansible-doc"), "-M", str(path.parent), "--json",
                          path.stem], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert doc.returncode == 0 and "Unable to parse documentation" not in doc.stderr, doc.stderr[-2000:]
    options = set(json.loads(doc.stdout)[path.stem]["doc"].get("options") or {})
    assert options == spec_options(path), f"{path.name}: documented {sorted(options)}"
