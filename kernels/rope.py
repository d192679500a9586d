"""Rotary position embedding (RoPE) of queries or keys: the torch reference and the Triton kernel.

The rotation is LLaMA's (as in Hugging Face's GPT-NeoX/LLaMA code): each head vector x of size D
is split into halves x1 = x[:D/2], x2 = x[D/2:], and pair i is turned by the angle of its position
and frequency: (x1*cos - x2*sin, x1*sin + x2*cos), with cos and sin tables (T, D/2) from the model.

Written in torch (upcast, chunk, four products, two sums, a concatenation, a downcast) that is
about eight passes over q and eight over k in the forward, and as many in the backward, each
with fp32 intermediates; torch.compile fuses them, eager torch cannot. The Triton kernel is one
pass: it reads x's two halves where they lie (the strided q and k views of the model's qkv
projection: no copy), computes in fp32 and writes the rotated x in (B, T, H, D) layout, which the
attention kernel reads as it reads any layout. The backward is the same kernel applying the
transpose (for rotations, the inverse: the angle negated), so nothing is saved but the tables.
"""
import torch
import triton
import triton.language as tl

from . import runtime
from .runtime import wrap_triton  # bare names: see wrap_triton's docstring
from .checks import FLOAT_DTYPES, check_same, check_tensor
from .registry import register

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Launch heuristics: _TILE elements of each half per program (8 KB of bf16 per half), in a tile
# of whole half-rows of consecutive positions of one (batch, head). 8 warps give each thread 16
# elements per half (two 16-byte bf16 vectors) and 16 of each fp32 table: 64 registers, against
# 128 with 4 warps (compiled for sm90), so twice the warps per SM for the same bytes in flight.
_TILE = 4096
_NUM_WARPS = 8


def check_rope(x, cos, sin, dtypes=FLOAT_DTYPES) -> None:
    """The arguments, x in `dtypes` (a backend's own set)."""
    check_tensor("rope", "x", x, dtypes)
    if x.dim() != 4:
        raise ValueError(f"rope: x must be (B, H, T, D), got shape {tuple(x.shape)}")
    check_tables("rope", x, cos, sin)


def check_tables(op: str, x, cos, sin) -> None:
    """cos and sin fit x (B, H, T, D), which `op` rotates: each (T, D/2), D even, on x's device."""
    check_tensor(op, "cos", cos, ndim=2)
    check_tensor(op, "sin", sin, ndim=2)
    B, H, T, D = x.shape
    if D % 2:
        raise ValueError(f"{op}: rope needs an even head dim D, got shape {tuple(x.shape)}")
    if tuple(cos.shape) != (T, D // 2):
        raise ValueError(f"{op}: cos and sin must have shape (T, D/2) = {(T, D // 2)} for x of shape "
                         f"{tuple(x.shape)}, got {tuple(cos.shape)}")
    check_same(op, "shape", cos=cos, sin=sin)
    check_same(op, "device", x=x, cos=cos, sin=sin)


def triton_tables(op: str, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables as the kernel reads them (contiguous fp32 constants), or a ValueError."""
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(op, name, table, dtypes=(torch.float32,))
        if table.requires_grad:
            raise ValueError(f"{op}: the triton backend takes the {name} table as a constant; "
                             f"it must not require grad")
    return cos.contiguous(), sin.contiguous()


@register("rope", "torch")
def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    check_rope(x, cos, sin)
    return turned(x, cos, sin)


def turned(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The torch backend's rotation of checked arguments, in at least fp32, returned in x's dtype."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


@triton.jit
def _rope_kernel(
    X,  # input (B, H, T, D), any strides
    Y,  # output: a (B, T, heads, D) buffer in X's dtype, whose heads [y_head, y_head + H) this writes
    y_head,  # Y's first head
    Cos,  # (T, HALF) fp32, contiguous (unread unless TURN)
    Sin,  # (T, HALF) fp32, contiguous (unread unless TURN)
    T,  # positions
    HALF,  # D / 2: the pairs per head vector
    stride_xb, stride_xh, stride_xt, stride_xd,  # strides of X and Y, in elements
    stride_yb, stride_yh, stride_yt, stride_yd,
    TURN: tl.constexpr,  # False: X copied into Y as it is (place)
    INVERSE: tl.constexpr,  # negate sin: the transpose, for the backward
    BLOCK_T: tl.constexpr,  # positions per program
    BLOCK_HALF: tl.constexpr,  # a power of two >= HALF
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    mask = (t < T)[:, None] & (d < HALF)[None, :]
    # int64 offsets: a (B, H, T, D) view of a large qkv projection passes 2^31 elements, whichever
    # of its strides is the large one.
    t64, d1, d2 = t[:, None].to(tl.int64), d[None, :].to(tl.int64), (d[None, :] + HALF).to(tl.int64)
    x_row = X + b * stride_xb + h * stride_xh + t64 * stride_xt
    y_row = Y + b * stride_yb + (y_head + h) * stride_yh + t64 * stride_yt
    x1 = tl.load(x_row + d1 * stride_xd, mask=mask).to(tl.float32)
    x2 = tl.load(x_row + d2 * stride_xd, mask=mask).to(tl.float32)
    if TURN:
        table = t[:, None] * HALF + d[None, :]
        cos = tl.load(Cos + table, mask=mask)
        sin = tl.load(Sin + table, mask=mask)
        if INVERSE:
            sin = -sin
        y1, y2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    else:
        y1, y2 = x1, x2  # exact: fp32 holds every 16-bit value
    tl.store(y_row + d1 * stride_yd, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_row + d2 * stride_yd, y2.to(Y.dtype.element_ty), mask=mask)


def rotate(x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool,
           y_head: int = 0) -> None:
    """x (B, H, T, D) turned by the tables' angles (sin negated if `inverse`: the transpose) into
    heads [y_head, y_head + H) of y, a (B, T, heads, D) buffer (runtime.empty_heads). x may be
    those heads of y itself: each program reads its pairs before writing them."""
    _launch(x, y, y_head, (cos, sin), inverse)


def place(x: torch.Tensor, y: torch.Tensor, y_head: int) -> None:
    """x (B, H, T, D) copied as it is into heads [y_head, y_head + H) of y, as rotate writes them:
    in a torch.compile'd graph a kernel writing its buffer, where a torch copy into part of a
    buffer is functionalized into a copy of the whole of it."""
    _launch(x, y, y_head, None, False)


def _launch(x: torch.Tensor, y: torch.Tensor, y_head: int, tables: tuple[torch.Tensor, torch.Tensor] | None,
            inverse: bool) -> None:
    B, H, T, D = x.shape
    if x.numel():
        block_half = runtime.next_power_of_2(D // 2)
        block_t = max(1, min(_TILE // block_half, runtime.next_power_of_2(T)))
        cos, sin = tables or (y, y)  # not read without TURN
        with runtime.on_device(x):
            wrap_triton(_rope_kernel)[(runtime.cdiv(T, block_t), H, B)](
                x, y, y_head, cos, sin, T, D // 2, *x.stride(), *runtime.head_strides(y),
                TURN=tables is not None, INVERSE=inverse, BLOCK_T=block_t, BLOCK_HALF=block_half,
                num_warps=_NUM_WARPS)


@runtime.triton_op("tritongpt::rope", mutates_args=())
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x (B, H, T, D) turned by the tables' angles (with sin negated if `inverse`: the transpose),
    laid out as (B, T, H, D)."""
    B, H, T, D = x.shape
    y = runtime.empty_heads(x, B, T, H, D)
    rotate(x, y, cos, sin, inverse)
    return y.transpose(1, 2)


def _setup_context(ctx, inputs, output) -> None:
    _x, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _backward(ctx, dy: torch.Tensor):
    cos, sin = ctx.saved_tensors
    return _rope(dy, cos, sin, not ctx.inverse), None, None, None


_rope.register_autograd(_backward, setup_context=_setup_context, differentiable_backward=True)  # the op again


@register("rope", "triton")
def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    check_rope(x, cos, sin, TRITON_DTYPES)
    cos, sin = triton_tables("rope", cos, sin)
    runtime.check_device("rope", x)
    runtime.check_grid("rope", batch=x.shape[0], heads=x.shape[1])
    return _rope(x, cos, sin, False)
