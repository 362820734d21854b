"""model/ must stay framework-agnostic: no Ray, no torch.distributed anywhere in it."""

from __future__ import annotations

import ast
import pathlib

import pytest

MODEL_DIR = pathlib.Path(__file__).resolve().parents[1] / "model"
FORBIDDEN = ("ray", "torch.distributed")


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def _violations(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if _forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _forbidden(node.module):
                bad.append(node.module)
            bad += [f"{node.module}.{a.name}" for a in node.names if _forbidden(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            # torch.distributed.xyz used through a plain `import torch`.
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                bad.append("torch.distributed")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
            "import_module",
            "__import__",
        ):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _forbidden(arg.value):
                    bad.append(arg.value)
    return bad


def test_model_sources_exist():
    assert len(list(MODEL_DIR.glob("*.py"))) >= 7


def test_no_ray_or_torch_distributed_in_model():
    offenders = {p.name: v for p in sorted(MODEL_DIR.rglob("*.py")) if (v := _violations(p))}
    assert offenders == {}, f"model/ must not import ray or torch.distributed: {offenders}"


@pytest.mark.parametrize(
    "snippet",
    [
        "import ray",
        "import ray.train",
        "from ray import train",
        "from ray.train.torch import TorchTrainer",
        "import torch.distributed as dist",
        "from torch import distributed",
        "from torch.distributed import all_reduce",
        "import torch\ntorch.distributed.barrier()",
        "import importlib\nimportlib.import_module('ray')",
    ],
)
def test_checker_catches_violations(tmp_path, snippet):
    src = tmp_path / "bad.py"
    src.write_text(snippet + "\n")
    assert _violations(src), snippet


def test_checker_allows_clean_code(tmp_path):
    src = tmp_path / "ok.py"
    src.write_text("import torch\nfrom torch import nn\nimport raydiff_utils\nx = torch.cuda.is_available()\n")
    assert _violations(src) == []
