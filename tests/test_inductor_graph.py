"""torch.compile's Inductor runs the triton ops' kernels on the buffers they write, copying none,
and compiles generation's changing shapes: tests/inductor_graph.py in a process of its own (there
the kernels are compiled JIT functions, as on a GPU, not the interpreter's). On a GPU machine the
graphs are that GPU's."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compiled_training_steps_copy_no_buffer():
    run = subprocess.run([sys.executable, "-m", "tests.inductor_graph"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    assert "training steps compiled by Inductor" in run.stdout
    assert "copies: none" in run.stdout and "generation compiled" in run.stdout
