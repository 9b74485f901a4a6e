"""Stages that may skip their target start without importing torch.

On a machine without TensorRT, OpenVINO, ExecuTorch or an SSH device, a quick run has 14 engine
and export stages that only write `skipped` results; torch's import (about 3 s each on a 2-core
host, benchmarks/results/stage_startup_cpu_avx2.json) was most of their time. Their modules,
and the target modules they load before asking the target whether it is available, must keep
torch out of module scope: it is imported where a model is loaded.
"""

import subprocess
import sys

import pytest

from pipeline.codebase import PROJECT_ROOT

SKIPPING_STAGES = {
    "engine": ("stages.engine", "targets.tensorrt", "targets.ssh"),
    "export_openvino": ("stages.export_openvino", "targets.openvino_cpu"),
    "export_executorch": ("stages.export_executorch", "targets.executorch_xnnpack"),
}


@pytest.mark.parametrize("stage", sorted(SKIPPING_STAGES))
def test_a_stage_that_may_skip_imports_no_torch_before_its_target_is_found(stage):
    modules = SKIPPING_STAGES[stage]
    probe = (f"import sys\nfor name in {modules!r}:\n    __import__(name)\n"
             "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]", f"{modules} imported {done.stdout.strip()}"


def test_the_probe_sees_a_torch_import():
    """The check above can fail: a module that does import torch is reported."""
    probe = "import sys\nimport pipeline.data\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "True"
