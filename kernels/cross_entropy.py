"""Cross-entropy of a GPT's logits against its targets (its loss): torch reference and
Triton kernels.

cross_entropy(logits, targets, ignore_index=-1) is the mean over the rows whose target is not
ignore_index of logsumexp(row) - row[target], in fp32 whatever the logits' dtype: what the model
computed as F.cross_entropy(logits.float(), targets, ignore_index=-1) (nanoGPT's loss). Below it,
linear_cross_entropy(x, weight, targets): the lm head's matmul and this loss as one op, whose
triton backend keeps no logits (training's loss).

That torch form makes an fp32 copy of bf16 logits and an fp32 log-softmax of it (16k tokens x
50304 classes: 3.3 GB each), and backward writes, reads and casts fp32 gradients of the same
size: memory traffic of about eighteen times the bf16 logits, the largest non-matmul cost of a
GPT-2 step, and 10 bytes a class of each token alive at once. The Triton backend moves the least
it can without overwriting the logits:

* forward: each program streams a band of rows once, keeping a running max per row and running
  sums of exp(x - max) per lane in fp32 (one exp2 per element), and writes three fp32 numbers a
  row: its loss, and for backward its max and log(sum(exp(x - max))). torch sums the row losses
  (deterministically).
* backward: one elementwise pass over (rows, classes) tiles: the softmax recomputed from the two
  saved numbers, minus one at the target, times d_loss / (rows counted), written in the logits'
  dtype. Ignored rows get zero gradient.

So a training step reads the logits twice and writes their gradient once (three times their
size), and nothing the size of the logits is saved but the logits themselves.

Rows are walked from the 16-byte boundary at or before their start (_row_starts), so every step but
a row's first and last is whole and aligned and moves 16-byte vectors, also where the row stride
leaves rows unaligned (GPT-2's unpadded 50257, when fine-tuning OpenAI's weights). Compiled for
sm80, sm90, sm100 and sm120 (tests/sm_compile.py, triton 3.6 and 3.8): no spills; at 50257 the
forward's whole steps load 16-byte vectors where they loaded one element at a time before. Launch
sizes are first guesses, unmeasured.

A target outside [0, classes) that is not ignore_index makes the loss and that row's logits'
gradient NaN (so linear_cross_entropy's d_x row, and its whole d_weight, which sums every row's):
checking the range on the host would cost a GPU sync every step, and torch answers the same
mistake with a device-side assert that ends the process.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import runtime
from .runtime import LN2, LOG2E, tile, wrap_triton  # bare names: see wrap_triton's docstring
from .checks import TRITON_DTYPES, check_number, check_same, check_tensor, dtype_names
from .registry import register

IGNORE_INDEX = -1  # nanoGPT's: its data never holds -1, and padding a target with it drops the row


def check_cross_entropy(logits, targets, ignore_index) -> None:
    check_tensor("cross_entropy", "logits", logits)
    check_tensor("cross_entropy", "targets", targets, dtypes=(torch.int64,))
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"cross_entropy: logits must have a non-empty last dimension (the classes), "
                         f"got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets must have shape {tuple(logits.shape[:-1])} (logits' "
                         f"without the classes), got {tuple(targets.shape)}")
    check_same("cross_entropy", "device", logits=logits, targets=targets)
    check_number("cross_entropy", "ignore_index", ignore_index, integer=True)


@register("cross_entropy", "torch")
def cross_entropy_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
                        ) -> torch.Tensor:
    check_cross_entropy(logits, targets, ignore_index)
    return _torch_loss("cross_entropy", logits, targets, ignore_index)


def _torch_loss(op: str, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The torch backends' mean loss over the counted rows, in fp32 at least."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    try:
        return F.cross_entropy(x.reshape(-1, x.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)
    except IndexError as e:  # a target out of range, found on the CPU (the triton backend's loss is NaN)
        raise ValueError(f"{op}: {e}") from None


@triton.jit
def _row_starts(rows, stride_row, ALIGN: tl.constexpr):
    """Per row, `lead`: how many elements its start lies past the 16-byte boundary at or before it
    (ALIGN elements per 16 bytes), and that boundary's offset, hinted a multiple of ALIGN. Steps
    taken from the boundary are whole aligned vectors, so they load and store as 16-byte vectors
    even where the row stride (GPT-2's 50257) leaves rows unaligned. ALIGN == 1: rows are taken
    from their starts (the stride is a multiple of 16, which Triton sees, or it does not matter)."""
    if ALIGN > 1:
        lead = (rows * stride_row) % ALIGN
    else:
        lead = tl.zeros_like(rows)
    return lead, tl.multiple_of(rows * stride_row - lead, ALIGN)


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,  # (n_rows, n_cols) unit column stride
    targets_ptr,  # (n_rows,) int64: each row's class, or ignore_index
    loss_ptr,  # (n_rows,) fp32 output: log-sum-exp - logit of the target; 0 for an ignored row
    stats_ptr,  # (2, n_rows) fp32 output, for backward: each row's max m, then log(sum(exp(row - m)))
    #            (kept apart from m: their sum, the log-sum-exp, rounded to fp32 would cost accuracy)
    stride_row,  # logits' row stride, in elements
    ignore_index,
    n_rows,
    n_cols,
    BLOCK_R: tl.constexpr,  # rows per program (several when rows are narrow)
    BLOCK_C: tl.constexpr,  # columns per step along the row (a power of two)
    ALIGN: tl.constexpr,  # elements per 16 bytes where rows start unaligned, else 1 (_row_starts)
):
    # int64 before the row stride multiplies it: row * stride passes 2^31 at 43k rows of GPT-2's vocabulary.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    every_row = (tl.program_id(0) + 1) * BLOCK_R <= n_rows
    cols = tl.arange(0, BLOCK_C)
    lead, starts = _row_starts(rows, stride_row, ALIGN)
    start_ptrs = logits_ptr + starts[:, None]
    # Steps from each row's boundary: the first and last may hold lanes outside the row (masked),
    # the ones between are whole in every row of the program and load without a mask.
    first_whole, last_lead = tl.max(lead, axis=0), tl.min(lead, axis=0)
    # Online log-sum-exp: the running max m is one per row, the sums s of exp(x - m) one per lane,
    # rescaled when the max grows; lanes are added up once, at the end. exp(a) is computed as
    # exp2(a * LOG2E) with a = x - m formed first, so the product's rounding is relative to |x - m|
    # (small where the terms that matter are), not to |x|.
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for start in range(0, n_cols + first_whole, BLOCK_C):
        # fp32 at once (and the interpreter has no bf16 arithmetic); padding is -inf: exp gives 0.
        if every_row & (start >= first_whole) & (start + BLOCK_C <= n_cols + last_lead):
            x = tl.load(start_ptrs + start + cols[None, :]).to(tl.float32)
        else:
            c = start - lead[:, None] + cols[None, :]  # each lane's class
            mask = row_ok[:, None] & (c >= 0) & (c < n_cols)
            x = tl.load(start_ptrs + start + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # While a row has seen only -inf, subtract 0 instead of -inf: -inf - -inf would be NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2((m - shift) * LOG2E)[:, None] + tl.exp2((x - shift[:, None]) * LOG2E)
        m = m_new
    log_sum = tl.log2(tl.where(row_ok, tl.sum(s, axis=1), 1.0)) * LN2  # rows past the end: log 1, not log 0

    target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    counted = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    x_target = tl.load(logits_ptr + rows * stride_row + target, mask=row_ok & counted & in_range,
                       other=0.0).to(tl.float32)
    # m - x_target first: the two large terms cancel exactly when the target holds the maximum.
    loss = tl.where(counted, (m - x_target) + log_sum, 0.0)
    loss = tl.where(counted & ~in_range, float("nan"), loss)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(stats_ptr + rows, m, mask=row_ok)
    tl.store(stats_ptr + n_rows + rows, log_sum, mask=row_ok)


@triton.jit
def _cross_entropy_bwd_kernel(
    logits_ptr,  # (n_rows, n_cols) unit column stride: the forward's input
    targets_ptr,  # (n_rows,) int64
    stats_ptr,  # (2, n_rows) fp32: the forward's row max m, then log(sum(exp(row - m)))
    scale_ptr,  # () fp32: d_loss / rows counted (a tensor: no host sync, nothing recompiles)
    dlogits_ptr,  # (n_rows, n_cols) output, unit column stride, the logits' dtype
    stride_logits,  # row strides, in elements (the same two when ALIGN > 1)
    stride_dlogits,
    ignore_index,
    n_cols,  # classes
    n_rows,
    span,  # columns the tiles cover: n_cols + ALIGN - 1, room for each row's lead
    BLOCK_R: tl.constexpr,  # tile rows
    BLOCK_C: tl.constexpr,  # tile columns (a power of two)
    ALIGN: tl.constexpr,  # elements per 16 bytes where rows start unaligned, else 1 (_row_starts)
):
    rows, cols, _ = tile(n_rows, span, BLOCK_R, BLOCK_C)
    row_ok = rows < n_rows
    start = tl.min(cols, axis=0)  # the tile's first column, from each row's boundary
    lead, starts = _row_starts(rows, stride_logits, ALIGN)
    d_starts = tl.multiple_of(rows * stride_dlogits - lead, ALIGN)  # ALIGN > 1: the same stride
    m = tl.load(stats_ptr + rows, mask=row_ok)
    log_sum = tl.load(stats_ptr + n_rows + rows, mask=row_ok)
    target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    counted = target != ignore_index
    scale = tl.where(counted, tl.load(scale_ptr), 0.0)
    scale = tl.where(counted & ((target < 0) | (target >= n_cols)), float("nan"), scale)
    c = cols[None, :] - lead[:, None]  # each lane's class
    x_ptrs = logits_ptr + starts[:, None] + cols[None, :]
    d_ptrs = dlogits_ptr + d_starts[:, None] + cols[None, :]
    whole = (tl.max(rows, axis=0) < n_rows) & (start >= tl.max(lead, axis=0)) & (
        start + BLOCK_C <= n_cols + tl.min(lead, axis=0))
    mask = row_ok[:, None] & (c >= 0) & (c < n_cols)
    if whole:  # every lane inside its row: unmasked, so aligned rows move 16-byte vectors
        x = tl.load(x_ptrs).to(tl.float32)
    else:
        x = tl.load(x_ptrs, mask=mask).to(tl.float32)
    # softmax, recomputed: saving it would cost a logits-sized buffer. In the forward's order, so
    # that roundings stay relative to the small x - m - log_sum, not to |x|.
    p = tl.exp2(((x - m[:, None]) - log_sum[:, None]) * LOG2E)
    d = ((p - tl.where(c == target[:, None], 1.0, 0.0)) * scale[:, None]).to(dlogits_ptr.dtype.element_ty)
    if whole:
        tl.store(d_ptrs, d)
    else:
        tl.store(d_ptrs, d, mask=mask)


def _align(*tensors: torch.Tensor) -> int:
    """The kernels' ALIGN for row-strided (rows, classes) tensors: elements per 16 bytes when their
    rows start unaligned at one shared stride, else 1 (_row_starts)."""
    stride = tensors[0].stride(0)
    if stride % 16 == 0 or any(t.stride(0) != stride for t in tensors):
        return 1
    return 16 // tensors[0].element_size()


# Forward launch heuristics: a program holds TILE elements (8 KB of bf16) per step, as the
# elementwise kernels do; rows narrower than that are stacked TILE // BLOCK_C deep, wider rows
# are walked in BLOCK_C steps. 8 warps: 16 elements of the tile per thread.
_TILE = 4096
_NUM_WARPS = 8


def _forward_rows(x: torch.Tensor, t: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel on (rows, classes) logits `x`: each row's fp32 loss, and its max and
    log(sum(exp(row - max))) as (2, rows) for the backward."""
    n_rows, n_cols = x.shape
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    stats = torch.empty((2, n_rows), dtype=torch.float32, device=x.device)
    if n_rows:
        block_c = min(runtime.next_power_of_2(n_cols), _TILE)
        block_r = _TILE // block_c
        with runtime.on_device(x):
            wrap_triton(_cross_entropy_fwd_kernel)[(runtime.cdiv(n_rows, block_r),)](
                x, t, row_loss, stats, x.stride(0), ignore_index, n_rows, n_cols,
                BLOCK_R=block_r, BLOCK_C=block_c, ALIGN=_align(x), num_warps=_NUM_WARPS)
    return row_loss, stats


def _backward_rows(x: torch.Tensor, t: torch.Tensor, stats: torch.Tensor, scale: torch.Tensor, dx: torch.Tensor,
                   ignore_index: int) -> None:
    """The backward kernel: the gradient of (rows, classes) logits `x` into `dx` (which may be
    `x` itself: each element is read before it is written, by the same program)."""
    n_rows, n_cols = x.shape
    if dx.numel():
        with runtime.on_device(dx):
            align = _align(x, dx)
            runtime.launch_tiles(wrap_triton(_cross_entropy_bwd_kernel), n_rows, n_cols + align - 1, x, t, stats,
                                 scale, dx, x.stride(0), dx.stride(0), ignore_index, n_cols, ALIGN=align)


@runtime.triton_op("tritongpt::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats, counted): the mean loss, each row's fp32 max and log(sum(exp(row - max)))
    as (2, rows), and how many rows the mean is over (for backward's scale)."""
    t = targets.reshape(-1).contiguous()
    row_loss, stats = _forward_rows(runtime.as_rows(logits), t, ignore_index)
    counted = (t != ignore_index).sum()
    # No rows counted: 0 / 0 = NaN, as torch.
    return row_loss.sum() / counted, stats, counted


@runtime.triton_op("tritongpt::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd(dloss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
                       counted: torch.Tensor, ignore_index: int) -> torch.Tensor:
    x = runtime.as_rows(logits)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _backward_rows(x, targets.reshape(-1).contiguous(), stats, dloss.float() / counted, dx, ignore_index)
    return dx.view(logits.shape)


def _setup_context(ctx, inputs, output) -> None:
    logits, targets, ctx.ignore_index = inputs
    _loss, stats, counted = output
    ctx.save_for_backward(logits, targets, stats, counted)
    runtime.only_first_output_differentiable(ctx, stats, counted)


def _backward(ctx, dloss, _dstats, _dcounted):
    logits, targets, stats, counted = ctx.saved_tensors
    return _cross_entropy_bwd(dloss, logits, targets, stats, counted, ctx.ignore_index), None, None


_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


@register("cross_entropy", "triton")
def cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
                         ) -> torch.Tensor:
    check_cross_entropy(logits, targets, ignore_index)
    check_tensor("cross_entropy", "logits", logits, dtypes=TRITON_DTYPES)
    runtime.check_device("cross_entropy", logits)
    return _cross_entropy_fwd(logits, targets, int(ignore_index))[0]


# linear_cross_entropy(x, weight, targets): the lm head's matmul and the loss as one op, so that
# the logits are never kept. Unfused, the (tokens, classes) logits live from the head's forward to
# its backward, when their gradient joins them: at 16k tokens of GPT-2's 50304 classes, 1.65 GB of
# bf16 each (4.2 GB each at a 128k vocabulary), on top of every layer's activations at the peak.
# The triton backend takes the rows in chunks of at most CHUNK_BYTES of logits and, as the loss
# is a scalar, computes the gradients while the chunk is at hand: the logits by the matmul
# (cuBLAS), the loss and row statistics by the forward kernel, the logits' gradient written over
# them by the backward kernel, then d_x of the chunk and its share of d_weight by two matmuls.
# Backward only scales those by d_loss. Nothing logits-sized outlives a chunk; kept for backward
# are d_x and d_weight in fp32 (x's size, 50 MB at GPT-2's 16k tokens; classes x width: 155 MB),
# so that each gradient is rounded to its dtype once, scaled (a d_x kept in bf16 and scaled in
# backward was rounded twice: up to 7x torch's error on one row's d_x, where torch's was 0.05%).
# The FLOPs are the unfused ones (no recompute). The price is d_weight's accumulation: each chunk's
# share is a (classes, width) fp32 matmul output added to the sum: 16 bytes an element moved a
# chunk past the first (0.6 GB for GPT-2's head); with 1 GiB chunks GPT-2 takes two at 16k tokens.
# Speed on a GPU unmeasured.
CHUNK_BYTES = 2**30


def check_linear_cross_entropy(x, weight, targets, ignore_index) -> None:
    op = "linear_cross_entropy"
    check_tensor(op, "x", x)
    check_tensor(op, "weight", weight, ndim=2)
    check_tensor(op, "targets", targets, dtypes=(torch.int64,))
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension (the width), got shape {tuple(x.shape)}")
    if weight.shape[1] != x.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{op}: weight must have shape (classes >= 1, {x.shape[-1]}) to multiply x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"{op}: targets must have shape {tuple(x.shape[:-1])} (x's without the width), "
                         f"got {tuple(targets.shape)}")
    check_same(op, "device", x=x, weight=weight, targets=targets)
    if runtime.matmul_dtype(x, weight) is None:  # under autocast both are cast to its dtype
        check_same(op, "dtype", x=x, weight=weight)
    check_number(op, "ignore_index", ignore_index, integer=True)


@register("linear_cross_entropy", "torch")
def linear_cross_entropy_torch(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    check_linear_cross_entropy(x, weight, targets, ignore_index)
    return _torch_loss("linear_cross_entropy", F.linear(x, weight), targets, ignore_index)


def _chunk_rows(rows: int, classes: int, itemsize: int) -> int:
    """Rows a chunk takes: the fewest equal chunks whose logits fit in CHUNK_BYTES."""
    chunks = max(1, runtime.cdiv(rows * classes * itemsize, CHUNK_BYTES))
    return max(1, runtime.cdiv(rows, chunks))


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 (cuBLAS writes fp32 from 16-bit operands at once),
    into `out` when given (d_x's rows: no chunk-sized result copied there). On CPU through fp32
    copies: torch's CPU bf16 matmul takes seconds for d_x at 50k classes (b row-major, its long
    dimension first), fp32 a tenth of one."""
    if not a.is_cuda:
        return torch.mm(a.float(), b.float(), out=out)
    return torch.mm(a, b, out_dtype=torch.float32, out=out) if a.dtype != torch.float32 else torch.mm(a, b, out=out)


@torch.library.custom_op("tritongpt::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                          dtype: torch.dtype, x_grad: bool, weight_grad: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d_x, d_weight, pending) of x (rows, width) and weight (classes, width), both
    multiplied in `dtype`: d_x and d_weight in fp32, each empty unless asked for, to be
    multiplied by d_loss and by `pending` (fp32) in backward. In fp16 the mean's gradients, a
    softmax over the number of rows counted (1e-9 and less at GPT-2's 12k tokens and 50k classes),
    fall below its range before GradScaler's factor (d_loss) could lift them: they are computed
    for the sum of the losses, and divided by the count there (`pending`); in bf16 and fp32 they
    are the mean's (`pending` 1), rounded once. An opaque op to torch.compile: Inductor calls it
    as it is, chunks and all."""
    rows, classes = x.shape[0], weight.shape[0]
    w = weight.to(dtype)
    counted = (targets != ignore_index).sum().to(torch.float32)  # as the fake's, whatever the default dtype
    scale = 1.0 / counted  # inf when no row counts: then every row's gradient is 0 all the same
    pending = 1.0 / counted.clamp(min=1) if dtype == torch.float16 else torch.ones_like(scale)
    scale = scale / pending  # d_logits' share
    dx = torch.empty(x.shape if x_grad else 0, dtype=torch.float32, device=x.device)
    dw = None
    row_losses = []
    step = _chunk_rows(rows, classes, w.element_size())
    # Autocast would run the matmuls below in its dtype, d_weight's fp32 one included.
    with torch.autocast(x.device.type, enabled=False), runtime.direct_launches():
        for start in range(0, rows, step):
            xc, tc = x[start:start + step].to(dtype), targets[start:start + step]
            logits = xc @ w.t()  # (chunk, classes)
            row_loss, stats = _forward_rows(logits, tc, ignore_index)
            row_losses.append(row_loss)
            if x_grad or weight_grad:
                _backward_rows(logits, tc, stats, scale, logits, ignore_index)  # logits <- d_logits
                if x_grad:
                    _mm(logits, w, out=dx[start:start + step])
                if weight_grad:
                    share = _mm(logits.t(), xc)  # fp32
                    dw = share if dw is None else dw.add_(share)
                    del share
            # Freed before the next chunk's are made: held by the name until then, two chunks (all the
            # logits, when there are two) would be alive at once, at the step's peak.
            del logits
    if weight_grad and dw is None:  # no rows
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    elif not weight_grad:
        dw = torch.empty(0, dtype=torch.float32, device=x.device)
    loss = torch.cat(row_losses).sum() / counted if row_losses else counted / counted  # no rows: NaN, as torch
    return loss, dx, dw, pending


@_linear_cross_entropy.register_fake
def _linear_cross_entropy_fake(x, weight, targets, ignore_index, dtype, x_grad, weight_grad):
    return (x.new_empty((), dtype=torch.float32), x.new_empty(x.shape if x_grad else 0, dtype=torch.float32),
            x.new_empty(weight.shape if weight_grad else 0, dtype=torch.float32),
            x.new_empty((), dtype=torch.float32))


def _lce_setup_context(ctx, inputs, output) -> None:
    x, weight = inputs[:2]
    _loss, dx, dw, pending = output
    ctx.dtypes = x.dtype, weight.dtype
    ctx.save_for_backward(dx, dw, pending)
    runtime.only_first_output_differentiable(ctx, dx, dw, pending)


def _lce_backward(ctx, dloss, _ddx, _ddw, _dpending):
    # A custom op of its own (not a runtime.Op, whose formula is guarded so): dx and dw are constants here.
    runtime.first_order_only("tritongpt::linear_cross_entropy")
    dx, dw, pending = ctx.saved_tensors
    factor = dloss * pending  # fp32, and the products in fp32: each gradient rounded once
    # Stored in the input's dtype as computed: no fp32 product beside it at the step's peak (the
    # first backward node runs with every activation still saved).
    grads = [torch.mul(d, factor, out=torch.empty(d.shape, dtype=dtype, device=d.device)) if need else None
             for d, dtype, need in zip((dx, dw), ctx.dtypes, ctx.needs_input_grad)]
    return (*grads, None, None, None, None, None)


_linear_cross_entropy.register_autograd(_lce_backward, setup_context=_lce_setup_context)


@register("linear_cross_entropy", "triton")
def linear_cross_entropy_triton(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """As the torch backend (autocast's matmul dtype, else x's, which weight's must then match),
    in chunks of rows, with no logits kept for backward."""
    check_linear_cross_entropy(x, weight, targets, ignore_index)
    dtype = runtime.matmul_dtype(x, weight) or x.dtype
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"linear_cross_entropy: the matmul dtype must be one of ({dtype_names(TRITON_DTYPES)}), "
                         f"got {dtype_names([dtype])}")
    runtime.check_device("linear_cross_entropy", x)
    grad = torch.is_grad_enabled()
    rows = x.reshape(-1, x.shape[-1])
    return runtime.call_op(_linear_cross_entropy, rows, weight, targets.reshape(-1).contiguous(), int(ignore_index),
                           dtype, grad and x.requires_grad, grad and weight.requires_grad)[0]
