"""Every fault-injection test has a timeout of its own, above pyproject's global one.

Their bounded waits (worker starts, 60-120 s waits for 1,000 tasks, restarts)
add up to more than the global ``timeout``: without their own mark,
pytest-timeout would kill them with a stack dump before their assertions say
what was lost.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_TIMEOUT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"][
    "ini_options"
]["timeout"]


def own_timeout(function: ast.FunctionDef) -> int | None:
    for decorator in function.decorator_list:
        if (
            isinstance(decorator, ast.Call)
            and ast.unparse(decorator.func) == "pytest.mark.timeout"
            and isinstance(decorator.args[0], ast.Constant)
        ):
            return int(decorator.args[0].value)
    return None


def test_every_reliability_test_has_a_timeout_above_the_global_one() -> None:
    missing = []
    for path in sorted((ROOT / "tests" / "reliability").glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                timeout = own_timeout(node)
                if timeout is None or timeout <= GLOBAL_TIMEOUT:
                    missing.append(f"{path.name}::{node.name} ({timeout})")
    assert not missing, f"no timeout above {GLOBAL_TIMEOUT} s: {missing}"
