"""Where the Triton backends run in this process: on CUDA tensors natively, and on CPU tensors
only in Triton's interpreter, which is on only where there is no GPU. On a GPU machine the CPU
cases of a Triton test skip: the backends rightly refuse CPU tensors there."""
import contextlib

import pytest
import torch

from bench.hardware import Device
from kernels import runtime

# GPUs a test pretends to run on (bench.hardware.detect's answer there)
H100 = Device(0, "NVIDIA H100 80GB HBM3", 132, 80.0, (9, 0))
A100 = Device(0, "NVIDIA A100-SXM4-80GB", 108, 80.0, (8, 0))


def cuda_only(test):
    """Marks `test` `cuda` (`pytest -m cuda` selects the GPU's tests; conftest runs them first
    when the suite has a deadline) and skips it without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


def two_gpus(test):
    """Marks `test` `cuda`, and skips it without two GPUs."""
    return pytest.mark.cuda(pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")(test))


@contextlib.contextmanager
def no_host_syncs():
    """CUDA work inside raises where it would make the host wait for the GPU (torch's sync debug
    mode "error"), the mode before restored after."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


interpreter_only = pytest.mark.skipif(
    not runtime.INTERPRET, reason="runs the Triton backends on CPU tensors: only in the interpreter, "
                                  "which is off on a machine with a GPU")


def skip_unless_interpreter_runs() -> None:
    """For a test whose subprocesses run the triton backends in Triton's interpreter (on CPU, on a
    machine with a GPU too): skips where these triton and numpy versions cannot run it."""
    import numpy
    import triton

    if (problem := runtime.interpreter_problem(triton.__version__, numpy.__version__)) is not None:
        pytest.skip(problem)


def skip_unless_triton_runs(backend: str, device: str) -> None:
    if backend == "triton" and device == "cpu" and not runtime.CPU_TENSORS:
        pytest.skip("the triton backend takes CPU tensors only in the interpreter (or sm_compile's stand-in)")


def compiled(fn, device: str, dynamic: bool | None = None):
    """torch.compile(fn, fullgraph=True) as the tests run it on `device`: Inductor on a GPU; on CPU
    AOT autograd's graphs run as they are, split into forward and backward by Inductor's min-cut
    partitioner (what a recomputed block runs again in backward, its dropout seeds saved or drawn
    again, is decided there as on a GPU): the triton ops are opaque custom ops there
    (kernels/runtime.py, triton_op), and Inductor's C++ builds would only add minutes.
    `dynamic`: torch.compile's (True: sizes and strides traced as symbols)."""
    if device == "cuda":
        return torch.compile(fn, fullgraph=True, backend="inductor", dynamic=dynamic)
    from functorch.compile import min_cut_rematerialization_partition, nop
    from torch._dynamo.backends.common import aot_autograd

    backend = aot_autograd(fw_compiler=nop, bw_compiler=nop, partition_fn=min_cut_rematerialization_partition)
    return torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)
