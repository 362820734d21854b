"""The layout stays readable: modules of one concern, and the Ray worker at the top of the
import graph (only the workers' entry point imports it, inside the worker process:
train/launch.py), so that the driver, checkpoints, evaluation, sampling and benchmarks never
drag the training loop in."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = "orchestrator.train.worker"
# A module may pass this many lines only when it is one cohesive thing (none does today).
MAX_LINES = 400


def _modules():
    for path in sorted((ROOT / "orchestrator").rglob("*.py")) + sorted((ROOT / "model").rglob("*.py")):
        yield path, ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: pathlib.Path, module: str) -> set[str]:
    out = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def test_only_the_driver_imports_the_worker():
    importers = sorted(m for path, m in _modules() if m != WORKER and WORKER in _imports(path, m))
    assert importers == ["orchestrator.train.launch"]


def test_no_module_needs_a_table_of_contents():
    long = {m: n for path, m in _modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long
