"""How Triton runs here: natively on a CUDA GPU, else in its CPU interpreter, and the few launch
helpers every op file shares.

The interpreter is switched on before any kernel is defined, because `triton.jit` reads
TRITON_INTERPRET when it decorates. An explicit TRITON_INTERPRET in the environment is kept.
"""
import contextlib
import functools
import os
import warnings

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# True when kernels run in Triton's CPU interpreter. The interpreter has no bf16 arithmetic and
# its bf16 `tl.dot` multiplies bit patterns (triton-lang/triton#4972, #11584): kernels load, cast
# to fp32 at once, and are given this as a constexpr so their `tl.dot` operands stay fp32.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run the kernels with these versions, or None."""
    def major_minor(version: str) -> tuple[int, int]:
        return tuple(int(part) for part in version.split(".")[:2])

    # Triton 3.6's interpreter turns a kernel's scalar arguments into one-element arrays and
    # takes int() of them (a loop bound, say): numpy 2.4 made that an error. Triton 3.7 and
    # later pass 0-d arrays.
    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter fails with numpy {numpy_version} (>= 2.4): "
                f"the Triton kernels cannot run on CPU here (pip install 'numpy<2.4', or triton>=3.7)")
    return None


import triton  # noqa: E402  (after TRITON_INTERPRET is settled)

if INTERPRET:
    import numpy

    if (problem := interpreter_problem(triton.__version__, numpy.__version__)) is not None:
        warnings.warn(problem, stacklevel=2)

# Streams of fewer than this many rows run on the interpreter in reasonable time; kernels that
# size grids by SM count use it on CPU so tests stay quick.
_INTERPRETER_SMS = 4


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a small stand-in on CPU)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def wrap_triton(kernel):
    """`kernel` as a triton_op launches it: through torch.library.wrap_triton, so torch.compile
    traces the launch. Interpreted kernels go as they are: torch.compile cannot run them, and
    torch before 2.13 refuses to wrap them (it takes only compiled JIT functions)."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


def on_device(t: torch.Tensor):
    """Context that launches kernels on `t`'s own GPU (Triton launches on the current one).
    Under torch.compile Inductor places the launch itself."""
    if t.device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # torch's caching allocator on the current device (on_device has set it); its blocks are
    # 512-byte aligned, more than any alignment Triton asks for.
    return torch.empty(size, dtype=torch.uint8, device="cuda")


def set_scratch_allocator() -> None:
    """Give Triton the allocator its launches take global scratch from (device-side tensor
    descriptors keep their 128 bytes there). Triton keeps it in a context variable, and autograd
    runs the backward in a thread of its own, so each launch that needs scratch sets it first, as
    torch.compile's launcher does for its kernels."""
    if not INTERPRET:  # the interpreter keeps descriptors on the host
        triton.set_allocator(_scratch)
