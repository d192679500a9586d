"""AdamW step over lists of tensors, in place: torch reference and a multi-tensor Triton kernel.

torch.optim.AdamW's math (decoupled weight decay p *= 1 - lr*wd, bias-corrected moments, eps
outside the sqrt), computed in fp32 and stored back in each tensor's own dtype, so bf16 params
with bf16 moments train with no fp32 master copy.

Stochastic rounding (`stochastic_rounding=True`, both backends): each bf16 store of the step
(the param and both moments) rounds to one of the two bf16 neighbours of the fp32 result, the
upper one with probability (x - lower) / (upper - lower), so the stored value equals x in
expectation. Updates smaller than half a bf16 step (about |p| * 2^-9) then move the weight on
average instead of vanishing, and the second moment still decays under beta2 = 0.999 (a relative
change of 1e-3 is below bf16's resolution: to nearest, v never shrinks). Stores in other dtypes
round to nearest. The random bits depend on `seed` and the element's position only, so a seed
reproduces a step exactly; the two backends draw different bits (the same distribution).

Kahan-compensated params (`compensations`, both backends), the alternative to rounding the
param stochastically: one more tensor per param holds what the last rounding of the param lost.
The step works on p + c in fp32, stores the param rounded to nearest, and keeps the remainder
(p + c - stored) in c; in bf16, p and c together carry about 16 significant bits instead of 8, so
small updates add up to that precision (c rounds too: a systematic loss of about 1% of the drift
of 1000 updates of 1e-4 to a weight of 1, where rounding to nearest loses all of it) instead of
on average, for 2 more bytes of state per param. The moments' stores still follow
`stochastic_rounding`.

Triton design: one launch per (device, dtype of p and g, dtype of m, dtype of v) group, which is
one launch for a model.
- A table, one row per tensor: the addresses of p, g, m and v (and c), the numel, and the
  tensor's index in the lists. The kernel casts each address to a typed pointer, so the tensors
  stay where they are: no flat buffers, no copies, nothing handed back to the model.
- A block map, one row per program: (table row, first element). The grid is the total number of
  blocks and each program updates BLOCK contiguous elements of one tensor, so a 768-element bias
  costs one program, the 38.6M-element embedding 18,864, and every program does the same work.
- Full blocks run unmasked with their addresses hinted 16-byte aligned (when all are): the
  compiler cannot see the alignment or the size behind an address loaded from memory, and without
  both it would issue one 2-byte access per element instead of 16-byte vectors. Only the last
  block of each tensor is masked; when every numel is a multiple of 16 (EVEN: a model's tensors
  are), its size is hinted so, and the masked block vectorizes too. Otherwise its per-element
  addresses set the whole kernel's registers (sm90, triton 3.8: 168 a thread instead of 86
  rounding to nearest, 244 instead of 120 stochastically).
- The table and block map depend only on the addresses, sizes and dtypes, so they are cached
  under that key: a step with the same tensors (the optimizer passes the same params and states
  every step, and the caching allocator hands the grads back the same addresses) costs one Python
  pass to build the key and no host-to-device copy; any new address rebuilds them.
- Step-dependent scalars (bias corrections, lr, decay) are computed on the host in float64 and
  passed as fp32 arguments: Triton does not specialize floats, so a new step or lr reuses the
  compiled kernel, and no device tensor is read, so there is no host sync. The seed is not
  specialized either (an int argument is, on being 1 or a multiple of 16).
- Stochastic rounding draws its bits from a hash (runtime.lowbias32, dropout's) of a per-block
  key and the element's offset: two hashes an element give the p, m and v stores 16 bits each.
  The key hashes the seed with the tensor's list index and the block's offset past 2^32, so
  (key, offset) never repeats within a call. It replaced tl.randint4x, whose 10 Philox rounds
  made the kernel bound by its arithmetic: on an H200 the step took 0.933 ms with stochastic
  rounding against 0.640 to nearest (2026-12-04), and compiled for sm90 the kernel held 4,096
  instructions and 128 registers a thread against 2,728 and 86.
The interpreter runs the same kernel on CPU tensors (the table then holds host addresses).
"""
import bisect
import functools
import itertools
import math
import numbers
import operator
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import runtime
from .runtime import fp32, lowbias32  # bare names: see wrap_triton's docstring
from .checks import FLOAT_DTYPES, check_list, check_number, check_same, check_tensor, has_overlap
from .registry import register

_SHAPE, _DTYPE, _DEVICE, _LAYOUT = (operator.attrgetter(a) for a in ("shape", "dtype", "device", "layout"))


def check_adamw(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                weight_decay, grad_scale, compensations) -> None:
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if compensations is not None:
        lists["compensations"] = compensations
    for name, ts in lists.items():
        check_list("adamw", name, ts)
    lengths = {name: len(ts) for name, ts in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"adamw: params, grads, exp_avgs and exp_avg_sqs must have the same length, "
                         f"got {lengths}")
    if not _plainly_valid(*lists.values()):
        _explain_tensors(params, grads, exp_avgs, exp_avg_sqs, compensations)
    check_number("adamw", "step", step, 1, integer=True)  # counts from 1
    check_settings("adamw", lr, beta1, beta2, eps, weight_decay)
    if grad_scale is not None:
        check_tensor("adamw", "grad_scale", grad_scale, dtypes=(torch.float32,))
        if grad_scale.numel() != 1:
            raise ValueError(f"adamw: grad_scale must hold one element, got shape {tuple(grad_scale.shape)}")
        elsewhere = next((p.device for p in params if p.device != grad_scale.device), None)
        if elsewhere is not None:
            raise ValueError(f"adamw: grad_scale must be on the params' device, got {grad_scale.device} "
                             f"and params on {elsewhere}")


def check_settings(op: str, lr, beta1, beta2, eps, weight_decay) -> None:
    """AdamW's settings, Python numbers in their ranges."""
    for name, value, hi in (("lr", lr, math.inf), ("beta1", beta1, 1.0), ("beta2", beta2, 1.0),
                            ("eps", eps, math.inf), ("weight_decay", weight_decay, math.inf)):
        check_number(op, name, value, 0.0, hi)


def _plainly_valid(params, grads, *states) -> bool:
    """Whether the tensor lists are valid in the common way: tensors of one shape and device a
    row, params and grads of one float dtype, states of float dtypes, the tensors written in place
    contiguous (so none overlaps itself). This runs every optimizer step over every parameter, so
    it compares whole lists with C-level maps; _explain_tensors finds what else is the matter."""
    everything = [params, grads, *states]
    tensors = list(itertools.chain.from_iterable(everything))
    if (not all(issubclass(kind, torch.Tensor) for kind in set(map(type, tensors)))
            or set(map(_LAYOUT, tensors)) - {torch.strided}):  # sparse ones: before any stride is asked for
        return False
    shapes, devices = tuple(map(_SHAPE, params)), tuple(map(_DEVICE, params))
    return (all(tuple(map(_SHAPE, ts)) == shapes for ts in everything[1:])
            and all(tuple(map(_DEVICE, ts)) == devices for ts in everything[1:])
            and tuple(map(_DTYPE, grads)) == tuple(map(_DTYPE, params))
            and set(map(_DTYPE, tensors)) <= set(FLOAT_DTYPES)
            and all(map(torch.Tensor.is_contiguous, itertools.chain(params, *states))))


def _explain_tensors(params, grads, exp_avgs, exp_avg_sqs, compensations) -> None:
    """The ValueError naming the first tensor that is not as _plainly_valid wants, if any is
    invalid (a non-contiguous one that does not overlap itself is valid: it is staged)."""
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        names = {f"params[{i}]": p, f"grads[{i}]": g, f"exp_avgs[{i}]": m, f"exp_avg_sqs[{i}]": v}
        for name, t in names.items():
            check_tensor("adamw", name, t)
        check_same("adamw", "shape", **names)
        check_same("adamw", "device", **names)
        check_same("adamw", "dtype", **{f"params[{i}]": p, f"grads[{i}]": g})
        _check_written_once(**{f"params[{i}]": p, f"exp_avgs[{i}]": m, f"exp_avg_sqs[{i}]": v})
    for i, (p, c) in enumerate(zip(params, compensations or ())):
        check_tensor("adamw", f"compensations[{i}]", c)
        check_same("adamw", "shape", **{f"params[{i}]": p, f"compensations[{i}]": c})
        check_same("adamw", "device", **{f"params[{i}]": p, f"compensations[{i}]": c})
        _check_written_once(**{f"compensations[{i}]": c})


def _check_written_once(**tensors: torch.Tensor) -> None:
    """The tensors updated in place must hold each element once: not an expanded or otherwise
    overlapping view. (That the tensors of a call share no memory with each other the triton
    backend checks when it makes a launch plan, _check_unshared; the torch backend, which updates
    one tensor after another, leaves it to the caller, as torch's AdamW does.)"""
    for name, t in tensors.items():
        if has_overlap(t):
            raise ValueError(f"adamw: {name} has elements that share memory (an expanded or overlapping view, strides "
                             f"{t.stride()}): an in-place update needs each element once")


def check_rounding(stochastic_rounding, seed) -> None:
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(f"adamw: stochastic_rounding must be a bool, got {stochastic_rounding!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**31:
        raise ValueError(f"adamw: seed must be an int in [0, 2**31), got {seed!r}")


def _stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 `x` to bf16, rounding the magnitude up with probability equal to the dropped fraction:
    adding a uniform 16-bit number to the bits that bf16 drops and truncating."""
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device,
                          dtype=torch.int32)
    up = ((x.view(torch.int32) + noise) & -(1 << 16)).view(torch.float32)
    # Truncating a NaN whose payload sits in the dropped bits would make it inf.
    return torch.where(torch.isnan(x), x, up).to(torch.bfloat16)


def python_numbers(step, seed, *settings) -> tuple:
    """The step, the seed and the float settings as Python's ints and floats, the numbers both
    backends compute with. Numpy's (which the checks take) would compute the bias corrections in
    float32 (numpy keeps float32 ** int in float32), and Triton refuses their scalars."""
    return (int(step), int(seed), *map(float, settings))


@register("adamw", "torch")
@torch.no_grad()
def adamw_torch(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps,
                weight_decay, stochastic_rounding: bool = False, seed: int = 0,
                grad_scale: torch.Tensor | None = None, compensations=None) -> None:
    check_adamw(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
                grad_scale, compensations)
    check_rounding(stochastic_rounding, seed)
    step, seed, lr, beta1, beta2, eps, weight_decay = python_numbers(step, seed, lr, beta1, beta2, eps, weight_decay)
    step_size = lr / (1 - beta1 ** step)
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    generators = {}
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        pf, gf, mf, vf = p.float(), g.float(), m.float(), v.float()
        if grad_scale is not None:
            gf = gf * grad_scale.reshape(())  # a (1,) scale would broadcast a 0-d grad to (1,)
        if compensations is not None:
            pf = pf + compensations[i].float()
        pf.mul_(1 - lr * weight_decay)
        mf.lerp_(gf, 1 - beta1)
        vf.mul_(beta2).addcmul_(gf, gf, value=1 - beta2)
        pf.addcdiv_(mf, (vf.sqrt() / bias_correction2_sqrt).add_(eps), value=-step_size)
        if compensations is not None:
            p.copy_(pf)
            compensations[i].copy_(pf - p.float())
        for dst, src in ((p, pf), (m, mf), (v, vf)):
            if dst is src or (dst is p and compensations is not None):
                continue
            if stochastic_rounding and dst.dtype == torch.bfloat16:
                if dst.device not in generators:
                    generators[dst.device] = torch.Generator(dst.device).manual_seed(seed)
                src = _stochastic_round_bf16(src, generators[dst.device])
            dst.copy_(src)


# --- Triton ---------------------------------------------------------------------------------

# BLOCK: elements per program. 2048 over NUM_WARPS = 4 warps is 16 per thread: each thread has
# two 16-byte loads of each bf16 stream (four of fp32) in flight at once, and even a 768-element
# bias fills a third of its program, while the embedding splits into ~19K programs (many waves,
# so the last partial wave costs little).
BLOCK = 2048
NUM_WARPS = 4
# Addresses are hinted to this alignment in bytes: the widest vector access.
ALIGNMENT = tl.constexpr(16)
# Every numel of a launch a multiple of this (when all are): see _block.
EVEN_NUMEL = tl.constexpr(16)
# Bits of a block's offset past 2^32 in its stochastic-rounding key (tensors of up to 2^40
# elements, 2 TB of bf16); the tensor's index in the lists sits above them.
HIGH_OFFSET_BITS = tl.constexpr(8)

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


@triton.jit
def _pointer(entry, column, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address in `column` of a table row, as a pointer to DTYPE."""
    ptr = tl.load(entry + column).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # On the pointer itself: the alignment analysis does not follow int-to-pointer casts.
        ptr = tl.multiple_of(ptr, ALIGNMENT)
    return ptr


@triton.jit
def _block(table, blocks, WIDTH: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    """This program's table row (WIDTH columns: the addresses, then numel and list index), its
    tensor's numel, its block's first offset, the int64 offsets of its block in that tensor, and
    whether the block is whole (no lane past numel: its loads and stores need no mask)."""
    row = tl.load(blocks + 2 * tl.program_id(0))
    start = tl.multiple_of(tl.load(blocks + 2 * tl.program_id(0) + 1), BLOCK)
    entry = table + WIDTH * row
    numel = tl.load(entry + WIDTH - 2)
    if EVEN:
        # The mask of a last block then holds over whole 16-element runs: it vectorizes like the
        # full blocks, and its per-element addresses no longer set the kernel's registers (sm90,
        # AdamW to nearest: 86 a thread instead of 168, five programs an SM instead of three).
        numel = tl.multiple_of(numel, EVEN_NUMEL)
    # int64: a tensor may hold more than 2^31 elements.
    return entry, numel, start, start + tl.arange(0, BLOCK), start + BLOCK <= numel


@triton.jit
def _round(x, dtype: tl.constexpr, bits, SR: tl.constexpr):
    """fp32 `x` rounded to a value of `dtype`, still in fp32: bf16 stochastically with `bits` when
    SR, else to nearest even."""
    if dtype == tl.bfloat16:
        # Rounded here in integer arithmetic, so that the cast to bf16 drops only zero bits.
        # Adding 0x7FFF plus the last kept bit rounds to nearest even; adding a uniform 16-bit
        # number instead carries into the kept bits with probability equal to the dropped
        # fraction: stochastic rounding without bias.
        u = x.to(tl.uint32, bitcast=True)
        if SR:
            u += bits & 0xFFFF
        else:
            u += 0x7FFF + ((u >> 16) & 1)
        # A NaN must stay one (its payload may sit in the dropped bits, or carry into the sign).
        u = tl.where(x != x, 0x7FC00000, u & 0xFFFF0000)
        return u.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _store(ptrs, x, bits, mask, SR: tl.constexpr):
    """Store fp32 `x` in the pointers' dtype, rounded as _round does."""
    dtype = ptrs.dtype.element_ty
    tl.store(ptrs, _round(x, dtype, bits, SR).to(dtype), mask=mask)


@triton.jit
def _update(p_ptrs, g_ptrs, m_ptrs, v_ptrs, c_ptrs, mask, key, offs, g_scale, decay, one_minus_beta1,
            beta2, one_minus_beta2, bias_correction2_sqrt, step_size, eps, FROM_G: tl.constexpr,
            SR: tl.constexpr, KAHAN: tl.constexpr):
    """One AdamW step of a block, in torch.optim.AdamW's order of operations (`key`: the block's
    stochastic-rounding key)."""
    p = tl.load(p_ptrs, mask=mask).to(tl.float32)
    if KAHAN:
        p += tl.load(c_ptrs, mask=mask).to(tl.float32)
    g = tl.load(g_ptrs, mask=mask).to(tl.float32) * g_scale
    m = tl.load(m_ptrs, mask=mask).to(tl.float32)
    v = tl.load(v_ptrs, mask=mask).to(tl.float32)
    p = p * decay
    if FROM_G:
        m = g - (g - m) * (1.0 - one_minus_beta1)
    else:
        m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    # IEEE sqrt and division, as torch's: the fast approximations would cost fp32 params their
    # last bits against torch.optim.AdamW, and this kernel is bound by memory, not arithmetic.
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    if SR:
        low = offs.to(tl.uint32)  # the offset's low 32 bits (the key holds the rest)
        pm = lowbias32(key ^ low)  # (_round takes the low 16 bits of each)
        bits_p, bits_m, bits_v = pm, pm >> 16, lowbias32((key + 0x9E3779B9) ^ low)
    else:
        bits_p, bits_m, bits_v = None, None, None
    if KAHAN:
        # The param to nearest, and what that rounding lost into c (the difference is exact in
        # fp32: p and its rounding are within a factor of two of each other).
        p_dtype: tl.constexpr = p_ptrs.dtype.element_ty
        stored = _round(p, p_dtype, None, False)
        tl.store(p_ptrs, stored.to(p_dtype), mask=mask)
        _store(c_ptrs, p - stored, None, mask, False)
    else:
        _store(p_ptrs, p, bits_p, mask, SR)
    _store(m_ptrs, m, bits_m, mask, SR)
    _store(v_ptrs, v, bits_v, mask, SR)


@triton.jit(do_not_specialize=["seed"])
def _adamw_kernel(
    table,                  # int64 (n, WIDTH): per tensor, addresses of p, g, m, v (and c when
                            # KAHAN), numel, list index
    blocks,                 # int64 (n_blocks, 2): per program, its table row and first element
    grad_scale,             # fp32 (1,): multiplies every grad as it is read (unused without SCALED)
    decay,                  # 1 - lr * weight_decay
    one_minus_beta1,        # the weight of g in m's running average
    beta2,                  # the weight of v in its running average
    one_minus_beta2,        # the weight of g*g in v's running average
    bias_correction2_sqrt,  # sqrt(1 - beta2**step)
    step_size,              # lr / (1 - beta1**step)
    eps,                    # added to the bias-corrected sqrt(v)
    seed,                   # this step's stochastic-rounding seed, in [0, 2^31) (unused without SR)
    P_DTYPE: tl.constexpr,  # dtype of p and g
    M_DTYPE: tl.constexpr,  # dtype of m
    V_DTYPE: tl.constexpr,  # dtype of v
    C_DTYPE: tl.constexpr,  # dtype of c (unused without KAHAN)
    FROM_G: tl.constexpr,   # m's average taken from g's end (see _lerp_from_g)
    WIDTH: tl.constexpr,    # columns of the table
    SR: tl.constexpr,       # round the bf16 stores stochastically (else to nearest even)
    KAHAN: tl.constexpr,    # compensate the param's rounding in c (the param to nearest)
    SCALED: tl.constexpr,   # read grad_scale (else the grads are taken as they are)
    ALIGNED: tl.constexpr,  # every address in the table is 16-byte aligned
    EVEN: tl.constexpr,     # every numel in the table is a multiple of EVEN_NUMEL
    BLOCK: tl.constexpr,    # elements per program
):
    decay, one_minus_beta1, beta2 = fp32(decay), fp32(one_minus_beta1), fp32(beta2)
    one_minus_beta2, bias_correction2_sqrt = fp32(one_minus_beta2), fp32(bias_correction2_sqrt)
    step_size, eps = fp32(step_size), fp32(eps)
    entry, numel, start, offs, full = _block(table, blocks, WIDTH, BLOCK, EVEN)
    p_ptrs = _pointer(entry, 0, P_DTYPE, ALIGNED) + offs
    g_ptrs = _pointer(entry, 1, P_DTYPE, ALIGNED) + offs
    m_ptrs = _pointer(entry, 2, M_DTYPE, ALIGNED) + offs
    v_ptrs = _pointer(entry, 3, V_DTYPE, ALIGNED) + offs
    if KAHAN:
        c_ptrs = _pointer(entry, 4, C_DTYPE, ALIGNED) + offs
    else:
        c_ptrs = None
    if SR:
        # One key per block: BLOCK divides 2^32, so a block's offsets share their high bits.
        high = (tl.load(entry + WIDTH - 1) << HIGH_OFFSET_BITS) + (start >> 32)
        key = lowbias32(seed.to(tl.uint32) ^ lowbias32(high.to(tl.uint32)))
    else:
        key = None
    # Read on the device: a clip coefficient computed from this step's grad norm costs no host sync.
    if SCALED:
        g_scale = tl.load(grad_scale)
    else:
        g_scale = 1.0
    # Only a tensor's last block is masked: a mask against a size loaded from memory would keep
    # the full blocks from vectorizing. (The two calls differ in `mask` alone; one call with a
    # mask that is None on one branch is not valid Triton: a variable keeps one type.)
    if full:
        _update(p_ptrs, g_ptrs, m_ptrs, v_ptrs, c_ptrs, None, key, offs, g_scale, decay,
                one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, step_size, eps,
                FROM_G, SR, KAHAN)
    else:
        _update(p_ptrs, g_ptrs, m_ptrs, v_ptrs, c_ptrs, offs < numel, key, offs, g_scale, decay,
                one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, step_size, eps,
                FROM_G, SR, KAHAN)


@triton.jit
def _sum_squares_kernel(
    table,                  # int64 (n, 3): per tensor, its address, numel, list index
    blocks,                 # int64 (n_blocks, 2): per program, its table row and first element
    partials,               # fp32 (n_blocks,): each program's sum of squares, at its own index
    DTYPE: tl.constexpr,    # dtype of the tensors
    ALIGNED: tl.constexpr,  # every address in the table is 16-byte aligned
    EVEN: tl.constexpr,     # every numel in the table is a multiple of EVEN_NUMEL
    BLOCK: tl.constexpr,    # elements per program
):
    entry, numel, _, offs, full = _block(table, blocks, 3, BLOCK, EVEN)
    ptr = _pointer(entry, 0, DTYPE, ALIGNED)
    if full:
        x = tl.load(ptr + offs).to(tl.float32)
    else:
        x = tl.load(ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(partials + tl.program_id(0), tl.sum(x * x))


@triton.jit
def _sqrt_of_sum_kernel(
    partials,             # fp32 (n,): the sums of squares of all blocks
    n,                    # their number
    out,                  # fp32 (): sqrt of their sum
    BLOCK: tl.constexpr,  # partials read per iteration
):
    # One program, a fixed order: the same partials always give the same bits (no atomics).
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    tl.store(out, tl.sqrt_rn(tl.sum(acc)))


class _Launch(NamedTuple):
    """One kernel launch: the tensors of one device and one combination of dtypes."""

    table: torch.Tensor   # int64 (n, width) on the device: the kernels' `table`
    blocks: torch.Tensor  # int64 (n_blocks, 2) on the device: the kernels' `blocks`
    dtypes: tuple         # Triton dtypes of the tensors of a row
    aligned: bool         # every address in `table` is ALIGNMENT-aligned
    even: bool            # every numel in `table` is a multiple of EVEN_NUMEL


def _key(lists: list[list[torch.Tensor]], typed: tuple[int, ...]) -> tuple:
    """_plan's description of table rows (row i: the i-th tensor of each of `lists`, typed by the
    dtypes of the lists `typed`). It is built every step over every parameter, so as flat
    tuples by C-level maps: a tuple a row cost twice as much host time."""
    return (tuple(map(torch.Tensor.data_ptr, itertools.chain.from_iterable(lists))),
            tuple(map(torch.Tensor.numel, lists[0])),
            tuple(map(_DTYPE, itertools.chain.from_iterable(lists[i] for i in typed))),
            tuple(map(_DEVICE, lists[0])))


_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "compensations")  # adamw's, in _key's order


def _key_spans(key: tuple) -> list[tuple[int, int, int, int]]:
    """(first byte, end, list index, tensor index) of each non-empty tensor of an adamw plan's key
    (contiguous tensors: _key's addresses and numels)."""
    addresses, numels, dtypes, _devices = key
    n = len(numels)
    spans = []
    for j in range(len(addresses) // n):
        typed = max(j - 1, 0)  # grads (list 1) have the params' dtype and are not in the dtypes
        for i in range(n):
            if numels[i]:
                start = addresses[j * n + i]
                spans.append((start, start + numels[i] * dtypes[typed * n + i].itemsize, j, i))
    return spans


def _tensor_spans(lists) -> list[tuple[int, int, int, int]]:
    """The same from the tensors, any strides: each one's extent, first to last element. A strided
    tensor's holds the gaps between its elements too: views that interleave in one buffer
    (buf[:, 0] and buf[:, 1]) count as sharing memory, though no element is in both."""
    return [(t.data_ptr(), t.data_ptr() + (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.itemsize,
             j, i) for j, ts in enumerate(lists) for i, t in enumerate(ts) if t.numel()]


def _check_unshared(spans: list[tuple[int, int, int, int]]) -> None:
    """No two tensors of an adamw call share memory: the kernel's programs run at once, and one
    whose tensor lies on another's would race with it (a param listed twice, exp_avg and
    exp_avg_sq the same buffer). Grads may share memory with each other (only read); nothing
    written may share with anything. `spans`: _key_spans' (checked once per plan) or, for
    tensors staged through contiguous copies, _tensor_spans' (the copies would be written back
    one over another)."""
    written = _written_spans(spans)
    ends = [s[1] for s in written]  # ascending once the written spans are known disjoint
    for before, after in zip(written, written[1:]):
        if after[0] < before[1]:
            _shared(before, after)
    starts = [s[0] for s in written]
    for g in (s for s in spans if s[2] == 1):
        k = bisect.bisect_left(starts, g[1]) - 1  # the last written span starting before g ends
        if k >= 0 and ends[k] > g[0]:
            _shared(written[k], g)


def _written_spans(spans: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """The spans of tensors the call writes (all but the grads), in address order."""
    return sorted(s for s in spans if s[2] != 1)


@functools.lru_cache(maxsize=16)
def _written(key: tuple) -> tuple[list[int], list[int]]:
    """(first bytes, ends) of the tensors an adamw plan's launch writes, in order (disjoint:
    _plan has checked them)."""
    spans = _written_spans(_key_spans(key))
    return [s[0] for s in spans], [s[1] for s in spans]


def _check_scale_apart(grad_scale: torch.Tensor, key: tuple) -> None:
    """grad_scale, which every program reads, must not lie in a tensor the call writes: the
    program writing it would race with the others' reads."""
    starts, ends = _written(key)
    address = grad_scale.data_ptr()
    k = bisect.bisect_right(starts, address) - 1
    if k >= 0 and address < ends[k]:
        raise ValueError("adamw: grad_scale lies in memory the call writes (a param's, a moment's or a "
                         "compensation's): every program reads it while one of them writes it")


def _shared(a: tuple, b: tuple) -> None:
    name_a, name_b = (f"{_LISTS[s[2]]}[{s[3]}]" for s in (a, b))
    raise ValueError(f"adamw: {name_a} and {name_b} share memory (their extents overlap): the triton backend "
                     f"updates every tensor of a call at once, so each one written in place must have memory of "
                     f"its own")


@functools.lru_cache(maxsize=16)
def _plan(op: str, key: tuple) -> tuple[_Launch, ...]:
    """The launches of `op` over the table rows `key` describes (see _key: their addresses,
    numels, dtypes and devices). They depend on nothing else, hence the cache."""
    # Only host memory in the interpreter: it cannot follow the table's addresses into a GPU's.
    device_type = "cpu" if runtime.CPU_TENSORS else "cuda"
    all_addresses, numels, all_dtypes, devices = key
    n = len(numels)
    rows = zip((all_addresses[i::n] for i in range(n)), numels, (all_dtypes[i::n] for i in range(n)), devices)
    groups: dict[tuple, list[tuple]] = {}
    for index, (addresses, numel, dtypes, device) in enumerate(rows):
        if device.type != device_type:
            raise ValueError(f"{op}: the triton backend needs {device_type} tensors here, "
                             f"got tensor {index} on {device}")
        if device.type == "cuda":
            runtime.check_gpu(op, device)
        if numel:
            groups.setdefault((device, dtypes), []).append((*addresses, numel, index))
    if op == "adamw":  # (after the devices: a meta tensor's address is 0, as all others')
        _check_unshared(_key_spans(key))
        # Stochastic rounding's keys tell tensors and blocks apart within these bounds
        if n > 1 << (32 - HIGH_OFFSET_BITS.value) or max(numels, default=0) > 1 << (32 + HIGH_OFFSET_BITS.value):
            raise ValueError(f"{op}: at most {1 << (32 - HIGH_OFFSET_BITS.value)} tensors of at most "
                             f"2^{32 + HIGH_OFFSET_BITS.value} elements each, got {n} tensors of up to {max(numels)}")
    launches = []
    for (device, dtypes), rows in groups.items():
        # Made on the host, whatever torch.set_default_device says, and uploaded as one copy.
        table = torch.tensor(rows, dtype=torch.int64, device="cpu")
        n_blocks = (table[:, -2] + BLOCK - 1) // BLOCK
        row = torch.repeat_interleave(torch.arange(len(rows), device="cpu"), n_blocks)
        first_block = torch.cumsum(n_blocks, 0) - n_blocks
        start = (torch.arange(len(row), device="cpu") - first_block[row]) * BLOCK
        aligned = all(address % ALIGNMENT.value == 0 for r in rows for address in r[:-2])
        even = all(r[-2] % EVEN_NUMEL.value == 0 for r in rows)
        launches.append(_Launch(_upload(table, device), _upload(torch.stack([row, start], 1), device),
                                tuple(_TL_DTYPES[d] for d in dtypes), aligned, even))
    return tuple(launches)


def tables_made() -> int:
    """How many times launch plans (a pointer table and block map per dtype group) were made:
    _plan's cache misses since its last cache_clear. In steady training there should be none, as
    the grads come back at the same addresses each step; each costs host time and uploads."""
    return _plan.cache_info().misses


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor `t` on `device`, queued on the stream like a kernel. A copy from pageable
    memory would wait for the GPU to finish all its queued work first (the step's backward, when
    the grads have new addresses and the plan is made anew); from pinned memory it need not, and
    torch's pinned-memory cache keeps the buffer until the copy is done. The copy is ordered on
    the current stream, which the launches that use the table run on (nothing here uses another)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@functools.cache  # (a tensor a step would be host time for one bit)
def _lerp_from_g(beta1: float) -> bool:
    """Whether torch's lerp (m.lerp_(g, 1 - beta1), torch.optim.AdamW's) computes m's average
    from g's end, g - (g - m) * beta1, as it does for weights of 0.5 and more: without momentum
    (beta1 = 0) m is then g exactly, where m + (g - m) loses the bits of a grad far smaller than
    the old m. Chosen on the host: the kernel's float arguments may be fp64 (torch.compile's),
    and a comparison of one would be fp64 math."""
    return float(torch.tensor(1 - beta1, dtype=torch.float32)) >= 0.5  # the weight torch's kernel takes, fp32


# The triton backends of both ops run eagerly inside torch.compile (a graph break): their launches
# read pointer tables, built and cached by the tensors' addresses, which a traced graph cannot hold.
@register("adamw", "triton")
@torch.compiler.disable
@torch.no_grad()
def adamw_triton(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps,
                 weight_decay, stochastic_rounding: bool = False, seed: int = 0,
                 grad_scale: torch.Tensor | None = None, compensations=None) -> None:
    check_adamw(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
                grad_scale, compensations)
    check_rounding(stochastic_rounding, seed)
    if not params:  # nothing to update, as the torch backend (a plan of no tensors has no table)
        return
    step, seed, lr, beta1, beta2, eps, weight_decay = python_numbers(step, seed, lr, beta1, beta2, eps, weight_decay)
    # The kernel walks each tensor's memory in order: others go through contiguous copies.
    lists = (params, grads, exp_avgs, exp_avg_sqs) + ((compensations,) if compensations is not None else ())
    staged = lists
    if not all(map(torch.Tensor.is_contiguous, itertools.chain(*lists))):
        _check_unshared(_tensor_spans(lists))  # the copies' addresses would hide it from the plan's check
        staged = [[t if t.is_contiguous() else t.contiguous() for t in ts] for ts in lists]
    kahan = compensations is not None
    key = _key(staged, typed=(0, *range(2, len(staged))))  # the grads: p's dtype
    if grad_scale is not None:
        _check_scale_apart(grad_scale, key)
    for launch in _plan("adamw", key):
        with runtime.on_device(launch.table):
            _adamw_kernel[(len(launch.blocks),)](
                launch.table, launch.blocks, grad_scale, 1 - lr * weight_decay, 1 - beta1, beta2,
                1 - beta2, math.sqrt(1 - beta2 ** step), lr / (1 - beta1 ** step), eps, seed,
                *launch.dtypes[:3], C_DTYPE=launch.dtypes[3] if kahan else None, FROM_G=_lerp_from_g(beta1),
                WIDTH=launch.table.shape[1],
                SR=stochastic_rounding and tl.bfloat16 in launch.dtypes, KAHAN=kahan,
                SCALED=grad_scale is not None, ALIGNED=launch.aligned, EVEN=launch.even, BLOCK=BLOCK,
                num_warps=NUM_WARPS)
    for ts, copies in zip(lists[:1] + lists[2:], staged[:1] + staged[2:]):  # all but the grads
        for t, copy in zip(ts, copies):
            if copy is not t:
                t.copy_(copy)


# --- grad_norm: the global L2 norm that gradient clipping divides by ------------------------

def check_grad_norm(tensors) -> None:
    check_list("grad_norm", "tensors", tensors)
    for i, t in enumerate(tensors):
        check_tensor("grad_norm", f"tensors[{i}]", t)
        if t.device != tensors[0].device:
            raise ValueError(f"grad_norm: tensors must be on one device, got tensors[0] on "
                             f"{tensors[0].device} and tensors[{i}] on {t.device}")


@register("grad_norm", "torch")
@torch.no_grad()
def grad_norm_torch(tensors) -> torch.Tensor:
    """sqrt of the sum of squares of every element of `tensors`, accumulated in fp32 (float64 for
    float64 inputs): a 0-d tensor on their device, as torch.nn.utils.get_total_norm's value."""
    check_grad_norm(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    # The per-tensor norms as torch's clip_grad_norm_ takes them (a few multi-tensor launches, not
    # one a grad), in `acc`: get_total_norm's would be rounded to a 16-bit grad's dtype.
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=acc)))


@register("grad_norm", "triton")
@torch.compiler.disable
@torch.no_grad()
def grad_norm_triton(tensors) -> torch.Tensor:
    """grad_norm_torch's value (but float64 grads summed in fp32, and an fp32 result) in two
    launches for the whole list (one more per extra dtype): per block of every tensor its fp32
    sum of squares, then one program sums them in a fixed order, so the result is bit-identical
    run to run. Nothing is read back to the host."""
    check_grad_norm(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    staged = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    launches = _plan("grad_norm", _key([staged], typed=(0,)))
    device = tensors[0].device
    blocks = sum(len(launch.blocks) for launch in launches)
    if not blocks:  # every tensor empty
        return torch.zeros((), dtype=torch.float32, device=device)
    partials = torch.empty(blocks, dtype=torch.float32, device=device)  # each block writes its own
    out = torch.empty((), dtype=torch.float32, device=device)
    with runtime.on_device(partials):
        first = 0
        for launch in launches:
            _sum_squares_kernel[(len(launch.blocks),)](
                launch.table, launch.blocks, partials[first:], *launch.dtypes, ALIGNED=launch.aligned,
                EVEN=launch.even, BLOCK=BLOCK, num_warps=NUM_WARPS)
            first += len(launch.blocks)
        _sqrt_of_sum_kernel[(1,)](partials, len(partials), out, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
