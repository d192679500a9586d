"""Every Triton kernel compiles for the GPUs the project targets, with the launch configurations
they would get, and fits them: tests/sm_compile.py in a process of its own (kernels there are
compiled JIT functions, not the interpreter's). On a GPU machine the suite compiles them for real."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU's own tests compile every kernel natively")
@pytest.mark.parametrize("arch", [8, 9, 10, 12], ids=["sm80", "sm90", "sm100", "sm120"])
def test_every_kernel_compiles_and_fits(arch):
    run = subprocess.run([sys.executable, "-m", "tests.sm_compile", "--arch", str(arch)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    assert "launches compiled" in run.stdout
