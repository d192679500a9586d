"""RMSNorm and LayerNorm over the last dimension: the torch reference and the Triton kernels.

Both norms share one kernel family, switched by the constexprs IS_RMS and HAS_BIAS, in the
style of flash-attention's Triton layer norm:

* forward: each program normalizes a tile of ROWS rows x BLOCK_N columns held in registers,
  writes y in x's dtype and saves the fp32 statistics backward needs (rstd, and the mean for
  LayerNorm). All arithmetic is fp32; padded lanes are kept out of the mean and variance.
* backward: each program walks a contiguous range of rows, writes dx, and sums its rows'
  dw (and db) terms in fp32 registers, stored as its own row of a (programs, N) fp32 buffer
  that torch then sums over programs. No atomics: dw and db are bit-identical run to run.

Rows up to MAX_N = 65536 elements are held in one block; wider rows are refused with a
ValueError that states the limit, rather than looped over (GPT hidden sizes are far below it,
and one block keeps x in registers from the statistics to the output). Compiled for sm90, rows of
up to 8192 elements keep everything in registers (16 elements of each row per thread, stored and
loaded as 16-byte vectors when N is a multiple of 8). Wider rows reach the 1024-thread block's 64
registers a thread, and the backward, which holds x, dy and the dw (and db) sums, spills: 48-184
bytes a thread up to 16384, 0.5-2.5 KB at 32768-65536 (the forward only past 32768). Still
correct; slower by an amount not yet measured. Looping over column chunks instead would read x
and dy a second time: which costs less is for a GPU to measure.

The triton backend takes float16, bfloat16 and float32; weight (and bias) may be another float
dtype than x (fp32 weights with bf16 activations), and dw, db come back in their own dtypes.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import runtime
from .checks import check_same, check_tensor
from .registry import register

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_N = 65536  # widest row one block holds

# Launch heuristics, shared by forward and backward.
_MIN_BLOCK = 16  # tiny rows still get an ordinary vector layout
_TILE = 4096  # elements per tile: narrow rows are stacked TILE // BLOCK_N deep, so each
#               program moves >= 8 KB of bf16 per tensor (enough bytes in flight)
_ELEMS_PER_THREAD = 16  # two 16-byte bf16 vectors per thread and tensor; sets num_warps
_BWD_WARPS_PER_SM = 32  # backward grid: resident warps per SM it aims for to hide latency,
#                         with few enough programs that the fp32 partials stay a few % of traffic


def check_norm(op: str, x, weight, bias=None) -> None:
    check_tensor(op, "x", x)
    check_tensor(op, "weight", weight, ndim=1)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape ({x.shape[-1]},) to match x's last "
                         f"dimension, got {tuple(weight.shape)}")
    tensors = {"x": x, "weight": weight}
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1)
        check_same(op, "shape", weight=weight, bias=bias)
        tensors["bias"] = bias
    check_same(op, "device", **tensors)


@register("rms_norm", "torch")
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    check_norm("rms_norm", x, weight)
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


@register("layer_norm", "torch")
def layer_norm_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
    check_norm("layer_norm", x, weight, bias)
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), weight.shape, weight.float(), b, eps).to(x.dtype)


@triton.jit
def _norm_fwd_kernel(
    X,  # input (M, N), last dim contiguous
    Y,  # output (M, N), contiguous, x's dtype
    W,  # weight (N,)
    B,  # bias (N,); unused unless HAS_BIAS
    Mean,  # fp32 (M,): row means, written for LayerNorm only
    Rstd,  # fp32 (M,): 1 / sqrt(variance + eps) per row (mean square for RMSNorm)
    stride_x,  # elements between rows of X (any value: sliced or expanded rows need no copy)
    stride_y,  # elements between rows of Y
    M,  # rows
    N,  # elements per row
    eps,  # added to the variance
    IS_RMS: tl.constexpr,  # RMSNorm (no centering) or LayerNorm
    HAS_BIAS: tl.constexpr,  # add B
    ROWS: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns, a power of two >= N
):
    # int64 row indices: row * stride passes 2^31 in tensors over 2^31 elements.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / N
        tl.store(Mean + rows, mean, mask=row_ok)
        # Padded lanes would add mean^2 each to the variance: zero them.
        xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
    tl.store(Rstd + rows, rstd, mask=row_ok)
    w = tl.load(W + cols, mask=col_ok).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    X,  # forward input (M, N), last dim contiguous
    DY,  # gradient of the output (M, N), last dim contiguous
    DX,  # gradient of the input (M, N), contiguous, x's dtype
    W,  # weight (N,)
    Mean,  # fp32 (M,) from the forward; unused for RMSNorm
    Rstd,  # fp32 (M,) from the forward
    DW,  # fp32 (programs, N): this program's sum over its rows of dy * xhat
    DB,  # fp32 (programs, N): this program's sum of dy; unused unless HAS_BIAS
    stride_x,  # elements between rows of X
    stride_dy,  # elements between rows of DY
    stride_dx,  # elements between rows of DX
    M,  # rows
    N,  # elements per row
    rows_per_program,  # rows each program owns, a multiple of ROWS
    IS_RMS: tl.constexpr,  # RMSNorm or LayerNorm
    HAS_BIAS: tl.constexpr,  # produce db
    ROWS: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns, a power of two >= N
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok).to(tl.float32)
    # Keep whole tiles of partial sums, reduced over rows once at the end, so the loop needs no
    # cross-warp reduction for dw and db.
    dw = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for start in range(row_start, row_end, ROWS):
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        # Masked-out rows and lanes load dy = 0, so they add nothing to dw, db or the row sums.
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
        # dx = rstd * (w*dy - xhat * mean(xhat * w*dy) [- mean(w*dy) for LayerNorm])
        c1 = tl.sum(xhat * wdy, axis=1) / N
        if IS_RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid * N + cols, tl.sum(dw, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB + pid * N + cols, tl.sum(db, axis=0), mask=col_ok)


def _tile(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for rows of n elements."""
    block_n = max(triton.next_power_of_2(n), _MIN_BLOCK)
    rows = max(1, _TILE // block_n)
    num_warps = min(max(rows * block_n // (32 * _ELEMS_PER_THREAD), 1), 32)
    return block_n, rows, num_warps


def backward_programs(m: int, n: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program) of the backward for m rows of n elements: contiguous ranges
    of whole tiles, at most num_sms x (_BWD_WARPS_PER_SM / num_warps) programs."""
    _block_n, rows, num_warps = _tile(n)
    tiles = triton.cdiv(m, rows)
    max_programs = runtime.num_sms(device) * max(1, _BWD_WARPS_PER_SM // num_warps)
    tiles_per_program = max(1, triton.cdiv(tiles, max_programs))
    return max(1, triton.cdiv(tiles, tiles_per_program)), tiles_per_program * rows


@torch.library.triton_op("tritongpt::norm_fwd", mutates_args=())
def _norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
              rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mean, rstd of x (M, N) with x.stride(1) == 1; mean is empty for RMSNorm."""
    m, n = x.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    mean = torch.empty((0 if rms else m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return y, mean, rstd
    block_n, rows, num_warps = _tile(n)
    with runtime.on_device(x):
        runtime.wrap_triton(_norm_fwd_kernel)[(triton.cdiv(m, rows),)](
            x, y, weight, weight if bias is None else bias, rstd if rms else mean, rstd,
            x.stride(0), y.stride(0), m, n, eps,
            IS_RMS=rms, HAS_BIAS=bias is not None, ROWS=rows, BLOCK_N=block_n, num_warps=num_warps)
    return y, mean, rstd


@torch.library.triton_op("tritongpt::norm_bwd", mutates_args=())
def _norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
              rstd: torch.Tensor, rms: bool, has_bias: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, and fp32 dw and db (zeros unless has_bias), for x, dy (M, N) with stride(1) == 1."""
    m, n = x.shape
    block_n, rows, num_warps = _tile(n)
    programs, rows_per_program = backward_programs(m, n, x.device)
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # Every program writes its whole row of partial sums: zero them only when none runs.
    partials = torch.empty if m > 0 else torch.zeros
    dw = partials((programs, n), dtype=torch.float32, device=x.device)
    db = partials((programs if has_bias else 0, n), dtype=torch.float32, device=x.device)
    if m > 0:
        with runtime.on_device(x):
            runtime.wrap_triton(_norm_bwd_kernel)[(programs,)](
                x, dy, dx, weight, rstd if rms else mean, rstd, dw, db if has_bias else dw,
                x.stride(0), dy.stride(0), dx.stride(0), m, n, rows_per_program,
                IS_RMS=rms, HAS_BIAS=has_bias, ROWS=rows, BLOCK_N=block_n, num_warps=num_warps)
    return dx, dw.sum(0), db.sum(0)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _eps, rms = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.rms = rms
    ctx.has_bias = bias is not None
    ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    if dy.stride(-1) != 1:  # e.g. the expanded ones of y.sum().backward()
        dy = dy.contiguous()
    dx, dw, db = _norm_bwd(dy, x, weight, mean, rstd, ctx.rms, ctx.has_bias)
    w_dtype, b_dtype = ctx.dtypes
    return dx, dw.to(w_dtype), (db.to(b_dtype) if ctx.has_bias else None), None, None


_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _norm_triton(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 eps: float, rms: bool) -> torch.Tensor:
    check_norm(op, x, weight, bias)
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(op, name, t, dtypes=TRITON_DTYPES)
    if x.shape[-1] > MAX_N:
        raise ValueError(f"{op}: the triton backend holds a row in one block, at most {MAX_N} "
                         f"elements; got {x.shape[-1]}")
    if x.device.type != "cuda" and not (runtime.INTERPRET and x.device.type == "cpu"):
        raise ValueError(f"{op}: the triton backend runs on CUDA tensors (or on CPU under "
                         f"TRITON_INTERPRET=1), got a tensor on {x.device}")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    bias = None if bias is None else bias.contiguous()
    y, _mean, _rstd = _norm_fwd(x2, weight.contiguous(), bias, float(eps), rms)
    return y.view(x.shape)


@register("rms_norm", "triton")
def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm_triton("rms_norm", x, weight, None, eps, rms=True)


@register("layer_norm", "triton")
def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      eps: float) -> torch.Tensor:
    return _norm_triton("layer_norm", x, weight, bias, eps, rms=False)
