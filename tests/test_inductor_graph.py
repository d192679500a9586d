"""torch.compile's Inductor runs the triton ops' kernels on the buffers they write, copying none,
and compiles generation's changing shapes: tests/inductor_graph.py in a process of its own (there
the kernels are compiled JIT functions, as on a GPU, not the interpreter's). On a GPU machine the
graphs are that GPU's. The process starts in the background at collection (tests/background.py)."""
import sys

import pytest

from tests import background

COMMAND = (sys.executable, "-m", "tests.inductor_graph")


@pytest.mark.background(COMMAND)
def test_compiled_training_steps_copy_no_buffer():
    run = background.result(COMMAND)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    assert "training steps compiled by Inductor" in run.stdout
    assert "copies: none" in run.stdout and "generation compiled" in run.stdout
