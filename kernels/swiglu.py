"""SwiGLU gating, silu(gate) * up: torch reference and Triton kernels.

The Triton backend treats every input as a (rows, cols) matrix with unit column stride and its own
row stride. That covers contiguous tensors and, with no copy, the halves of one projection's output:
`gate, up = h.chunk(2, dim=-1)` gives views with row stride 2*cols, so the model can use a single
[2*hidden, n_embd] matmul and the kernel reads h directly. Backward writes d_gate and d_up side by
side into one (rows, 2*cols) buffer: for the halves of h that is exactly d_h, which the model's
kernels.split hands on without the copy chunk's backward would make.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import runtime
from .runtime import LOG2E, tile, wrap_triton  # bare names: see wrap_triton's docstring
from .checks import TRITON_DTYPES, check_same, check_tensor
from .registry import register


def check_swiglu(gate, up) -> None:
    check_tensor("swiglu", "gate", gate)
    check_tensor("swiglu", "up", up)
    check_same("swiglu", "shape", gate=gate, up=up)
    check_same("swiglu", "dtype", gate=gate, up=up)
    check_same("swiglu", "device", gate=gate, up=up)


@register("swiglu", "torch")
def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    check_swiglu(gate, up)
    compute = torch.promote_types(gate.dtype, torch.float32)  # fp32, or float64 for a float64 reference
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


@triton.jit
def _sigmoid(g):
    """1 / (1 + e^-g) to a few ulp for every g. tl.sigmoid's e^-g is 2^(-g * log2 e) with that
    product rounded first, an error of |g| * 2^-24 in the exponent: 20 ulp of the result at
    |g| = 30, where torch's is 1. Here -g = n * ln2 + r with n * ln2's high part exact
    (Cody-Waite), so only the small r goes through a rounded product. -g is clamped to +-200,
    where e^-g is 0 or inf in fp32 already: n * ln2_hi stays exact, and infinite gates give 0
    and 1, not NaN. 2^n is taken as 2^(n-1) * 2: for -g from 127.5 ln2 to fp32's limit (88.38
    to 88.72) n is 128, past fp32's range though e^-g is not."""
    x = tl.minimum(tl.maximum(-g, -200.0), 200.0)
    n = tl.floor(x * LOG2E + 0.5)  # the nearest power of two: e^x = 2^n * e^r
    r = (x - n * 0.693145751953125) - n * 1.4286068202862268e-06  # ln2's fp32 high part has 15 bits
    return 1.0 / (1.0 + tl.math.exp2(n - 1.0) * (2.0 * tl.math.exp2(r * LOG2E)))


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr,  # (n_rows, n_cols), unit column stride
    up_ptr,  # (n_rows, n_cols), unit column stride
    y_ptr,  # (n_rows, n_cols) output, unit column stride, dtype of gate
    stride_gate,  # row strides, in elements
    stride_up,
    stride_y,
    n_rows,
    n_cols,
    BLOCK_R: tl.constexpr,  # tile rows
    BLOCK_C: tl.constexpr,  # tile columns (a power of two)
):
    rows, cols, mask = tile(n_rows, n_cols, BLOCK_R, BLOCK_C)
    rows, cols = rows[:, None], cols[None, :]
    # fp32 at once: one rounding, at the store (and the interpreter has no bf16 arithmetic).
    g = tl.load(gate_ptr + rows * stride_gate + cols, mask=mask).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_up + cols, mask=mask).to(tl.float32)
    y = g * _sigmoid(g) * u
    tl.store(y_ptr + rows * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    gate_ptr,  # (n_rows, n_cols) saved forward input, unit column stride
    up_ptr,  # (n_rows, n_cols) saved forward input, unit column stride
    dy_ptr,  # (n_rows, n_cols) gradient of the output, unit column stride
    dgu_ptr,  # (n_rows, 2 * n_cols) output, contiguous: d_gate, then d_up, side by side in each row
    stride_gate,  # row strides, in elements
    stride_up,
    stride_dy,
    n_rows,
    n_cols,
    BLOCK_R: tl.constexpr,  # tile rows
    BLOCK_C: tl.constexpr,  # tile columns (a power of two)
):
    rows, cols, mask = tile(n_rows, n_cols, BLOCK_R, BLOCK_C)
    rows, cols = rows[:, None], cols[None, :]
    g = tl.load(gate_ptr + rows * stride_gate + cols, mask=mask).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_up + cols, mask=mask).to(tl.float32)
    dy = tl.load(dy_ptr + rows * stride_dy + cols, mask=mask).to(tl.float32)
    # Recomputing sigmoid costs no memory traffic; saving it would cost an activation-sized buffer.
    s = _sigmoid(g)
    # silu'(g) = s + g*s*(1-s), factored so that it stays finite as s saturates to 0 or 1.
    dgate = dy * u * s * (1.0 + g * (1.0 - s))
    dup = dy * g * s
    dgate_ptrs = dgu_ptr + rows * 2 * n_cols + cols  # int64 rows first: 2 * n_cols passes 2^31 at rows 2^30 wide
    tl.store(dgate_ptrs, dgate.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptrs + n_cols, dup.to(dgu_ptr.dtype.element_ty), mask=mask)


@runtime.triton_op("tritongpt::swiglu", mutates_args=())
def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g, u = runtime.as_rows(gate), runtime.as_rows(up)
    # Returned whole, not as a view of the rows the kernel writes: an output that is a view made
    # inside the autograd Function cannot be changed in place afterwards.
    y = torch.empty(gate.shape, dtype=g.dtype, device=g.device)
    if y.numel():
        with runtime.on_device(y):
            runtime.launch_tiles(wrap_triton(_swiglu_fwd_kernel), *g.shape, g, u, y, g.stride(0), u.stride(0),
                                 g.shape[1])
    return y


@runtime.triton_op("tritongpt::swiglu_backward", mutates_args=())
def _swiglu_backward(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """d_gate and d_up side by side: a (rows, 2*cols) buffer (one output, as a custom op's outputs
    may not alias each other)."""
    g, u, d = runtime.as_rows(gate), runtime.as_rows(up), runtime.as_rows(dy)
    n_rows, n_cols = g.shape
    dgu = torch.empty((n_rows, 2 * n_cols), dtype=g.dtype, device=g.device)
    if dgu.numel():
        with runtime.on_device(dgu):
            runtime.launch_tiles(wrap_triton(_swiglu_bwd_kernel), n_rows, n_cols, g, u, d, dgu, g.stride(0),
                                 u.stride(0), d.stride(0))
    return dgu


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy: torch.Tensor):
    gate, up = ctx.saved_tensors
    dgate, dup = _swiglu_backward(gate, up, dy).chunk(2, dim=-1)
    return dgate.view(gate.shape), dup.view(up.shape)


_swiglu.register_autograd(_backward, setup_context=_setup_context)


@register("swiglu", "triton")
def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    check_swiglu(gate, up)
    check_tensor("swiglu", "gate", gate, dtypes=TRITON_DTYPES)
    runtime.check_device("swiglu", gate)
    return _swiglu(gate, up)
