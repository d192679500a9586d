"""Causal (or full) multi-head attention with grouped-query heads: torch reference and a Triton
flash-attention backend (forward and backward).

q (B, H, T, D); k, v (B, Hkv, T, D) with H % Hkv == 0; scale 1/sqrt(D).

The Triton backend follows FlashAttention-2. The forward streams key/value tiles past a tile of
queries with an online softmax in base 2 (the scale 1/sqrt(D) and log2(e) are folded into one
multiplier, applied inside the exponent's fused multiply-add, so exp2 replaces exp and no score is
multiplied on its own), accumulates in fp32 and saves the fp32 *base-2* log-sum-exp of
each row, lse2 = log2(sum_j 2^(s_j * log2(e))) for the scaled scores s = q.k / sqrt(D), i.e. the
natural log-sum-exp times log2(e). The backward recomputes the probabilities from lse2: a
preprocess computes delta = rowsum(dO * O), then one kernel owns a key tile and sums dK and dV over
all query tiles (and, with grouped-query attention, over all query heads of the group) in
registers, and a second owns a query tile and sums dQ over the key tiles. No atomics, so every
gradient is bit-for-bit reproducible.

Causal attention skips the key tiles above the diagonal (the loop bound stops there) and masks
only the tiles on it; any T >= 1 works, the keys past T are masked in the last tile. Head dims
32, 64, 96 and 128 (96 runs as 128 with the extra columns masked). Attention dropout draws its
mask from a hash of the seed, the batch and head, and the score's (row, col)
(runtime.dropout_scale), so the backward regenerates the forward's mask instead of storing it.
Compiled for sm90 (triton 3.8, GPT-2's D = 64), the forward's loop over key tiles is 277
instructions a thread an iteration without dropout, 1926 when each score took a Philox call, and
853 with the hash; dkdv 286, 1066 and 549 (D = 128: forward 388, 2014, 941). Spreading each
Philox call's four draws over four neighbouring keys, the other way to cut its cost, sent the
mask through shared memory to reach the MMA accumulator's layout (32 KB more a block in every
pass).

With RoPE (`rope=(cos, sin)`, the model's LLaMA attention) the forward first turns q and k with
the rope kernel (kernels/rope.py) into one (B, T, H + 2*Hkv, D) buffer, v copied beside them by
the same launch, which it attends over and keeps for the backward (not q, k and v: views of the
model's projection output, they would keep all of it); the backward turns dq and dk back in
place, adjacent heads of its gradient buffer, in one pass. So dq, dk and dv stay one buffer that
the model's split of its qkv projection hands on, where a rope op of its own would give fresh dq
and dk to concatenate.

On Hopper and later the tiles of q, k, v and dO can load through TMA tensor descriptors (the
copy engine, asynchronous, no address arithmetic in the threads) instead of pointers: a field of
each pass's launch configuration, used where the layout allows it (_use_tma) and chosen per GPU
by measurement like the tile sizes. Same arithmetic either way. Warp specialisation
(`tl.range(..., warp_specialize=True)` on the key loop) is not used: compiled for sm90 (triton 3.6
and 3.8, no GPU), Hopper's pass aborts on this loop at 4 warps (an MLIR dominance assertion) and
leaves the kernel as it was at 8; Triton documents it for Blackwell only.

dtypes: bf16 and fp16 run on the tensor cores with fp32 accumulation. fp32 inputs are computed
through fp32 (`tl.dot` with input_precision="ieee", not tf32) so they match an fp32 reference;
that path is for checking, not speed. float64 is refused.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import runtime
from .runtime import dropout_key, dropout_scale, fp32, wrap_triton  # bare names: see wrap_triton's docstring
from .checks import TRITON_DTYPES, check_dropout, check_same, check_tensor, dtype_names
from .registry import register
from .rope import check_tables, rotate, rotate_beside, triton_tables, turned

HEAD_DIMS = (32, 64, 96, 128)


def check_attention(q, k, v, causal, dropout_p, rope) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor("attention", name, t, ndim=4)
    check_same("attention", "dtype", q=q, k=k, v=v)
    check_same("attention", "device", q=q, k=k, v=v)
    check_same("attention", "shape", k=k, v=v)
    (B, H, T, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if (B, T, D) != (Bk, Tk, Dk):
        raise ValueError(f"attention: q (B, H, T, D) = {tuple(q.shape)} and k, v (B, Hkv, T, D) = "
                         f"{tuple(k.shape)} must agree on B, T and D")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"attention: q's {H} heads must be a multiple of k/v's {Hkv} heads")
    if not isinstance(causal, bool):
        raise ValueError(f"attention: causal must be a bool, got {causal!r}")
    check_dropout("attention", dropout_p)
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise ValueError(f"attention: rope must be a (cos, sin) pair of tables, got {type(rope).__name__}")
        check_tables("attention", q, *rope)


@register("attention", "torch")
def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    dropout_p: float = 0.0, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    check_attention(q, k, v, causal, dropout_p, rope)
    if rope is not None:
        q, k = turned(q, *rope), turned(k, *rope)  # tables checked above
    return F.scaled_dot_product_attention(q, k, v, dropout_p=float(dropout_p), is_causal=causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _key_ranges(start_m, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Where the key tiles of query rows [start_m, start_m + BLOCK_M) split: [0, full_hi) need no
    mask, [full_hi, masked_hi) do (the causal diagonal, or the last, partial tile). Causal key
    tiles past the diagonal lie beyond masked_hi and are never visited."""
    if CAUSAL:
        full_hi = start_m
        masked_hi = tl.minimum(start_m + BLOCK_M, T)
    else:
        full_hi = T // BLOCK_N * BLOCK_N
        masked_hi = T
    return full_hi, masked_hi


@triton.jit
def _source(ptr, heads, T, stride_b, stride_h, stride_t,
            BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """What the tile loads of a (B, heads, T, D) tensor read: its pointer, or with TMA a tensor
    descriptor of it in (1, 1, BLOCK, BLOCK_D) blocks, made on the device (its 128 bytes live in
    the launch's global scratch). With TMA, D = BLOCK_D and D has unit stride (the launcher's
    _use_tma); B is the grid's third axis in every kernel."""
    if TMA:
        src = tl.make_tensor_descriptor(ptr, [tl.num_programs(2), heads, T, BLOCK_D],
                                        [stride_b, stride_h, stride_t, 1], [1, 1, BLOCK, BLOCK_D])
    else:
        src = ptr
    return src


@triton.jit
def _head(src, b, h, stride_b, stride_h, TMA: tl.constexpr):
    """Head (b, h) of a _source: the pointer to its (T, D) matrix, or the descriptor itself, which
    the loads index by (b, h)."""
    if TMA:
        base = src
    else:
        base = src + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    return base


@triton.jit
def _load_tile(base, b, h, start, T, stride_t, stride_d,
               BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
               TMA: tl.constexpr):
    """Rows [start, start + BLOCK) of head (b, h)'s (T, HEAD_DIM) matrix (`base` from _head),
    zero-padded to (BLOCK, BLOCK_D). Rows past T load as zeros: the kernels rely on that (see
    _attn_bwd_dkdv).

    TMA: the copy engine moves the tile into shared memory, asynchronously and without address
    arithmetic in the threads, and the descriptor's bounds supply the zeros."""
    if TMA:
        tile = base.load([b, h, start, 0]).reshape(BLOCK, BLOCK_D)
    else:
        rows = start + tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK_D)
        # int64 row offsets: one head of a strided (B, T, 3*H*D) qkv can span more than 2^31 elements.
        ptrs = base + rows[:, None].to(tl.int64) * stride_t + cols[None, :] * stride_d
        tile = tl.load(ptrs, mask=(rows[:, None] < T) & (cols[None, :] < HEAD_DIM), other=0.0)
    return tile


@triton.jit
def _store_tile(base, start, T, stride_t, stride_d, value,
                BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store `value` (BLOCK, BLOCK_D) into rows [start, start + BLOCK) of a (T, HEAD_DIM) matrix."""
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None].to(tl.int64) * stride_t + cols[None, :] * stride_d
    tl.store(ptrs, value.to(base.dtype.element_ty),
             mask=(rows[:, None] < T) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a @ b, accumulated in fp32 (acc None: a fresh product).

    FP32_DOT: multiply in fp32 with exact ("ieee") products: for fp32 inputs, where tf32 would
    miss the fp32 reference, and in the interpreter, whose bf16 dot multiplies bit patterns. The
    operands were rounded to the input dtype first, so the interpreter sees the GPU's numerics."""
    if FP32_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _mask_scores(s, rows, cols, T, CAUSAL: tl.constexpr):
    """Scores s (broadcast of rows x cols) with keys past T, and when causal the future keys, set
    to -inf. Query rows past T are left alone: they are never stored, and keep finite maxima."""
    visible = cols < T
    if CAUSAL:
        visible = visible & (cols <= rows)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _exp2_scaled(s, qk_scale, m):
    """2^(s * qk_scale - m) for raw scores s (masked ones -inf) and a base-2 row offset m.

    The scale goes into the exponent's fused multiply-add instead of a multiply of every score
    of its own: the row maximum is taken of the raw scores and scaled once per row (a positive
    scale keeps the order, and rounding is monotonic, so max(s) * scale == max(s * scale))."""
    return tl.math.exp2(tl.fma(s, qk_scale, -m))


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, b, hk, offs_m, lo, hi, T, qk_scale,
                    key, keep_p, stride_kt, stride_kd, stride_vt, stride_vd,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                    FP32_DOT: tl.constexpr, TMA: tl.constexpr):
    """Fold key/value tiles [lo, hi) into the running (acc, l_i, m_i) of a query tile."""
    for start_n in range(lo, hi, BLOCK_N):
        k = _load_tile(k_base, b, hk, start_n, T, stride_kt, stride_kd, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
        v = _load_tile(v_base, b, hk, start_n, T, stride_vt, stride_vd, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
        s = _dot(q, tl.trans(k), None, FP32_DOT)  # unscaled: see _exp2_scaled
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            s = _mask_scores(s, offs_m[:, None], offs_n[None, :], T, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = _exp2_scaled(s, qk_scale, m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normaliser sums the undropped p
        if DROPOUT:
            p = p * dropout_scale(key, offs_m[:, None], offs_n[None, :], keep_p)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], FP32_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    q_ptr, k_ptr, v_ptr,  # inputs: q (B, H, T, D), k and v (B, H // GROUP, T, D)
    o_ptr,  # output (B, H, T, D), the inputs' dtype
    lse_ptr,  # output: base-2 log-sum-exp (B, H, T) contiguous, fp32
    seed_ptr,  # int64 dropout seed (one element); unused without DROPOUT
    T, H, GROUP,  # sequence length, query heads, query heads per kv head
    qk_scale,  # log2(e) / sqrt(D): scores in base 2
    keep_p,  # 1 - dropout_p, the probability of keeping an attention weight (see dropout_scale)
    stride_qb, stride_qh, stride_qt, stride_qd,  # strides of q, k, v and o, in elements
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per step; divides BLOCK_M so the diagonal starts a step
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    HEAD_DIM: tl.constexpr,  # D
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr,  # see _dot
    TMA: tl.constexpr,  # load q, k, v through tensor descriptors (see _source)
):
    qk_scale, keep_p = fp32(qk_scale), fp32(keep_p)
    # Causal query tiles near the end of the sequence do the most work: start them first so the
    # short ones fill the tail of the launch.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    hk = h // GROUP  # grouped-query attention: the kv head this query head reads
    q_src = _source(q_ptr, H, T, stride_qb, stride_qh, stride_qt, BLOCK_M, BLOCK_D, TMA)
    k_src = _source(k_ptr, H // GROUP, T, stride_kb, stride_kh, stride_kt, BLOCK_N, BLOCK_D, TMA)
    v_src = _source(v_ptr, H // GROUP, T, stride_vb, stride_vh, stride_vt, BLOCK_N, BLOCK_D, TMA)
    k_base = _head(k_src, b, hk, stride_kb, stride_kh, TMA)
    v_base = _head(v_src, b, hk, stride_vb, stride_vh, TMA)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(_head(q_src, b, h, stride_qb, stride_qh, TMA), b, h, start_m, T,
                   stride_qt, stride_qd, BLOCK_M, BLOCK_D, HEAD_DIM, TMA)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    key = dropout_key(seed_ptr, bh, DROPOUT)  # each batch and head its own mask

    # Unmasked key tiles first, then the tiles that need a mask.
    full_hi, masked_hi = _key_ranges(start_m, T, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, b, hk, offs_m, 0, full_hi, T,
                                    qk_scale, key, keep_p,
                                    stride_kt, stride_kd, stride_vt, stride_vd, BLOCK_N, BLOCK_D,
                                    HEAD_DIM, False, CAUSAL, DROPOUT, FP32_DOT, TMA)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, b, hk, offs_m, full_hi,
                                    masked_hi, T, qk_scale, key, keep_p,
                                    stride_kt, stride_kd, stride_vt, stride_vd, BLOCK_N, BLOCK_D,
                                    HEAD_DIM, True, CAUSAL, DROPOUT, FP32_DOT, TMA)

    _store_tile(_head(o_ptr, b, h, stride_ob, stride_oh, False), start_m, T, stride_ot, stride_od,
                acc / l_i[:, None], BLOCK_M, BLOCK_D, HEAD_DIM)
    tl.store(lse_ptr + bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


@triton.jit
def _attn_bwd_delta(
    o_ptr, do_ptr,  # output and its gradient (B, H, T, D)
    delta_ptr,  # output: rowsum(dO * O) (B, H, T) contiguous, fp32
    T, H,  # sequence length, heads
    stride_ob, stride_oh, stride_ot, stride_od,  # strides of o and do, in elements
    stride_dob, stride_doh, stride_dot, stride_dod,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    HEAD_DIM: tl.constexpr,  # D
):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    o = _load_tile(_head(o_ptr, b, h, stride_ob, stride_oh, False), b, h, start_m, T,
                   stride_ot, stride_od, BLOCK_M, BLOCK_D, HEAD_DIM, False)
    do = _load_tile(_head(do_ptr, b, h, stride_dob, stride_doh, False), b, h, start_m, T,
                    stride_dot, stride_dod, BLOCK_M, BLOCK_D, HEAD_DIM, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    tl.store(delta_ptr + (b * H + h).to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, b, h, lse_base, delta_base, offs_n, lo, hi,
                         T, qk_scale, key, keep_p,
                         stride_qt, stride_qd, stride_dot, stride_dod,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                         MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                         FP32_DOT: tl.constexpr, TMA: tl.constexpr):
    """Add query tiles [lo, hi) of one query head to a key tile's (dk, dv), transposed: (keys, rows)."""
    for start_m in range(lo, hi, BLOCK_M):
        q = _load_tile(q_base, b, h, start_m, T, stride_qt, stride_qd, BLOCK_M, BLOCK_D, HEAD_DIM, TMA)
        do = _load_tile(do_base, b, h, start_m, T, stride_dot, stride_dod, BLOCK_M, BLOCK_D,
                        HEAD_DIM, TMA)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        lse = tl.load(lse_base + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
        s_t = _dot(k, tl.trans(q), None, FP32_DOT)
        if MASKED:
            s_t = _mask_scores(s_t, offs_m[None, :], offs_n[:, None], T, CAUSAL)
        p_t = _exp2_scaled(s_t, qk_scale, lse[None, :])
        dp_t = _dot(v, tl.trans(do), None, FP32_DOT)
        if DROPOUT:
            keep = dropout_scale(key, offs_m[None, :], offs_n[:, None], keep_p)  # transposed
            dv = _dot((p_t * keep).to(do.dtype), do, dv, FP32_DOT)
            dp_t = dp_t * keep
        else:
            dv = _dot(p_t.to(do.dtype), do, dv, FP32_DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q.dtype), q, dk, FP32_DOT)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    q_ptr, k_ptr, v_ptr, do_ptr,  # q, dO (B, H, T, D); k, v (B, H // GROUP, T, D)
    lse_ptr, delta_ptr,  # base-2 log-sum-exp and rowsum(dO * O), (B, H, T) contiguous fp32
    dqkv_ptr,  # output: the (B, H + 2 * H // GROUP, T, D) gradient buffer (_empty_grads), whose
    #           heads [H, H + H // GROUP) this kernel writes (dk), then as many more (dv)
    seed_ptr,  # int64 dropout seed (one element); unused without DROPOUT
    T, H, GROUP,  # sequence length, query heads, query heads per kv head
    qk_scale,  # log2(e) / sqrt(D)
    sm_scale,  # 1 / sqrt(D)
    keep_p,  # 1 - dropout_p, the probability of keeping an attention weight (see dropout_scale)
    stride_qb, stride_qh, stride_qt, stride_qd,  # strides of q, k, v, dO and dqkv, in elements
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_gb, stride_gh, stride_gt, stride_gd,
    BLOCK_M: tl.constexpr,  # query rows per step; divides BLOCK_N so the diagonal starts a step
    BLOCK_N: tl.constexpr,  # key rows per program
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    HEAD_DIM: tl.constexpr,  # D
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr,  # see _dot
    TMA: tl.constexpr,  # load q, k, v, dO through tensor descriptors (see _source)
):
    qk_scale, sm_scale, keep_p = fp32(qk_scale), fp32(sm_scale), fp32(keep_p)
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1)
    b = tl.program_id(2)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_src = _source(k_ptr, H // GROUP, T, stride_kb, stride_kh, stride_kt, BLOCK_N, BLOCK_D, TMA)
    v_src = _source(v_ptr, H // GROUP, T, stride_vb, stride_vh, stride_vt, BLOCK_N, BLOCK_D, TMA)
    q_src = _source(q_ptr, H, T, stride_qb, stride_qh, stride_qt, BLOCK_M, BLOCK_D, TMA)
    do_src = _source(do_ptr, H, T, stride_dob, stride_doh, stride_dot, BLOCK_M, BLOCK_D, TMA)
    k = _load_tile(_head(k_src, b, hk, stride_kb, stride_kh, TMA), b, hk, start_n, T,
                   stride_kt, stride_kd, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
    v = _load_tile(_head(v_src, b, hk, stride_vb, stride_vh, TMA), b, hk, start_n, T,
                   stride_vt, stride_vd, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Every query head of the group adds into the same registers, in a fixed order: the kv
    # head's gradient is summed deterministically, without atomics or a second pass.
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        key = dropout_key(seed_ptr, bh, DROPOUT)
        q_base = _head(q_src, b, h, stride_qb, stride_qh, TMA)
        do_base = _head(do_src, b, h, stride_dob, stride_doh, TMA)
        lse_base = lse_ptr + bh.to(tl.int64) * T
        delta_base = delta_ptr + bh.to(tl.int64) * T
        # Query rows past T need no mask: they load as zeros (q, dO, lse, delta), so their
        # p * dO and dS = p * (dP - delta) are exactly zero. Only the causal diagonal is masked;
        # query tiles before it cannot see these keys and are skipped.
        if CAUSAL:
            diag_hi = tl.minimum(start_n + BLOCK_N, T)
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, b, h, lse_base, delta_base,
                                          offs_n, start_n, diag_hi, T, qk_scale, key, keep_p,
                                          stride_qt, stride_qd, stride_dot, stride_dod, BLOCK_M,
                                          BLOCK_D, HEAD_DIM, True, CAUSAL, DROPOUT, FP32_DOT, TMA)
            full_lo = start_n + BLOCK_N
        else:
            full_lo = 0
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, b, h, lse_base, delta_base,
                                      offs_n, full_lo, T, T, qk_scale, key, keep_p,
                                      stride_qt, stride_qd, stride_dot, stride_dod, BLOCK_M,
                                      BLOCK_D, HEAD_DIM, False, CAUSAL, DROPOUT, FP32_DOT, TMA)

    _store_tile(_head(dqkv_ptr, b, H + hk, stride_gb, stride_gh, False), start_n, T,
                stride_gt, stride_gd, dk * sm_scale, BLOCK_N, BLOCK_D, HEAD_DIM)
    _store_tile(_head(dqkv_ptr, b, H + H // GROUP + hk, stride_gb, stride_gh, False), start_n, T,
                stride_gt, stride_gd, dv, BLOCK_N, BLOCK_D, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, b, hk, offs_m, lo, hi, T, qk_scale,
                       key, keep_p, stride_kt, stride_kd, stride_vt, stride_vd,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                       FP32_DOT: tl.constexpr, TMA: tl.constexpr):
    """Add key tiles [lo, hi) to a query tile's dq."""
    for start_n in range(lo, hi, BLOCK_N):
        k = _load_tile(k_base, b, hk, start_n, T, stride_kt, stride_kd, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
        v = _load_tile(v_base, b, hk, start_n, T, stride_vt, stride_vd, BLOCK_N, BLOCK_D, HEAD_DIM, TMA)
        s = _dot(q, tl.trans(k), None, FP32_DOT)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            s = _mask_scores(s, offs_m[:, None], offs_n[None, :], T, CAUSAL)
        p = _exp2_scaled(s, qk_scale, lse[:, None])
        dp = _dot(do, tl.trans(v), None, FP32_DOT)
        if DROPOUT:
            dp = dp * dropout_scale(key, offs_m[:, None], offs_n[None, :], keep_p)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, FP32_DOT)
    return dq


@triton.jit
def _attn_bwd_dq(
    q_ptr, k_ptr, v_ptr, do_ptr,  # q, dO (B, H, T, D); k, v (B, H // GROUP, T, D)
    lse_ptr, delta_ptr,  # base-2 log-sum-exp and rowsum(dO * O), (B, H, T) contiguous fp32
    dqkv_ptr,  # output: the gradient buffer (_empty_grads), whose first H heads this kernel writes (dq)
    seed_ptr,  # int64 dropout seed (one element); unused without DROPOUT
    T, H, GROUP,  # sequence length, query heads, query heads per kv head
    qk_scale,  # log2(e) / sqrt(D)
    sm_scale,  # 1 / sqrt(D)
    keep_p,  # 1 - dropout_p, the probability of keeping an attention weight (see dropout_scale)
    stride_qb, stride_qh, stride_qt, stride_qd,  # strides of q, k, v, dO and dqkv, in elements
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_gb, stride_gh, stride_gt, stride_gd,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per step; divides BLOCK_M so the diagonal starts a step
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    HEAD_DIM: tl.constexpr,  # D
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    FP32_DOT: tl.constexpr,  # see _dot
    TMA: tl.constexpr,  # load q, k, v, dO through tensor descriptors (see _source)
):
    qk_scale, sm_scale, keep_p = fp32(qk_scale), fp32(sm_scale), fp32(keep_p)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest causal rows first, as the forward
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    hk = h // GROUP
    q_src = _source(q_ptr, H, T, stride_qb, stride_qh, stride_qt, BLOCK_M, BLOCK_D, TMA)
    do_src = _source(do_ptr, H, T, stride_dob, stride_doh, stride_dot, BLOCK_M, BLOCK_D, TMA)
    k_src = _source(k_ptr, H // GROUP, T, stride_kb, stride_kh, stride_kt, BLOCK_N, BLOCK_D, TMA)
    v_src = _source(v_ptr, H // GROUP, T, stride_vb, stride_vh, stride_vt, BLOCK_N, BLOCK_D, TMA)
    k_base = _head(k_src, b, hk, stride_kb, stride_kh, TMA)
    v_base = _head(v_src, b, hk, stride_vb, stride_vh, TMA)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(_head(q_src, b, h, stride_qb, stride_qh, TMA), b, h, start_m, T,
                   stride_qt, stride_qd, BLOCK_M, BLOCK_D, HEAD_DIM, TMA)
    do = _load_tile(_head(do_src, b, h, stride_dob, stride_doh, TMA), b, h, start_m, T,
                    stride_dot, stride_dod, BLOCK_M, BLOCK_D, HEAD_DIM, TMA)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    key = dropout_key(seed_ptr, bh, DROPOUT)

    # The same split as the forward: unmasked key tiles, then the diagonal or the partial tail.
    full_hi, masked_hi = _key_ranges(start_m, T, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, b, hk, offs_m, 0, full_hi, T,
                            qk_scale, key, keep_p, stride_kt, stride_kd, stride_vt, stride_vd,
                            BLOCK_N, BLOCK_D, HEAD_DIM, False, CAUSAL, DROPOUT, FP32_DOT, TMA)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, b, hk, offs_m, full_hi, masked_hi,
                            T, qk_scale, key, keep_p, stride_kt, stride_kd, stride_vt,
                            stride_vd, BLOCK_N, BLOCK_D, HEAD_DIM, True, CAUSAL, DROPOUT, FP32_DOT, TMA)
    _store_tile(_head(dqkv_ptr, b, h, stride_gb, stride_gh, False), start_m, T,
                stride_gt, stride_gd, dq * sm_scale, BLOCK_M, BLOCK_D, HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

class _Config(NamedTuple):
    block_m: int  # query rows: per program in "fwd" and "dq", per step in "dkdv"
    block_n: int  # key rows: per step in "fwd" and "dq", per program in "dkdv"
    num_warps: int
    num_stages: int  # software-pipelining depth of the streamed tiles (shared memory per stage)
    tma: bool = False  # load q, k, v, dO tiles through tensor descriptors where _use_tma allows


def _pass_configs(fwd, dkdv, dq) -> dict[str, _Config]:
    return {"fwd": _Config(*fwd), "dkdv": _Config(*dkdv), "dq": _Config(*dq)}


# Per kind of tensor core (_generation) and padded head dim. sm90 at D = 64 and 128 are MEASURED:
# bench/tune_attention.py's winners on an H200 (2026-12-04, torch 2.11, triton 3.6; B*T = 16k,
# T = 4096, bf16, causal), each pass's fastest verified candidate of about 30 (TMA twins
# included). Against the earlier initial entries (bench.op_attention at T = 1024 to 16384):
# backward 1.3-2.3x, forward 0.93-1.46x (the tuner's own at T = 4096: up to 2.34x and 1.47x),
# slower only at D = 64 and T <= 1024 (the forward of _SHORT_T_CONFIGS
# below; docs/h200-2026-12-04.md). At these tiles TMA loads won every pass:
# through descriptors the tiles take 10-50% fewer registers (no 64-bit tile addresses in the
# threads). The rest are INITIAL values, not yet timed: inside the ranges the Triton tutorial and
# FlashAttention-2 use, and checked to compile and fit by tests/sm_compile.py (sm80, sm90, sm100,
# sm120; no GPU), spilling at most a few hundred bytes of registers (dropout's hashing adds to
# it); sm100 takes the sm90 entries untimed. Each pass owns a large tile and streams small ones
# past it: fwd/dq own query rows, dkdv owns keys and holds k, v, dk and dv in registers, so it
# owns fewer rows. sm80 covers Ampere and the Ada cards with ~100 KB of shared memory: 64-row
# tiles, 2 stages. Consumer Blackwell (sm120: mma.sync as on Ampere, 99 KB of shared memory a
# block) takes the sm80 tables: compiled for sm120 (triton 3.8), 128-row forward tiles spill up
# to 144 bytes a thread at D = 128, the sm80 tables' at most 64 (multi-head at 1025 tokens, 24 at
# 64; grouped-query 32, 16 up to 1024 tokens; by cuobjdump's stack size, 2026-12-06).
_SM80_SMALL_D = _pass_configs((64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2))
_GPU_CONFIGS: dict[int, dict[int, dict[str, _Config]]] = {
    8: {32: _SM80_SMALL_D, 64: _SM80_SMALL_D,
        128: _pass_configs((64, 64, 4, 2), (32, 64, 8, 2), (64, 32, 8, 2))},
    9: {32: _pass_configs((128, 64, 4, 3), (32, 128, 8, 2), (128, 32, 4, 3)),
        64: _pass_configs((64, 64, 4, 3, True), (32, 128, 4, 3, True), (64, 64, 4, 3, True)),
        128: _pass_configs((64, 64, 4, 3, True), (32, 64, 4, 3, True), (128, 64, 8, 3, True))},
}

# Sequences up to SHORT_T take the passes this table has for their GPU and D over _GPU_CONFIGS' (a
# table tuned at T = 4096): short sequences give each program few key tiles, so a program's fixed
# costs weigh more. sm90 D = 64 forward MEASURED on the H200 (2026-12-04; bench.op_attention, B*T =
# 16k, bf16, causal, the same run's GPU-side timing of both tables): the initial (128, 64, 4, 3)
# against the T = 4096 winner gave 183 vs 155 TFLOPS at T = 512, 254 vs 237 at 1024, and a tie at
# 2048 (314 vs 317); the T = 4096 backward won at every T (142 vs 125 TFLOPS at 512, 217 vs 167 at
# 1024), and so did every D = 128 pass. `bench.tune_attention --t 1024` prints entries for here.
SHORT_T = 1024
_SHORT_T_CONFIGS: dict[int, dict[int, dict[str, _Config]]] = {
    9: {64: {"fwd": _Config(128, 64, 4, 3)}},
}

# The interpreter runs a program's ops one by one in numpy: small tiles keep tests quick, and
# BLOCK_M != BLOCK_N still takes the multi-step causal diagonal the GPU tables take.
_INTERPRETER_CONFIGS = _pass_configs((32, 16, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1))


def _generation(major: int) -> int:
    """The table a GPU of compute-capability `major` takes: 9 where the tensor cores take
    warpgroup MMAs (wgmma on sm90, tcgen05 on sm100 and sm110), else 8 (mma.sync: sm80-89 and
    the consumer Blackwell sm120; older cards are refused: runtime.unsupported_gpu)."""
    return 9 if major in (9, 10, 11) else 8


def _config(q: torch.Tensor, which: str, dropout: bool = False) -> _Config:
    """The launch configuration of pass `which` ("fwd", "dkdv" or "dq") for q's device, length,
    D and dtype, with or without dropout."""
    capability = runtime.capability(q.device)
    if capability is None:
        return _INTERPRETER_CONFIGS[which]
    generation, D = _generation(capability[0]), runtime.next_power_of_2(q.shape[-1])
    short = _SHORT_T_CONFIGS.get(generation, {}).get(D, {}) if q.shape[-2] <= SHORT_T else {}
    cfg = short.get(which) or _GPU_CONFIGS[generation][D][which]
    if q.dtype == torch.float32:
        # fp32 tiles take twice the shared memory and registers, and fp32 dots run on the FMA
        # units: the checking path gets small tiles, no pipelining and 8 warps, so it fits on every
        # sm80+ card. At the 4 warps of some tuned entries the registers overflowed to the stack
        # (ptxas via tests/sm_compile.py, triton 3.8, D = 96: sm90 forward 408 bytes a thread and
        # dkdv 752, sm100 504 and 1224; at 8 warps 64 and 120, 128 and 192).
        cfg = _Config(min(cfg.block_m, 32), min(cfg.block_n, 32), 8, 1)
    if dropout:
        # The mask's hashing takes registers: at 4 warps the bf16 forward at D = 64 takes all 255
        # on sm90 and spills 48 bytes a thread on sm100 (tests/sm_compile.py, triton 3.8; 424 on
        # sm90 when the mask came from Philox), at 8 it spills nothing (sm90: 176 registers).
        cfg = cfg._replace(num_warps=max(cfg.num_warps, 8))
    return cfg


def _use_tma(cfg: _Config, *tensors: torch.Tensor) -> bool:
    """Whether a launch with `cfg` loads the tiles of `tensors` through TMA descriptors: the
    configuration asks for it, the GPU has the tensor copy engine (sm90+; the interpreter emulates
    it), the dtype is 16-bit, D is a power of two (a tile row is a whole head row) and every
    tensor has the layout the copy engine needs: unit stride on D, its other strides and its start
    multiples of 16 bytes (the model's qkv views qualify when the width is a multiple of 8).
    Otherwise the same configuration loads through pointers: tma is a speed choice, never a
    restriction."""
    q = tensors[0]
    if not cfg.tma or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (32, 64, 128):
        return False
    capability = runtime.capability(q.device)
    if capability is not None and capability[0] < 9:
        return False

    def aligned(t: torch.Tensor) -> bool:
        # The storage's own start is aligned (torch's allocators give 16 bytes and more); the
        # offset is checked instead of data_ptr, which tensors traced by torch.compile lack.
        # Broadcast dims (stride 0, e.g. an expanded dO) go through pointers.
        size = t.element_size()
        return (t.stride(-1) == 1 and t.storage_offset() * size % 16 == 0
                and all(s * size % 16 == 0 and (s > 0 or n == 1)
                        for s, n in zip(t.stride()[:-1], t.shape)))
    return all(aligned(t) for t in tensors)


def _tma_flag(cfg: _Config, *tensors: torch.Tensor) -> bool:
    """A launch's TMA constexpr (_use_tma); when set, Triton is given the allocator of the
    descriptors' global scratch first."""
    tma = _use_tma(cfg, *tensors)
    if tma:
        runtime.set_scratch_allocator()
    return tma


# ---------------------------------------------------------------------------------------------
# Launches, each with an explicit configuration: the ops pass _config's, and the tuner
# (bench/tune_attention.py) runs these same launches with its candidates
# ---------------------------------------------------------------------------------------------

def _launch_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float,
                seed: Optional[torch.Tensor], cfg: _Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse2) from the forward kernel launched with `cfg`."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    o = runtime.empty_heads(q, B, T, H, D)  # returned as its (B, H, T, D) view
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    tma = _tma_flag(cfg, q, k, v)
    with runtime.on_device(q):
        wrap_triton(_attn_fwd)[(runtime.cdiv(T, cfg.block_m), H, B)](
            q, k, v, o, lse, seed, T, H, H // Hkv, math.log2(math.e) / math.sqrt(D), 1.0 - dropout_p,
            *q.stride(), *k.stride(), *v.stride(), *runtime.head_strides(o),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=runtime.next_power_of_2(D), HEAD_DIM=D,
            CAUSAL=causal, DROPOUT=dropout_p > 0, FP32_DOT=runtime.INTERPRET or q.dtype == torch.float32,
            TMA=tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o.transpose(1, 2), lse


def _launch_delta(o: torch.Tensor, do: torch.Tensor, fwd_cfg: _Config) -> torch.Tensor:
    """rowsum(dO * O) (B, H, T) in fp32, the backward's preprocess."""
    B, H, T, D = o.shape
    delta = torch.empty((B, H, T), dtype=torch.float32, device=o.device)
    with runtime.on_device(o):
        # One row tile per program, the forward's row tiling, summed over D at once.
        wrap_triton(_attn_bwd_delta)[(runtime.cdiv(T, fwd_cfg.block_m), H, B)](
            o, do, delta, T, H, *o.stride(), *do.stride(),
            BLOCK_M=fwd_cfg.block_m, BLOCK_D=runtime.next_power_of_2(D), HEAD_DIM=D,
            num_warps=fwd_cfg.num_warps)
    return delta


def _heads(buf: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """(B, size, T, D) views of consecutive heads of a (B, T, heads, D) buffer (split after one
    transpose: the same views as transposing each part, for fewer views made)."""
    return buf.transpose(1, 2).split_with_sizes(sizes, 1)  # (Tensor.split: a Python wrapper, microseconds a call)


def _empty_grads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B, T, H + 2*Hkv, D) buffer for dq, dk and dv (_split_qkv): laid out as
    the model's qkv projection output lays out q, k and v, so that the split of that output takes
    the buffer as its gradient without concatenating (kernels.split)."""
    B, H, T, D = q.shape
    return runtime.empty_heads(q, B, T, H + 2 * k.shape[1], D)


def _split_qkv(buf: torch.Tensor, H: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, T, D), (B, Hkv, T, D) and (B, Hkv, T, D) views of the heads of a (B, T, H + 2*Hkv, D)
    buffer: _empty_grads' dq, dk and dv, or _rotated's turned q and k and v."""
    Hkv = (buf.shape[2] - H) // 2
    return _heads(buf, [H, Hkv, Hkv])


def _rotated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> torch.Tensor:
    """q and k turned by RoPE's tables and a copy of v, in one (B, T, H + 2*Hkv, D) buffer laid out
    as _empty_grads' (whose dq and dk the backward turns back in place, in one pass), written by
    one launch (rope.rotate_beside). Kept for the backward in place of q, k and v: v, a view of the
    model's projection output, would keep all of it, its unturned q and k too (2/3 of it in a LLaMA
    layer)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    qkv = runtime.empty_heads(q, B, T, H + 2 * Hkv, D)
    rotate_beside(q, k, v, qkv, cos, sin)
    return qkv


def _bwd_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
                delta: torch.Tensor, dqkv: torch.Tensor, causal: bool, dropout_p: float,
                seed: Optional[torch.Tensor], cfg: _Config) -> tuple[tuple, dict]:
    """The arguments and constexprs of a dkdv or dq launch with `cfg` (the two kernels take the
    same ones)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    args = (q, k, v, do, lse, delta, dqkv, seed, T, H, H // Hkv,
            math.log2(math.e) / math.sqrt(D), 1 / math.sqrt(D), 1.0 - dropout_p,  # qk_scale, sm_scale, keep_p
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *runtime.head_strides(dqkv))
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TMA=_tma_flag(cfg, q, k, v, do),
                      BLOCK_D=runtime.next_power_of_2(D), HEAD_DIM=D, CAUSAL=causal, DROPOUT=dropout_p > 0,
                      FP32_DOT=runtime.INTERPRET or q.dtype == torch.float32,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return args, constexprs


def _launch_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
                 lse: torch.Tensor, delta: torch.Tensor, dqkv: torch.Tensor,
                 causal: bool, dropout_p: float, seed: Optional[torch.Tensor], cfg: _Config) -> None:
    """dk and dv, written into their heads of `dqkv` (_empty_grads) by the dkdv kernel launched
    with `cfg`: a program per key block, kv head and batch."""
    args, constexprs = _bwd_launch(q, k, v, do, lse, delta, dqkv, causal, dropout_p, seed, cfg)
    with runtime.on_device(q):
        wrap_triton(_attn_bwd_dkdv)[(runtime.cdiv(q.shape[2], cfg.block_n), k.shape[1], q.shape[0])](
            *args, **constexprs)


def _launch_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
               lse: torch.Tensor, delta: torch.Tensor, dqkv: torch.Tensor, causal: bool,
               dropout_p: float, seed: Optional[torch.Tensor], cfg: _Config) -> None:
    """dq, written into its heads of `dqkv` (_empty_grads) by the dq kernel launched with `cfg`: a
    program per query block, head and batch."""
    args, constexprs = _bwd_launch(q, k, v, do, lse, delta, dqkv, causal, dropout_p, seed, cfg)
    with runtime.on_device(q):
        wrap_triton(_attn_bwd_dq)[(runtime.cdiv(q.shape[2], cfg.block_m), q.shape[1], q.shape[0])](
            *args, **constexprs)


def _launch_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                o: torch.Tensor, lse: torch.Tensor, causal: bool, dropout_p: float,
                seed: Optional[torch.Tensor], fwd_cfg: _Config, dkdv_cfg: _Config,
                dq_cfg: _Config) -> torch.Tensor:
    """The (B, T, H + 2*Hkv, D) buffer of dq, dk and dv (_empty_grads) from the backward's three
    kernels, the preprocess with the forward's `fwd_cfg`."""
    delta = _launch_delta(o, do, fwd_cfg)
    buf = _empty_grads(q, k)
    _launch_dkdv(q, k, v, do, lse, delta, buf, causal, dropout_p, seed, dkdv_cfg)
    _launch_dq(q, k, v, do, lse, delta, buf, causal, dropout_p, seed, dq_cfg)
    return buf


# ---------------------------------------------------------------------------------------------
# Operators (torch.library, so torch.compile sees the kernels) and autograd
# ---------------------------------------------------------------------------------------------

@runtime.triton_op("tritongpt::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float,
                   seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse2): the attention output and the fp32 base-2 log-sum-exp (B, H, T) of each row."""
    return _launch_fwd(q, k, v, causal, dropout_p, seed, _config(q, "fwd", dropout_p > 0))


@runtime.triton_op("tritongpt::attention_rope_fwd", mutates_args=())
def _attention_rope_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, causal: bool, dropout_p: float,
                        seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, lse2, qkv): attention over q and k turned by RoPE, and the buffer of the turned q and k
    and of v (_rotated), which the backward reads."""
    qkv = _rotated(q, k, v, cos, sin)
    q, k, v = _split_qkv(qkv, q.shape[1])
    return *_launch_fwd(q, k, v, causal, dropout_p, seed, _config(q, "fwd", dropout_p > 0)), qkv


@runtime.triton_op("tritongpt::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   o: torch.Tensor, lse: torch.Tensor, causal: bool, dropout_p: float,
                   seed: Optional[torch.Tensor], cos: Optional[torch.Tensor],
                   sin: Optional[torch.Tensor]) -> torch.Tensor:
    """The buffer of dq, dk and dv (_launch_bwd; one output, as a custom op's outputs may not alias
    each other) from dO and the forward's inputs, output and base-2 log-sum-exp. Given RoPE's
    tables (q and k being the turned ones), dq and dk are turned back to the inputs' gradients."""
    do = runtime.unit_stride_d(do)  # e.g. the stride-0 gradient of out.sum()
    dropout = dropout_p > 0
    buf = _launch_bwd(do, q, k, v, o, lse, causal, dropout_p, seed, _config(q, "fwd", dropout),
                      _config(q, "dkdv", dropout), _config(q, "dq", dropout))
    if cos is not None:  # the rotation's transpose, in place: dq and dk are adjacent heads
        rotate(buf[:, :, :q.shape[1] + k.shape[1]].transpose(1, 2), buf, cos, sin, True)
    return buf


def _setup_context(ctx, inputs, output):
    q, k, v, causal, dropout_p, seed = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.causal, ctx.dropout_p = causal, dropout_p
    runtime.only_first_output_differentiable(ctx, lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, seed = ctx.saved_tensors
    grads = _attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.dropout_p, seed, None, None)
    return *_split_qkv(grads, q.shape[1]), None, None, None


def _setup_rope_context(ctx, inputs, output):
    _q, _k, _v, cos, sin, causal, dropout_p, seed = inputs
    o, lse, qkv = output
    ctx.save_for_backward(qkv, o, lse, seed, cos, sin)
    ctx.causal, ctx.dropout_p = causal, dropout_p
    runtime.only_first_output_differentiable(ctx, lse, qkv)


def _rope_backward(ctx, do, _dlse, _dqkv):
    qkv, o, lse, seed, cos, sin = ctx.saved_tensors
    H = o.shape[1]  # o (B, H, T, D): the query heads
    q, k, v = _split_qkv(qkv, H)
    grads = _attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.dropout_p, seed, cos, sin)
    return *_split_qkv(grads, H), None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
_attention_rope_fwd.register_autograd(_rope_backward, setup_context=_setup_rope_context)


def check_triton_attention(q, k, rope) -> None:
    """What the Triton backend adds to check_attention: head dims, dtypes, query heads, device, the
    launch grid's limits (with rope, the rotation's launch takes q's, k's and v's heads on one
    axis). (No batch or no tokens pass: their launches have empty grids, which Triton does not
    launch.)"""
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"attention: the triton backend supports head dims {HEAD_DIMS}, "
                         f"got {q.shape[-1]}")
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"attention: the triton backend takes one of ({dtype_names(TRITON_DTYPES)}), "
                         f"got {dtype_names([q.dtype])}")
    if q.shape[1] == 0:  # the dkdv kernel sums each kv head's group of H // Hkv query heads
        raise ValueError(f"attention: the triton backend needs at least one query head, got q of shape "
                         f"{tuple(q.shape)}")
    runtime.check_device("attention", q)
    heads = q.shape[1] + (2 * k.shape[1] if rope is not None else 0)
    runtime.check_grid("attention", batch=q.shape[0], heads=heads)


@register("attention", "triton")
def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                     dropout_p: float = 0.0, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Flash attention in Triton; the torch backend's signature and semantics.

    q, k and v may be strided views (the model's split of one qkv projection): only a head dim
    that is not contiguous is copied. The output is (B, H, T, D) laid out as (B, T, H, D); the
    gradients dq, dk and dv are views of one (B, T, H + 2*Hkv, D) buffer (_empty_grads).
    Dropout's seed comes from runtime.dropout_seed_tensor and is kept for the backward.

    With `rope`, q and k are turned into one buffer first, v copied beside them, and dq and dk
    turned back in place in the gradient buffer (_attention_rope_fwd): the rotation's passes,
    and no copy of the gradients, which a separate rope op's fresh dq and dk would cost at the
    split."""
    check_attention(q, k, v, causal, dropout_p, rope)
    # Autocast's own cast of SDPA's fp32 q, k and v; the model's come in its dtype already, and skip
    # the question (a microsecond of host time a call under autocast)
    dtype = runtime.matmul_dtype(q, k, v) if q.dtype == torch.float32 else None
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    check_triton_attention(q, k, rope)
    seed = runtime.dropout_seed_tensor(dropout_p, q.device)
    if rope is not None:
        cos, sin = triton_tables("attention", *rope)
        return _attention_rope_fwd(q, k, v, cos, sin, causal, float(dropout_p), seed)[0]
    q, k, v = runtime.unit_stride_d(q), runtime.unit_stride_d(k), runtime.unit_stride_d(v)
    return _attention_fwd(q, k, v, causal, float(dropout_p), seed)[0]
