"""How Triton runs here: natively on a CUDA GPU, else in its CPU interpreter, and the few launch
helpers every op file shares.

The interpreter is switched on before any kernel is defined, because `triton.jit` reads
TRITON_INTERPRET when it decorates. An explicit TRITON_INTERPRET in the environment is kept.
"""
import contextlib
import functools
import math
import os
import threading
import warnings

import torch
import torch.autograd.forward_ad as forward_ad
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402  (after TRITON_INTERPRET is settled)
import triton.language as tl  # noqa: E402

# True when kernels run in Triton's CPU interpreter. The interpreter has no bf16 arithmetic and
# its bf16 `tl.dot` multiplies bit patterns (triton-lang/triton#4972, #11584): kernels load, cast
# to fp32 at once, and are given this as a constexpr so their `tl.dot` operands stay fp32. Its
# casts to bf16 are mended below (round_bf16_casts). Triton's own reading of the variable: "false"
# or "off" is off here as it is to triton.jit.
INTERPRET = triton.knobs.runtime.interpret


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


# Whether the triton backends take CPU tensors: where the interpreter runs them, and in the offline
# compile check (tests/sm_compile.py), which compiles a GPU's kernels from CPU tensors.
CPU_TENSORS = INTERPRET


# The NVIDIA GPUs Triton supports (its README): Ampere and newer. Compiled once for a Turing card
# (sm75, through tests/sm_compile.py's stand-in driver with triton 3.8; the tool offers sm80 and
# newer now), attention's tl.dot takes no tensor cores and spills kilobytes a thread, and its
# backward passes outgrow the 64 KB of shared memory.
MIN_CAPABILITY = (8, 0)


def unsupported_gpu(device: torch.device) -> str | None:
    """Why the triton backends refuse `device`'s GPU, or None. They are written and tuned for the
    NVIDIA GPUs Triton supports (launch tables by compute capability, TMA from sm90): not for an
    older one, nor for an AMD GPU under ROCm (which torch also calls "cuda"; never run there)."""
    if torch.version.hip is not None:
        return f"the triton backends are written and tuned for NVIDIA GPUs, and {device} is a ROCm one"
    cc = capability(device)
    if cc is None or cc >= MIN_CAPABILITY:
        return None
    return (f"the triton backends need a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
            f"(the ones Triton supports), {device} is {cc[0]}.{cc[1]}")


def check_gpu(op: str, device: torch.device) -> None:
    """A ValueError naming `op` where the triton backends refuse `device`'s GPU (unsupported_gpu)."""
    why = unsupported_gpu(device)
    if why:
        raise ValueError(f"{op}: {why}: use the torch backend")


def check_device(op: str, t: torch.Tensor) -> None:
    """The triton backends' device rule: CUDA tensors on a GPU they support (check_gpu), or CPU
    ones where the interpreter runs. The GPU is checked in eager calls only: Dynamo would trace
    its cached properties (warning of the cache), and a model reaches torch.compile with
    backends chosen eagerly (kernels.choose), where an unsupported GPU got torch."""
    if t.device.type == "cuda":
        if not torch.compiler.is_compiling():
            check_gpu(op, t.device)
    elif not (CPU_TENSORS and t.device.type == "cpu"):
        raise ValueError(f"{op}: the triton backend runs on CUDA tensors (or on CPU ones in Triton's "
                         f"interpreter, TRITON_INTERPRET=1), got a tensor on {t.device}")


GRID_YZ_MAX = 65535  # CUDA's limit on a launch grid's second and third axes


def check_grid(op: str, **extents: int) -> None:
    """The triton backends' launches put these (a batch, heads) on a grid's second and third
    axes, a program row each: past CUDA's limit the launch would fail."""
    for name, n in extents.items():
        if n > GRID_YZ_MAX:
            raise ValueError(f"{op}: the triton backend takes at most {GRID_YZ_MAX} {name} (a launch grid's "
                             f"limit), got {n}")


def matmul_dtype(*tensors: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs a matmul of `tensors` in on their device: None without autocast,
    or when one is float64 (autocast leaves float64 matmuls as they are), or on the meta device,
    which autocast has no notion of (asking raises; torch.amp.is_autocast_available would tell,
    but Dynamo cannot trace it in torch 2.11)."""
    device = tensors[0].device.type
    if (tensors[0].is_meta or not torch.is_autocast_enabled(device)
            or any(t.dtype == torch.float64 for t in tensors)):
        return None
    return torch.get_autocast_dtype(device)


def cdiv(a: int, b: int) -> int:
    """triton.cdiv for host code: the same (a + b - 1) // b, without the cost of calling a Triton
    constexpr function from Python (some 3 us a call in triton 3.8, several per launch)."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 for host code (see cdiv): the smallest power of 2 >= n, as Triton
    computes it."""
    n -= 1
    n |= n >> 1
    n |= n >> 2
    n |= n >> 4
    n |= n >> 8
    n |= n >> 16
    n |= n >> 32
    return n + 1


def capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of `device`'s GPU, which launch configurations are chosen by; None
    off the GPU (the interpreter's configurations). Looked up once per GPU, as num_sms: attention
    asks for every pass's configuration."""
    if device.type != "cuda":
        return None
    props = _cuda_properties(device)
    return props.major, props.minor


def _cuda_properties(device: torch.device):
    return _properties_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _properties_of(index: int):
    return torch.cuda.get_device_properties(index)


def round_bf16_casts() -> bool:
    """Make the interpreter's casts to and from bf16 what a GPU's are: it rounds fp32 -> bf16
    toward zero (a GPU, and torch, to nearest even: about twice the error of one rounding in every
    bf16 result), and casts fp64 -> bf16 as an integer (garbage). Each cast between bf16 and
    another float type that reaches the builder is done by torch instead. True when the
    interpreter has the builder method this replaces (triton 3.6-3.8 do), else it is left as it
    is. (An explicit fp_downcast_rounding takes another path, left as it is: no kernel uses one.)"""
    import numpy
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    cast = getattr(builder, "cast_impl", None)
    if cast is None:
        return False
    torch_float = {tl.bfloat16: torch.bfloat16, tl.float16: torch.float16, tl.float32: torch.float32,
                   tl.float64: torch.float64}

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if tl.bfloat16 not in (src_ty, dst_ty) or not (src_ty in torch_float and dst_ty in torch_float):
            return cast(self, src, dst_type)
        # bf16 values are held as their uint16 bit patterns. A copy: contiguous and writable,
        # as torch.from_numpy wants, with the shape kept (0-d included).
        data = numpy.array(src.data)
        t = (torch.from_numpy(data.view(numpy.int16)).view(torch.bfloat16) if src_ty == tl.bfloat16
             else torch.from_numpy(data))
        out = t.to(torch_float[dst_ty])
        out = out.view(torch.int16).numpy().view(numpy.uint16) if dst_ty == tl.bfloat16 else out.numpy()
        return interpreter.TensorHandle(out, dst_ty)

    builder.cast_impl = cast_impl
    return True


def serialize_launches() -> None:
    """Run one interpreted launch at a time. The interpreter is not thread-safe: launches from
    two threads at once (a server's, or autograd's backward thread beside the caller's) fail, or
    return wrong numbers, where a GPU runs them side by side."""
    from triton.runtime.interpreter import InterpretedFunction

    run, lock = InterpretedFunction.run, threading.Lock()

    def one_at_a_time(self, *args, **kwargs):
        with lock:
            return run(self, *args, **kwargs)

    InterpretedFunction.run = one_at_a_time


if INTERPRET:
    import numpy

    if (problem := interpreter_problem(triton.__version__, numpy.__version__)) is not None:
        warnings.warn(problem, stacklevel=2)
    if not round_bf16_casts():
        warnings.warn("Triton's interpreter has changed: its casts to bf16 round toward zero here, not to "
                      "nearest as on a GPU", stacklevel=2)
    serialize_launches()

# num_sms off the GPU: grids sized by SM count stay a few programs, so that interpreted tests stay quick.
_INTERPRETER_SMS = 4


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a small stand-in on CPU)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _cuda_properties(device).multi_processor_count


def triton_op(name: str, mutates_args=()):
    """Decorator making a function that launches Triton kernels an op torch.compile traces:
    torch.library.triton_op, whose graphs take in the launches themselves (through wrap_triton),
    so Inductor fuses around them and calls the kernels from its generated code. Interpreted
    kernels cannot be traced that way (torch.library.wrap_triton leaves them as they are), so
    under the interpreter the function becomes an opaque custom op instead, its fake (shape-only)
    implementation the function itself with the launches skipped: graphs then call it as one
    op, which runs the interpreter. That lets torch.compile's tracing, autograd and shapes of the
    ops be tested on CPU; what Inductor makes of the launches is left to a GPU.

    Eager calls on plain tensors skip the op's dispatch (see Op)."""
    def register(fn):
        if INTERPRET:
            op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
            op.register_fake(fn)
        else:
            op = torch.library.triton_op(name, mutates_args=mutates_args)(fn)
        return Op(op, fn)
    return register


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(args) -> bool:
    """Whether a call with `args` is plain eager work: not traced by torch.compile, no dispatch
    mode, torch.func transform or forward-mode level active (vmap's batched tensors and dual
    tensors are of type torch.Tensor too: the launch would take them for plain ones), every
    tensor a plain torch.Tensor or Parameter (no fake, functional or other subclass)."""
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and not torch._C._are_functorch_transforms_active() and forward_ad._current_level < 0
            and all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor)))


def first_order_only(op: str) -> None:
    """In a backward of kernels, which record no graph: refuse a second-order gradient
    (create_graph=True, under which autograd runs a backward with grad mode on) rather than give
    one without the op's part."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: the triton kernels' gradient has no gradient of its own: a second-order "
                           f"gradient (create_graph=True) needs the torch backend")


class Op:
    """A registered op (torch.library) and the function behind it. Called in plain eager work
    (_eager) it runs the function itself, through an autograd.Function holding the op's
    registered formula when a gradient is wanted: what the op's dispatch does there (its
    autograd wrapper, a redispatch, Dynamo's disable guard) is most of a call's host time
    otherwise. Anywhere else (torch.compile's tracing, fake or functional tensors, a dispatch
    mode) it is the op, so graphs see the op and its kernels."""

    def __init__(self, op, fn):
        self.op, self.fn = op, fn
        self.function = None  # the autograd.Function, once register_autograd has given a formula

    def register_autograd(self, backward, setup_context, differentiable_backward: bool = False) -> None:
        """The op's gradient formula, for the op and the eager path alike. Unless
        `differentiable_backward` (a backward made of ops that have gradients themselves), a
        second-order gradient is refused (first_order_only) rather than given without the op's part."""
        fn, name = self.fn, self.op._qualname

        def first_order_backward(ctx, *grads):
            first_order_only(name)
            return backward(ctx, *grads)
        formula = backward if differentiable_backward else first_order_backward
        self.op.register_autograd(formula, setup_context=setup_context)

        def forward(ctx, *args):
            out = _launch_directly(fn, args)
            setup_context(ctx, args, out)
            return out
        self.function = type(fn.__name__, (torch.autograd.Function,), dict(
            forward=staticmethod(forward), backward=staticmethod(formula)))

    def __call__(self, *args):
        if not _eager(args):
            return call_op(self.op, *args)
        if self.function is not None and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self.function.apply(*args)
        return _launch_directly(self.fn, args)


def call_op(op, *args):
    """The registered `op` on `args`. torch.library's autograd formulas take no part in torch.func's
    own differentiation nor in forward mode: a ValueError naming the op under torch.func's grad or
    jacrev (torch's error names neither the op nor a way out), and for a tensor with a forward-mode
    tangent (torch.func.jvp, forward_ad's dual tensors), whose tangent the op would drop (zeros
    under jvp). torch.func's vmap runs the op on each slice."""
    if forward_ad._current_level >= 0 and any(
            isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args):
        raise ValueError(f"{op._qualname}: forward-mode gradients (torch.func.jvp, torch.autograd.forward_ad) "
                         f"do not pass through the triton kernels: use the torch backend")
    try:
        return op(*args)
    except RuntimeError as e:
        # torch's refusal of an autograd.Function without its own setup_context; any other error passes
        if not (torch._C._are_functorch_transforms_active() and "functorch transforms" in str(e)):
            raise
        raise ValueError(f"{op._qualname}: torch.func's grad and jacrev cannot differentiate the triton kernels "
                         f"(vmap can): use the torch backend") from e


def only_first_output_differentiable(ctx, *others: torch.Tensor) -> None:
    """For a setup_context whose op returns one differentiable output and `others` (statistics,
    buffers kept for the backward): marks those as having no gradient, and keeps autograd from
    filling zero gradients of their size for the backward (a memset of attention's buffer of the
    turned q and k and v, d_qkv's size). The backward runs only when the first output has a
    gradient."""
    ctx.mark_non_differentiable(*others)
    ctx.set_materialize_grads(False)


class _Direct(threading.local):
    on = False  # whether this thread is inside direct_launches


_direct = _Direct()


class direct_launches:
    """Context in which wrap_triton's launches go straight to the kernels, as triton_op's own
    eager implementation runs them: through torch's tracing wrapper each launch would be a
    higher-order op, host time that short kernels cannot hide. A flag of this module's, per
    thread (autograd runs the backward in a thread of its own), that wrap_triton reads: torch's
    own switch (set_wrap_triton_enabled) is a generator context and torch.library.wrap_triton
    imports on every launch, some 2 us each on a CPU where a norm's forward takes 60."""

    def __enter__(self):
        self.outer, _direct.on = _direct.on, True

    def __exit__(self, *exc):
        _direct.on = self.outer


def _launch_directly(fn, args):
    with direct_launches():
        return fn(*args)


class _InterpretedLaunch:
    """An interpreted kernel as triton_op's functions launch it: run on real tensors, skipped
    when the function runs as the op's fake implementation (any argument a fake tensor)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if not any(is_fake(a) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)):
                self.kernel[grid](*args, **kwargs)
        return launch


def wrap_triton(kernel):
    """`kernel` as a triton_op launches it: through torch.library.wrap_triton, so torch.compile
    traces the launch. Launch sites call it by this bare name, `wrap_triton(_some_kernel)[grid]`:
    that is the pattern torch.library.triton_op looks for in an op's source (and the functions it
    calls) to list the op's kernels, whose sources torch's compile caches then key on, so that an
    edited kernel is not served from a stale cache. The JIT helpers below (tile, dropout_*) are
    imported and called by bare names too: Inductor compiles a kernel from its source and the
    functions and constants it calls under their bare names, without the modules they came from,
    so `runtime.tile(...)` in a kernel fails to compile under torch.compile (tests/inductor_source.py).

    The tensors a launch writes are whole buffers the op allocated, never views into one (a head
    range of d_qkv, a half of d_h, a row of statistics): the kernel takes the buffer and indexes
    the part it writes itself. torch.compile functionalizes the launches, and Inductor turns them
    back into writes in place only for whole buffers; for a view it clones the buffer before the
    launch and scatters the result back after it, copies of whole buffers every step
    (tests/inductor_graph.py finds none now, and found some six of d_qkv a layer before)."""
    if INTERPRET:
        return _InterpretedLaunch(kernel)
    return kernel if _direct.on else torch.library.wrap_triton(kernel)


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


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as a (rows, cols) matrix with unit column stride: a view when its leading dimensions
    collapse to one row stride (contiguous tensors, the halves of `h.chunk(2, -1)`), a contiguous
    copy for other layouts."""
    m = t.reshape(math.prod(t.shape[:-1]), t.shape[-1] if t.dim() else 1)
    return m if m.stride(-1) == 1 else m.contiguous()


def empty_heads(like: torch.Tensor, B: int, T: int, heads: int, D: int) -> torch.Tensor:
    """An uninitialised (B, T, heads, D) buffer in `like`'s dtype and on its device: one tensor's
    heads (its (B, heads, T, D) view then reads as a contiguous (B, T, heads*D), as the model's
    output projection reads attention's output), or several tensors' side by side (d_qkv).
    Kernels write such whole buffers, indexing the heads themselves (see wrap_triton)."""
    return torch.empty((B, T, heads, D), dtype=like.dtype, device=like.device)


def unit_stride_d(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dim (a head's D) is contiguous, any other strides being fine, else a
    contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def head_strides(buf: torch.Tensor) -> tuple[int, ...]:
    """The (b, h, t, d) strides of an empty_heads buffer: its heads as kernels index them (those of
    buf.transpose(1, 2), without making the view)."""
    b, t, h, d = buf.stride()
    return b, h, t, d


LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # log(x) = log2(x) * LN2


@triton.jit
def fp32(x):
    """A float argument as fp32. Eager launches pass Python floats as fp32, but torch.compile
    declares them fp64 when Inductor compiles a wrap_triton kernel, and fp64 would spread through
    the kernel's math (at a fraction of fp32's rate, and into tl.dot's fp32 accumulator, which
    fails to compile): each kernel casts its float arguments first (tests/sm_compile.py checks)."""
    return tl.cast(x, tl.float32)


@triton.jit
def tile(n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row indices (BLOCK_R,), column indices (BLOCK_C,) and the in-bounds mask (BLOCK_R, BLOCK_C)
    of this program's tile of an (n_rows, n_cols) matrix. The column tiles of one row band are
    consecutive programs, so neighbouring programs stream neighbouring memory. Rows come 1-D so
    that per-row values load once a row, not once an element, before they are broadcast."""
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(n_cols, BLOCK_C)
    # int64 before any row stride multiplies it: row * stride can pass 2^31.
    rows = (pid // n_col_tiles).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % n_col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    return rows, cols, (rows[:, None] < n_rows) & (cols[None, :] < n_cols)


class _Draws(threading.local):
    generator = None  # drawing_from's, in this thread


_draws = _Draws()


@contextlib.contextmanager
def drawing_from(generator: torch.Generator):
    """Dropout seeds drawn from `generator` inside, in this thread, not from torch's generator of
    the device: the self-check's own, which leaves torch's as they were, whatever other threads
    draw from them meanwhile."""
    outer, _draws.generator = _draws.generator, generator
    try:
        yield
    finally:
        _draws.generator = outer


def drawing_generator() -> torch.Generator | None:
    """drawing_from's generator in this thread; None outside it (torch's generator of the device)."""
    return _draws.generator


def dropout_seed_tensor(dropout_p: float, device: torch.device) -> torch.Tensor | None:
    """A call's dropout seed, drawn from torch's generator of `device` (so
    torch.manual_seed reproduces runs and activation checkpointing replays it), or drawing_from's,
    into a one-element int64 tensor the kernels read on the device: no host sync, no graph break
    under torch.compile. None without dropout."""
    return torch.randint(2**31, (1,), device=device, generator=_draws.generator) if dropout_p > 0 else None


@triton.jit
def dropout_seed(seed_ptr, DROPOUT: tl.constexpr):
    """The call's dropout seed, read on the device (no host sync); 0 when there is no dropout."""
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    return seed


# Dropout masks come from a keyed integer hash of each element's position, not from Philox: a
# Philox-4x32-10 call is some 50 integer instructions for its four draws, and attention's scores
# come out of the MMA in a layout where one draw serves one score (four neighbouring scores per
# call need a trip through shared memory to reach that layout). Compiled for sm90, a draw per
# score made attention's forward loop 7x the instructions it has without dropout. The hash
# below is some 15 instructions an element, and its row and column terms are computed once per
# row and column of a tile, not per element.

@triton.jit
def lowbias32(x):
    """C. Wellons' lowbias32 (nullprogram.com, "Prospecting for Hash Functions", 2018): a
    bijection of uint32 in which flipping any input bit flips each output bit with probability
    close to 1/2."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def dropout_key(seed_ptr, stream, DROPOUT: tl.constexpr):
    """The dropout key of one stream (attention: a batch and head) of the call whose seed is at
    seed_ptr: a hash of the seed and the stream's index; 0 without dropout."""
    key = dropout_seed(seed_ptr, DROPOUT)
    if DROPOUT:
        key = lowbias32(key.to(tl.uint32) ^ lowbias32(stream.to(tl.uint32)))
    return key


@triton.jit
def dropout_scale(key, row, col, keep_p):
    """0 for a dropped element, 1 / keep_p for a kept one (kept with probability keep_p), from a
    hash of the key (a seed, or dropout_key's) and the element's row and column, broadcast
    together: any tiling, and a backward that walks the elements in another order, regenerates
    the mask instead of storing it. The row and the column are hashed on their own shapes under
    two keys (one key would make the mask symmetric), then their sum once per element, and the
    32-bit draw is compared with keep_p * 2^32 as integers. Positions are taken modulo 2^32.

    keep_p = 1 - dropout_p comes from the launcher, computed in float64: in fp32 from dropout_p
    it would keep dropout_p's rounding, 1000.0129 for torch's 999.99994 at p = 0.999, and 1 / 0
    once p rounds to 1 (p >= 1 - 2^-25)."""
    key = key.to(tl.uint32)
    row_hash = lowbias32(key ^ row.to(tl.uint32))
    col_hash = lowbias32((key + 0x9E3779B9) ^ col.to(tl.uint32))
    # The largest fp32 below 2^32 keeps the threshold in uint32 (a keep_p that rounds to 1 keeps
    # all but 2^-24 of the elements).
    threshold = tl.minimum(keep_p * 4294967296.0, 4294967040.0).to(tl.uint32)
    # IEEE division (a GPU's fp32 `/` is approximate): the scale torch's dropout applies, to the bit.
    return tl.where(lowbias32(row_hash + col_hash) < threshold, tl.div_rn(1.0, keep_p), 0.0)


# Launch heuristics for a memory-bound elementwise kernel over tiles (`tile` above).
# TILE: elements per program. 4096 (8 KB per bf16 tensor) amortizes each program's index math
# and keeps many loads in flight per SM, while training shapes still give tens of thousands
# of programs to spread over the SMs.
_TILE = 4096
# MAX_BLOCK_C: widest tile. Wide rows are split into 1024-column tiles, so a row that is not a
# multiple of it (5632, 11008, 50257) wastes at most one partly masked tile per row band.
_MAX_BLOCK_C = 1024
# NUM_WARPS: 8 warps give each thread 16 elements per tensor (two 16-byte bf16 vector loads),
# leaving registers for a backward's handful of fp32 values per element.
_NUM_WARPS = 8


def launch_tiles(kernel, n_rows: int, n_cols: int, *args, **constexprs) -> None:
    """Launch an elementwise kernel, `wrap_triton(k)` of its caller, as
    `k(*args, n_rows, n_cols, BLOCK_R, BLOCK_C, **constexprs)` over the tiles of an (n_rows, n_cols)
    matrix, one program per tile."""
    block_c = min(next_power_of_2(n_cols), _MAX_BLOCK_C)
    block_r = _TILE // block_c
    grid = (cdiv(n_rows, block_r) * cdiv(n_cols, block_c),)
    kernel[grid](*args, n_rows, n_cols, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_NUM_WARPS, **constexprs)
