"""The driver's start-up imports (orchestrator/background_import.py) and the plan's torch-free GPU
check (orchestrator/plan.py): what they leave out of the path to the first step, and that they
change no answer."""

from __future__ import annotations

import pytest
from fresh_python import run_fresh_python

from orchestrator import plan as plan_mod
from orchestrator.background_import import import_in_background


def test_modules_import_in_the_background_and_a_missing_one_is_left_to_its_importer():
    code = ("import sys; from orchestrator.background_import import import_in_background; "
            "t = import_in_background('colorsys', 'no_such_module_xyz', 'json.tool'); t.join(60); "
            "print(t.is_alive(), 'colorsys' in sys.modules, 'json.tool' in sys.modules, 'no_such_module_xyz' in sys.modules)")
    assert run_fresh_python(code) == "False True True False"
    # The caller's own import of a missing module still fails where it is needed.
    import_in_background("no_such_module_xyz").join(60)
    with pytest.raises(ImportError):
        __import__("no_such_module_xyz")


def test_a_machine_without_gpu_drivers_plans_for_cpu_without_importing_torch():
    from ray._private.accelerators import AMDGPUAcceleratorManager, NvidiaGPUAcceleratorManager

    if NvidiaGPUAcceleratorManager.get_current_node_num_accelerators() or \
            AMDGPUAcceleratorManager.get_current_node_num_accelerators():
        pytest.skip("this machine has GPUs")
    code = ("import sys; from orchestrator.config import load_config; from orchestrator.plan import make_plan; "
            "p = make_plan(load_config(None, ['model.name=unet-tiny'])); print(p.device, 'torch' in sys.modules)")
    assert run_fresh_python(code) == "cpu False"


def test_where_a_driver_reports_gpus_torch_decides(monkeypatch):
    import torch
    from ray._private.accelerators import NvidiaGPUAcceleratorManager

    monkeypatch.setattr(NvidiaGPUAcceleratorManager, "get_current_node_num_accelerators", staticmethod(lambda: 1))
    # A CPU-only torch build on a GPU machine: torch cannot use the GPU, so the plan says no.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan_mod._cluster_has_gpus(None) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert plan_mod._cluster_has_gpus(None) is True


def test_a_failing_gpu_probe_leaves_the_answer_to_torch(monkeypatch):
    import torch
    from ray._private.accelerators import NvidiaGPUAcceleratorManager

    def broken():
        raise RuntimeError("NVML: driver/library version mismatch")

    monkeypatch.setattr(NvidiaGPUAcceleratorManager, "get_current_node_num_accelerators", staticmethod(broken))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert plan_mod._cluster_has_gpus(None) is True
