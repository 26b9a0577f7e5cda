"""The folder layout is the architecture: the lower layers (data, models, sae, methods, eval, observe) never import
the stages that drive them (train, stream, tune). Read from the source, so a lazy import inside a function counts."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "saefd_ray"
LOWER = ("data", "models", "sae", "methods", "eval", "observe")
UPPER = ("saefd_ray.train", "saefd_ray.stream", "saefd_ray.tune")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_lower_layers_never_import_the_stages_above_them():
    upward = sorted(f"{path.relative_to(PACKAGE.parent)} imports {name}"
                    for layer in LOWER for path in (PACKAGE / layer).glob("*.py")
                    for name in imported_modules(path) if name.startswith(UPPER))
    assert upward == []


def test_the_check_sees_a_lazy_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from saefd_ray.train.deepspeed_setup import trainable_state\n")
    assert "saefd_ray.train.deepspeed_setup" in imported_modules(module)
