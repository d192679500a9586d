"""RMSNorm and LayerNorm over the last dimension: the torch reference and the Triton kernels.

Both norms share one kernel family, switched by the constexprs IS_RMS and HAS_BIAS, in the
style of flash-attention's Triton layer norm:

* forward: each program normalizes a tile of ROWS rows x BLOCK_N columns held in registers,
  writes y and saves the fp32 statistics backward needs (rstd, and the mean for LayerNorm).
  All arithmetic is fp32; padded lanes are kept out of the mean and variance.
* backward: each program walks a contiguous range of rows, writes dx, and sums its rows'
  dw (and db) terms in fp32 registers, stored as its own row of a (programs, N) fp32 buffer
  that torch then sums over programs. No atomics: dw and db are bit-identical run to run.

Two options serve the pre-norm residual stream, in the way of flash-attention's layer norm
(`residual`, `out_dtype`):
* `residual`: the op normalizes s = x + residual and returns (y, s). A pre-norm block's
  `stream = stream + branch; h = norm(stream)` is then one pass (x and residual read, s and y
  written) instead of an add and a norm, and the backward adds the gradient arriving at s to the
  norm's dx in the same pass instead of autograd adding them apart. s is rounded to its dtype
  before the statistics, so the norm sees exactly the s it returns and backward reloads.
* `out_dtype`: y's dtype. Under autocast the model's norm outputs go straight into matmuls that
  would cast them to bf16; writing bf16 at once skips that cast and its backward's, and halves
  the bytes of y and dy (the same numbers: both round the fp32 result to nearest).

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
from .checks import FLOAT_DTYPES, check_same, check_tensor, dtype_names
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


def check_norm(op: str, x, weight, bias=None, residual=None, out_dtype=None,
               dtypes=FLOAT_DTYPES) -> None:
    """The arguments of either norm, every floating tensor in `dtypes` (a backend's own set)."""
    check_tensor(op, "x", x, dtypes)
    check_tensor(op, "weight", weight, dtypes, ndim=1)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape ({x.shape[-1]},) to match x's last "
                         f"dimension, got {tuple(weight.shape)}")
    tensors = {"x": x, "weight": weight}
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes, ndim=1)
        check_same(op, "shape", weight=weight, bias=bias)
        tensors["bias"] = bias
    if residual is not None:
        check_tensor(op, "residual", residual, dtypes)
        check_same(op, "shape", x=x, residual=residual)
        tensors["residual"] = residual
    check_same(op, "device", **tensors)
    if out_dtype is not None and out_dtype not in dtypes:
        raise ValueError(f"{op}: out_dtype must be one of ({dtype_names(dtypes)}), got {dtype_names([out_dtype])}")


def _normalized_input(x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x (+ residual) as torch's add gives it, and s in at least fp32 to compute with."""
    s = x if residual is None else x + residual
    return s, s.to(torch.promote_types(s.dtype, torch.float32))


def _result(y: torch.Tensor, s: torch.Tensor, residual, out_dtype):
    """What a norm returns: y in out_dtype (else s's dtype), and s too when given a residual."""
    y = y.to(out_dtype or s.dtype)
    return y if residual is None else (y, s)


@register("rms_norm", "torch")
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None):
    check_norm("rms_norm", x, weight, None, residual, out_dtype)
    s, sf = _normalized_input(x, residual)
    y = sf * torch.rsqrt(sf.square().mean(-1, keepdim=True) + eps) * weight.to(sf.dtype)
    return _result(y, s, residual, out_dtype)


@register("layer_norm", "torch")
def layer_norm_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                     residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None):
    check_norm("layer_norm", x, weight, bias, residual, out_dtype)
    s, sf = _normalized_input(x, residual)
    b = None if bias is None else bias.to(sf.dtype)
    y = F.layer_norm(sf, weight.shape, weight.to(sf.dtype), b, eps)
    return _result(y, s, residual, out_dtype)


@triton.jit
def _norm_fwd_kernel(
    X,  # input (M, N), last dim contiguous
    R,  # residual (M, N), last dim contiguous; unused unless HAS_RESIDUAL
    S,  # x + residual (M, N), contiguous, in the sum's dtype; unused unless HAS_RESIDUAL
    Y,  # output (M, N), contiguous, in out_dtype
    W,  # weight (N,)
    B,  # bias (N,); unused unless HAS_BIAS
    Mean,  # fp32 (M,): row means, written for LayerNorm only
    Rstd,  # fp32 (M,): 1 / sqrt(variance + eps) per row (mean square for RMSNorm)
    stride_x,  # elements between rows of X (any value: sliced or expanded rows need no copy)
    stride_r,  # elements between rows of R
    stride_s,  # elements between rows of S
    stride_y,  # elements between rows of Y
    M,  # rows
    N,  # elements per row
    eps,  # added to the variance
    IS_RMS: tl.constexpr,  # RMSNorm (no centering) or LayerNorm
    HAS_BIAS: tl.constexpr,  # add B
    HAS_RESIDUAL: tl.constexpr,  # normalize X + R, and write that sum to S
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
    if HAS_RESIDUAL:
        x += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = x.to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)  # the sum as stored: what backward reloads
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
    X,  # the forward's normalized input (M, N) (x, or x + residual), last dim contiguous
    DY,  # gradient of the output (M, N), last dim contiguous
    DS,  # gradient arriving at x + residual (M, N), last dim contiguous; unused unless HAS_DS
    DX,  # gradient of the normalized input (M, N), contiguous, in x's dtype
    DX2,  # the same gradient in the residual's dtype (M, N), contiguous; unused unless HAS_DX2
    W,  # weight (N,)
    Mean,  # fp32 (M,) from the forward; unused for RMSNorm
    Rstd,  # fp32 (M,) from the forward
    DW,  # fp32 (programs, N): this program's sum over its rows of dy * xhat
    DB,  # fp32 (programs, N): this program's sum of dy; unused unless HAS_BIAS
    stride_x,  # elements between rows of X
    stride_dy,  # elements between rows of DY
    stride_ds,  # elements between rows of DS
    stride_dx,  # elements between rows of DX and of DX2
    M,  # rows
    N,  # elements per row
    rows_per_program,  # rows each program owns, a multiple of ROWS
    IS_RMS: tl.constexpr,  # RMSNorm or LayerNorm
    HAS_BIAS: tl.constexpr,  # produce db
    HAS_DS: tl.constexpr,  # add DS to dx (the sum's own gradient, from its other uses)
    HAS_DX2: tl.constexpr,  # also store dx in DX2's dtype (x and the residual differ in dtype)
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
        if HAS_DS:
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        offsets = rows[:, None] * stride_dx + cols[None, :]
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DX2:
            tl.store(DX2 + offsets, dx.to(DX2.dtype.element_ty), mask=mask)
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
def _norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
              eps: float, rms: bool, out_dtype: torch.dtype | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, s, mean, rstd of x (M, N) (+ residual) with stride(1) == 1. s = x + residual in the
    dtype torch's add gives, empty without a residual; mean is empty for RMSNorm."""
    m, n = x.shape
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((m, n), dtype=out_dtype or s_dtype, device=x.device)
    s = torch.empty((0, n) if residual is None else (m, n), dtype=s_dtype, device=x.device)
    mean = torch.empty((0 if rms else m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return y, s, mean, rstd
    block_n, rows, num_warps = _tile(n)
    r = x if residual is None else residual
    with runtime.on_device(x):
        runtime.wrap_triton(_norm_fwd_kernel)[(triton.cdiv(m, rows),)](
            x, r, s, y, weight, weight if bias is None else bias,
            rstd if rms else mean, rstd, x.stride(0), r.stride(0), s.stride(0), y.stride(0), m, n, eps,
            IS_RMS=rms, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            ROWS=rows, BLOCK_N=block_n, num_warps=num_warps)
    return y, s, mean, rstd


@torch.library.triton_op("tritongpt::norm_bwd", mutates_args=())
def _norm_bwd(dy: torch.Tensor, ds: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
              mean: torch.Tensor, rstd: torch.Tensor, rms: bool, has_bias: bool,
              dx_dtype: torch.dtype, dx2_dtype: torch.dtype | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (in dx_dtype), dx again in dx2_dtype (empty when None), and fp32 dw and db (zeros
    unless has_bias), for x, dy, ds (M, N) with stride(1) == 1; ds is added to dx."""
    m, n = x.shape
    block_n, rows, num_warps = _tile(n)
    programs, rows_per_program = backward_programs(m, n, x.device)
    dx = torch.empty((m, n), dtype=dx_dtype, device=x.device)
    dx2 = torch.empty((0, n) if dx2_dtype is None else (m, n), dtype=dx2_dtype or dx_dtype, device=x.device)
    # Every program writes its whole row of partial sums: zero them only when none runs.
    partials = torch.empty if m > 0 else torch.zeros
    dw = partials((programs, n), dtype=torch.float32, device=x.device)
    db = partials((programs if has_bias else 0, n), dtype=torch.float32, device=x.device)
    if m > 0:
        with runtime.on_device(x):
            runtime.wrap_triton(_norm_bwd_kernel)[(programs,)](
                x, dy, dy if ds is None else ds, dx, dx2, weight,
                rstd if rms else mean, rstd, dw, db if has_bias else dw,
                x.stride(0), dy.stride(0), 0 if ds is None else ds.stride(0), dx.stride(0),
                m, n, rows_per_program, IS_RMS=rms, HAS_BIAS=has_bias, HAS_DS=ds is not None,
                HAS_DX2=dx2_dtype is not None, ROWS=rows, BLOCK_N=block_n, num_warps=num_warps)
    return dx, dx2, dw.sum(0), db.sum(0)


def _setup_context(ctx, inputs, output) -> None:
    x, residual, weight, bias, _eps, rms, _out_dtype = inputs
    y, s, mean, rstd = output
    ctx.save_for_backward(x if residual is None else s, weight, mean, rstd)
    ctx.rms = rms
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.y_dtype = y.dtype
    # x's gradient in x's dtype; the residual's, if its dtype differs, in the same pass.
    ctx.dx_dtypes = (x.dtype, residual.dtype if ctx.has_residual and residual.dtype != x.dtype else None)
    ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
    # An unused s (the last norm's, a post-norm block's) then comes as None, not a tensor of zeros.
    ctx.set_materialize_grads(False)


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else runtime.as_rows(t)


def _backward(ctx, dy, ds, _dmean, _drstd):
    saved, weight, mean, rstd = ctx.saved_tensors
    if dy is None:  # only s was used
        dy = saved.new_zeros(saved.shape, dtype=ctx.y_dtype)
    dx, dx2, dw, db = _norm_bwd(_rows(dy), _rows(ds), saved, weight, mean, rstd, ctx.rms, ctx.has_bias,
                                *ctx.dx_dtypes)
    d_residual = (dx2 if ctx.dx_dtypes[1] is not None else dx) if ctx.has_residual else None
    w_dtype, b_dtype = ctx.param_dtypes
    return dx, d_residual, dw.to(w_dtype), (db.to(b_dtype) if ctx.has_bias else None), None, None, None


_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _norm_triton(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                 rms: bool, residual: torch.Tensor | None, out_dtype: torch.dtype | None):
    check_norm(op, x, weight, bias, residual, out_dtype, dtypes=TRITON_DTYPES)
    if x.shape[-1] > MAX_N:
        raise ValueError(f"{op}: the triton backend holds a row in one block, at most {MAX_N} "
                         f"elements; got {x.shape[-1]}")
    runtime.check_device(op, x)
    bias = None if bias is None else bias.contiguous()
    y, s, _mean, _rstd = _norm_fwd(runtime.as_rows(x), _rows(residual), weight.contiguous(), bias,
                                   float(eps), rms, out_dtype)
    return y.view(x.shape) if residual is None else (y.view(x.shape), s.view(x.shape))


@register("rms_norm", "triton")
def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                    out_dtype: torch.dtype | None = None):
    return _norm_triton("rms_norm", x, weight, None, eps, True, residual, out_dtype)


@register("layer_norm", "triton")
def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                      residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None):
    return _norm_triton("layer_norm", x, weight, bias, eps, False, residual, out_dtype)
