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
A launch reads up to three sources into one buffer, turning the heads of the first ones and
copying the rest: attention's q and k turned and v beside them in one launch (rotate_beside), not
three (on a CPU, through a compile-only stand-in for an sm90 driver, the host time of attention's
forward with RoPE fell from 98-102 us to 83 us).
"""
import torch
import triton
import triton.language as tl

from . import runtime
from .runtime import wrap_triton  # bare names: see wrap_triton's docstring
from .checks import FLOAT_DTYPES, TRITON_DTYPES, check_same, check_tensor
from .registry import register

# Launch heuristics: _TILE elements of each half per program (8 KB of bf16 per half), in a tile
# of whole half-rows of consecutive positions of one (batch, head). 8 warps give each thread 16
# elements per half (two 16-byte bf16 vectors) and 16 of each fp32 table: compiled for sm90
# (triton 3.8), 32 registers a thread at D = 64 and 56 at D = 128, against 56 and 96 with 4 warps,
# so about twice the warps per SM for the same bytes in flight.
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
def _pick(first, second, a, b, c):
    """a for a program among the first source's heads, b among the second's, else c."""
    return tl.where(first, a, tl.where(second, b, c))


@triton.jit
def _rope_kernel(
    X0, X1, X2,  # sources (B, H_i, T, D), any strides: the grid's heads are X0's, then X1's, then X2's
    Y,  # output: a (B, T, heads, D) buffer in the sources' dtype, whose first heads (the grid's) this writes
    Cos,  # (T, HALF) fp32, contiguous
    Sin,  # (T, HALF) fp32, contiguous
    T,  # positions
    HALF,  # D / 2: the pairs per head vector
    heads0, heads1,  # heads of X0 and of X1 (X2 has the grid's rest)
    n_turned,  # the grid's heads [0, n_turned) are turned, the rest copied as they are (attention's v)
    stride_0b, stride_0h, stride_0t,  # (b, h, t) strides of each source, in elements
    stride_1b, stride_1h, stride_1t,
    stride_2b, stride_2h, stride_2t,
    stride_xd,  # the sources' D stride (one for all, so that 1 stays a compile-time constant: 16-byte vectors)
    stride_yb, stride_yh, stride_yt, stride_yd,  # Y's heads' strides, in elements
    INVERSE: tl.constexpr,  # negate sin: the transpose, for the backward
    BLOCK_T: tl.constexpr,  # positions per program
    BLOCK_HALF: tl.constexpr,  # a power of two >= HALF
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    first, second = g < heads0, g < heads0 + heads1
    h = _pick(first, second, g, g - heads0, g - heads0 - heads1).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    mask = (t < T)[:, None] & (d < HALF)[None, :]
    # int64 offsets: a (B, H, T, D) view of a large qkv projection passes 2^31 elements, whichever
    # of its strides is the large one.
    t64, d1, d2 = t[:, None].to(tl.int64), d[None, :].to(tl.int64), (d[None, :] + HALF).to(tl.int64)
    x_row = (_pick(first, second, X0, X1, X2) + b * _pick(first, second, stride_0b, stride_1b, stride_2b)
             + h * _pick(first, second, stride_0h, stride_1h, stride_2h)
             + t64 * _pick(first, second, stride_0t, stride_1t, stride_2t))
    y_row = Y + b * stride_yb + g.to(tl.int64) * stride_yh + t64 * stride_yt
    x1 = tl.load(x_row + d1 * stride_xd, mask=mask).to(tl.float32)
    x2 = tl.load(x_row + d2 * stride_xd, mask=mask).to(tl.float32)
    if g < n_turned:
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


def rotate(x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> None:
    """x (B, H, T, D) turned by the tables' angles (sin negated if `inverse`: the transpose) into
    the first H heads of y, a (B, T, heads, D) buffer (runtime.empty_heads). x may be those heads
    of y itself: each program reads its pairs before writing them."""
    _launch((x,), y, cos, sin, inverse, n_turned=x.shape[1])


def rotate_beside(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, y: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> None:
    """q and k turned by the tables' angles and v copied as it is into y's heads, in that order:
    attention's buffer, in one launch. (In a torch.compile'd graph a kernel writing its buffer,
    where a torch copy of v into part of it is functionalized into a copy of the whole of it.)"""
    _launch((q, k, v), y, cos, sin, False, n_turned=q.shape[1] + k.shape[1])


def _launch(sources: tuple[torch.Tensor, ...], y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            inverse: bool, n_turned: int) -> None:
    B, _, T, D = sources[0].shape
    # One D stride for all: unit ones kept, the others copied. (Compared, not hashed in a set: under
    # torch.compile's dynamic shapes a stride may be a symbol, which cannot be hashed.)
    if any(x.stride(3) != sources[0].stride(3) for x in sources[1:]):
        sources = tuple(runtime.unit_stride_d(x) for x in sources)
    heads = [x.shape[1] for x in sources] + [0] * (3 - len(sources))  # sources past the given hold no heads
    if B * sum(heads) * T * D:
        block_half = runtime.next_power_of_2(D // 2)
        block_t = max(1, min(_TILE // block_half, runtime.next_power_of_2(T)))
        padded = sources + sources[:1] * (3 - len(sources))
        strides = [s for x in padded for s in x.stride()[:3]]
        with runtime.on_device(y):
            wrap_triton(_rope_kernel)[(runtime.cdiv(T, block_t), sum(heads), B)](
                *padded, y, cos, sin, T, D // 2, heads[0], heads[1], n_turned, *strides,
                sources[0].stride(3), *runtime.head_strides(y), INVERSE=inverse, BLOCK_T=block_t,
                BLOCK_HALF=block_half, num_warps=_NUM_WARPS)


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
