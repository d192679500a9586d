"""Every op at the shapes a model's training runs it at: its inputs, its passes, the work each
pass must do, and a check of any backend against the torch reference. One code path for all
ops, shared by the kernel profiles (bench/kernels.py), the per-issue benchmarks (bench/op_*.py,
through bench/backends.py) and the start-up self-check behind `kernels.choose`.

The work credited to a pass is the least any backend must do, the same for every backend so that
rates compare as times do: for memory-bound ops the bytes of each input read once and each output
written once (fwd+bwd: the forward's, then the backward's), leaving out what a backend may keep
or recompute as it likes (saved row statistics, its own scratch such as partial sums); for
attention the FLOPs of its matmuls. Gradients are taken of the op's own inputs, so a pass times
the op and not the autograd of the views around it (chunk's and split's concatenation of the
gradients, the same copy for every backend).

A backend passes the check when, for every output and gradient of every pass, its error against
the torch backend computed in float64 is at most FACTOR x the torch backend's own error in the
working dtype, plus a floor (half a unit roundoff of bf16 and fp16, 1e-6 in fp32:
kernels/accuracy.py, the rule the tests use). Ops run with the dropout of the model's config (the
norms' residual form and attention): backends draw different masks, so a backend is compared with
the reference given its own mask, read off a probe call under a fixed seed, and is seeded so
before every call.
"""
import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.flops import causal_attention_fwd_flops
from gpt.model import GPT, GPTConfig, rope_tables
from kernels import runtime
from kernels.accuracy import bound, rel_err
from kernels.checks import dtype_name
from kernels.rope import rope_torch

# AdamW hyperparameters of train.py's defaults, a late step, where bias correction is mild, but
# the learning rate: one whose update is of the order of the weights (0.02 here). At train.py's
# 6e-4 the update is a few bf16 units of a weight, inside the checks' rounding floor: a step that
# did nothing at all passed them.
ADAMW = dict(step=10, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


@dataclass(frozen=True)
class Shapes:
    """The sizes one training run gives its ops: the model's widths and a micro-batch."""

    config: GPTConfig
    batch_size: int
    seq_len: int | None = None  # None: the config's block_size
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        if not isinstance(self.dtype, torch.dtype):  # a name ("bfloat16") failed deep in a self-check
            raise ValueError(f"Shapes: dtype must be a torch.dtype such as torch.bfloat16, got {self.dtype!r}")

    @property
    def T(self) -> int:
        return self.seq_len or self.config.block_size

    def describe(self) -> str:
        c = self.config
        return (f"B={self.batch_size} T={self.T} C={c.n_embd} heads {c.n_head}/{c.n_kv_head} "
                f"{dtype_name(self.dtype)}" + (f" dropout {c.dropout:g}" if c.dropout else ""))

    def key(self) -> tuple:
        return dataclasses.astuple(self.config), self.batch_size, self.T, self.dtype

    def one_kv_group(self) -> "Shapes":
        """The same attention (head size, T, dtype, dropout, RoPE, query heads per key/value head:
        what its launch configurations depend on) with one key/value head and its group of query
        heads, a model width of theirs."""
        c = self.config
        group = c.n_head // c.n_kv_head
        config = dataclasses.replace(c, n_head=group, n_kv_head=1, n_embd=group * c.head_dim)
        return dataclasses.replace(self, config=config)

    def tiny(self) -> "Shapes":
        """The same kinds of layer (head size, grouped-query or not, norm, MLP) at a size the
        Triton interpreter runs in a fraction of a second: one layer, one query head (two
        sharing one key/value head if grouped), 16 tokens."""
        c = self.config
        n_head = 2 if c.n_kv_head < c.n_head else 1
        config = dataclasses.replace(c, n_layer=1, n_head=n_head, n_kv_head=1, n_embd=n_head * c.head_dim,
                                     mlp_hidden=64, vocab_size=64, block_size=16)
        return Shapes(config, batch_size=1, dtype=self.dtype)


@dataclass(frozen=True)
class Case:
    """One op at one set of shapes. `make` builds fresh inputs; `call(fn, inputs, pass_)` runs a
    pass with the implementation `fn` and returns what it produces (outputs, then gradients)."""

    op: str
    shape: str
    passes: tuple[str, ...]  # the last one is what a training step runs
    make: Callable[[], list[torch.Tensor]]
    call: Callable[[Callable, list[torch.Tensor], str], tuple[torch.Tensor, ...]]
    work: dict[str, float]  # pass -> minimum bytes moved, or FLOPs
    unit: str  # "GB/s" (work in bytes) or "TFLOPS" (work in FLOPs)
    dtype: torch.dtype
    # For ops that drop out: align(fn, reference, inputs) -> (fn, reference) comparable on these
    # inputs, fn drawing one mask at every call and the reference applying that mask.
    align: Callable | None = None

    def rate(self, pass_: str, ms: float) -> float:
        return self.work[pass_] / ms / (1e6 if self.unit == "GB/s" else 1e9)


def _outputs(ys, inputs: list[torch.Tensor], dys, pass_: str):
    """The forward's outputs `ys` (a tensor or a tuple), and for "fwd+bwd" the gradients of the
    op's inputs too, given `dys` at the outputs (autograd.grad, so nothing accumulates into .grad
    between timed runs)."""
    ys = (ys,) if isinstance(ys, torch.Tensor) else tuple(ys)
    if pass_ == "fwd":
        return ys
    return (*ys, *torch.autograd.grad(ys, inputs, dys))


# The cases' inputs are drawn as the dropout seeds are: from the self-check's own generator
# (runtime.drawing_from) during a check, else from torch's.
def _randn(*shape, device, dtype, scale=1.0, shift=0.0, grad=False) -> torch.Tensor:
    t = torch.randn(*shape, device=device, dtype=torch.float32, generator=runtime.drawing_generator())
    return (t * scale + shift).to(dtype).requires_grad_(grad)


def _randint(high: int, n: int, device) -> torch.Tensor:
    return torch.randint(0, high, (n,), device=device, generator=runtime.drawing_generator())


# Dropout masks differ between backends (and between calls): the check seeds the generator that
# draws the dropout's seed with this before every call of the backend it checks, so that all its
# calls draw one mask.
_CHECK_SEED = 1234


def _seeded(fn: Callable, device: torch.device) -> Callable:
    """fn, the generator its dropout seed comes from seeded before each call: the self-check's
    own, or else `device`'s alone, not every GPU's, as torch.manual_seed would."""
    generator = runtime.drawing_generator()
    if generator is None and device.type == "cuda":
        generator = torch.cuda.default_generators[device.index if device.index is not None
                                                  else torch.cuda.current_device()]
    elif generator is None:
        generator = torch.random.default_generator

    def seeded(*args, **kwargs):
        generator.manual_seed(_CHECK_SEED)
        return fn(*args, **kwargs)
    return seeded


def _one_mask(probe: Callable[[], torch.Tensor]) -> torch.Tensor:
    """probe(): a seeded backend's output that shows its dropout mask, found the same at a second
    call, or a ValueError saying why the check cannot replay it."""
    shown = probe()
    if not torch.equal(shown, probe()):
        raise ValueError("its dropout mask differs between two calls from the same seed: a backend that drops "
                         "out takes its seed from kernels.runtime.dropout_seed_tensor, which the check seeds")
    return shown


def _norm(op: str, s: Shapes, device, residual: bool, autocast: bool = False) -> Case:
    """The norm, or with `residual` its pre-norm form: (y, dropout(x) + residual) from x and the
    residual stream, the gradient arriving at both outputs; the dropout is the config's. With
    `autocast`, as a model of fp32 weights calls it under autocast: the weights and the residual
    stream fp32 (and x where it is the stream: the plain form), y in the shapes' dtype."""
    c, M = s.config, s.batch_size * s.T
    with_bias = op == "layer_norm" and c.bias
    n_grads = 2 if residual else 1
    p = c.dropout if residual else 0.0
    wide = torch.float32 if autocast else s.dtype  # the weights' and the stream's dtype
    x_dtype = s.dtype if residual else wide

    def make():
        weights = [_randn(c.n_embd, device=device, dtype=wide, scale=0.1, shift=1.0, grad=True)]
        if with_bias:
            weights.append(_randn(c.n_embd, device=device, dtype=wide, scale=0.1, grad=True))
        stream = [_randn(M, c.n_embd, device=device, dtype=wide, scale=3.0, grad=True)] if residual else []
        grads = [_randn(M, c.n_embd, device=device, dtype=dtype) for dtype in (s.dtype, wide)[:n_grads]]
        return [_randn(M, c.n_embd, device=device, dtype=x_dtype, grad=True), *stream, *weights, *grads]

    def call(fn, inputs, pass_):
        x, *rest = inputs
        stream = rest[:1] if residual else []
        weights, dys = rest[len(stream):-n_grads], rest[-n_grads:]
        args = (x, weights[0], weights[1] if with_bias else None) if op == "layer_norm" else (x, weights[0])
        options = dict(residual=stream[0], dropout_p=p) if residual else {}
        if autocast:
            options["out_dtype"] = dys[0].dtype
        return _outputs(fn(*args, c.norm_eps, **options), [x, *stream, *weights], dys, pass_)

    def align(fn, reference, inputs):
        """fn seeded, and the reference dropping x out with fn's mask: the elements of the sum fn
        returns for x = 1 and a zero residual that are not 0, scaled by 1 / (1 - p)."""
        fn = _seeded(fn, inputs[0].device)
        probe = _copies(inputs)
        probe[0], probe[1] = (torch.full_like(t, v).requires_grad_() for t, v in zip(probe[:2], (1.0, 0.0)))
        scale = (_one_mask(lambda: call(fn, probe, "fwd")[1].detach()) != 0).float() / (1 - p)

        def masked(x, *args, residual, dropout_p, **options):
            return reference(x * scale.to(x.dtype), *args, residual=residual, **options)
        return fn, masked

    xb, yb, sb = (M * c.n_embd * dtype.itemsize for dtype in (x_dtype, s.dtype, wide))
    param, n_params = c.n_embd * wide.itemsize, 2 if with_bias else 1
    # Forward reads x (and the residual) and the weight (and bias) and writes y (and the sum);
    # backward reads x (the sum), the weight and dy (and the sum's gradient) and writes dx and the
    # weight's (and bias's) gradient. The residual's gradient is dx's tensor too, unless dropout
    # scales dx or their dtypes differ: a second tensor written.
    fwd = xb + yb + 2 * sb * residual + n_params * param
    dr = sb if residual and (p or x_dtype != wide) else 0
    bwd = (sb if residual else xb) + yb + xb + (sb if residual else 0) + dr + param + n_params * param
    shape = (f"{M}x{c.n_embd}" + (" +bias" if with_bias else "") + (" +residual" if residual else "")
             + (f" +dropout {p:g}" if p else "") + (" fp32 weights+stream" if autocast else ""))
    return Case(op, shape, ("fwd", "fwd+bwd"), make, call, {"fwd": fwd, "fwd+bwd": fwd + bwd}, "GB/s", s.dtype,
                align if p else None)


def check_cases(op: str, shapes: Shapes, device) -> list[Case]:
    """The cases a self-check of `op` runs: the calls a model makes of it, with every tensor in
    the shapes' dtype (pure bf16 training) and, for a 16-bit dtype, as a model of fp32 weights
    calls it under autocast: a norm with fp32 weights (and stream), the loss with the lm head's
    fp32 weight, the gradient norm over fp32 grads. A norm both plain (a model's first, or a
    post-norm block's) and with the residual add and its dropout."""
    autocast = shapes.dtype != torch.float32
    if op in ("rms_norm", "layer_norm"):
        return [_norm(op, shapes, device, residual, fp32) for fp32 in {False, autocast} for residual in (False, True)]
    cases = [case(op, shapes, device, quick=True)]
    if autocast and op == "linear_cross_entropy":
        cases.append(_linear_cross_entropy(shapes, device, quick=True, autocast=True))
    if autocast and op == "grad_norm":
        cases.append(_grad_norm(shapes, device, distinct=True, dtype=torch.float32))
    return cases


def swiglu_hidden(config: GPTConfig) -> int:
    """The SwiGLU width of the model, or of its SwiGLU variant when it has a plain MLP."""
    if config.mlp == "swiglu":
        return config.mlp_hidden
    return dataclasses.replace(config, mlp="swiglu", mlp_hidden=None).mlp_hidden


def _swiglu(s: Shapes, device) -> Case:
    M, hidden = s.batch_size * s.T, swiglu_hidden(s.config)

    def make():  # one projection's output, split in halves as the model does
        return [_randn(M, 2 * hidden, device=device, dtype=s.dtype, grad=True),
                _randn(M, hidden, device=device, dtype=s.dtype)]

    def call(fn, inputs, pass_):
        h, dy = inputs
        gate, up = h.chunk(2, dim=-1)
        return _outputs(fn(gate, up), [gate, up], dy, pass_)

    size = M * hidden * s.dtype.itemsize
    # Forward reads gate and up and writes y; backward reads gate, up and dy, writes both grads.
    return Case("swiglu", f"{M}x{hidden}", ("fwd", "fwd+bwd"), make, call,
                {"fwd": 3 * size, "fwd+bwd": 8 * size}, "GB/s", s.dtype)


def _rope(s: Shapes, device) -> Case:
    c, B, T = s.config, s.batch_size, s.T
    H, Hkv, D = c.n_head, c.n_kv_head, c.head_dim

    def make():  # q and k as the model has them: views of one qkv projection
        cos, sin = rope_tables(D, T, c.rope_theta, device)
        return [_randn(B, T, (H + 2 * Hkv) * D, device=device, dtype=s.dtype, grad=True),
                _randn(B, H, T, D, device=device, dtype=s.dtype), _randn(B, Hkv, T, D, device=device, dtype=s.dtype),
                cos, sin]

    def call(fn, inputs, pass_):
        qkv, dq, dk, cos, sin = inputs
        q, k, _v = qkv.split([H * D, Hkv * D, Hkv * D], dim=2)
        q, k = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k))
        return _outputs((fn(q, cos, sin), fn(k, cos, sin)), [q, k], (dq, dk), pass_)

    size = B * T * (H + Hkv) * D * s.dtype.itemsize
    tables = 2 * T * (D // 2) * 4
    # Forward reads q, k and the fp32 cos and sin tables and writes the rotated q and k (two
    # calls); backward reads their gradients and the tables and writes q's and k's.
    return Case("rope", f"B={B} T={T} H={H}/{Hkv} D={D}", ("fwd", "fwd+bwd"), make, call,
                {"fwd": 2 * size + 2 * tables, "fwd+bwd": 4 * size + 4 * tables}, "GB/s", s.dtype)


def dropped_attention(q, k, v, causal: bool, scale: torch.Tensor, rope=None) -> torch.Tensor:
    """Causal or full attention with the attention weights multiplied by `scale` (B, H, T, T), the
    dropout's 0 or 1 / (1 - p), as a careful torch user writes it (nanoGPT's manual path under
    autocast): matmuls in the inputs' dtype, the softmax in at least fp32; q and k turned by the
    `rope` tables first if given."""
    if rope is not None:
        q, k = rope_torch(q, *rope), rope_torch(k, *rope)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[2]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (scores.softmax(-1) * scale.to(scores.dtype)).to(v.dtype) @ v


def _attention(s: Shapes, device) -> Case:
    c, B, T = s.config, s.batch_size, s.T
    H, Hkv, D = c.n_head, c.n_kv_head, c.head_dim
    p = c.dropout

    rope = c.pos_encoding == "rope"  # the model's attention turns q and k first

    def make():  # q, k and v as the model has them: views of one qkv projection
        return [_randn(B, T, (H + 2 * Hkv) * D, device=device, dtype=s.dtype, grad=True),
                _randn(B, H, T, D, device=device, dtype=s.dtype),
                *(rope_tables(D, T, c.rope_theta, device) if rope else ())]

    def call(fn, inputs, pass_):
        qkv, dy, *tables = inputs
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=2)
        q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
        return _outputs(fn(q, k, v, causal=True, dropout_p=p, rope=tables or None), [q, k, v], dy, pass_)

    def align(fn, _reference, inputs):
        """fn seeded, and attention's formula dropping out with fn's mask (dropped_attention).
        The mask is read off fn's outputs for v set to one-hot rows of D keys at a time: output
        column i of a query is its weight of key j0 + i, kept or not; every weight of a visible
        key is positive."""
        qkv, dy = inputs[:2]
        fn = _seeded(fn, qkv.device)
        scale = torch.zeros(B, H, T, T, device=qkv.device)
        cols = torch.arange(D, device=qkv.device)
        for j0 in range(0, T, D):
            w = min(D, T - j0)
            probe = qkv.detach().clone()
            v = probe[..., (H + Hkv) * D:].view(B, T, Hkv, D)
            v.zero_()
            v[:, j0 + cols[:w], :, cols[:w]] = 1
            out = _one_mask(lambda: call(fn, [probe.requires_grad_(), dy], "fwd")[0].detach())
            scale[..., j0:j0 + w] = (out[..., :w] != 0).float() / (1 - p)
        return fn, lambda q, k, v, causal, dropout_p, rope: dropped_attention(q, k, v, causal, scale, rope)

    fwd = causal_attention_fwd_flops(B, H, T, D)
    return Case("attention", f"B={B} H={H}/{Hkv} T={T} D={D} causal" + (" rope" if rope else "")
                + (f" dropout {p:g}" if p else ""),
                ("fwd", "fwd+bwd"), make, call, {"fwd": fwd, "fwd+bwd": 3.5 * fwd}, "TFLOPS", s.dtype,
                align if p else None)


def _cross_entropy(s: Shapes, device, quick: bool) -> Case:
    M, V = s.batch_size * s.T, s.config.vocab_size
    if quick:  # checked on fewer rows: logits in float64 (and torch's copies of them) run to GBs
        M = min(M, 2048)

    def make():  # logits of the lm head's size and spread, one target per token
        return [_randn(M, V, device=device, dtype=s.dtype, scale=2.0, grad=True),
                _randint(V, M, device), torch.ones((), device=device)]

    def call(fn, inputs, pass_):
        logits, targets, dloss = inputs
        return _outputs(fn(logits, targets), [logits], dloss, pass_)

    size = M * V * s.dtype.itemsize
    # Forward reads the logits and the targets; backward reads them again and writes the logits'
    # gradient. (The loss and the per-row statistics are a few bytes a row.)
    fwd = size + M * 8
    return Case("cross_entropy", f"{M}x{V}", ("fwd", "fwd+bwd"), make, call,
                {"fwd": fwd, "fwd+bwd": 2 * fwd + size}, "GB/s", s.dtype)


def _linear_cross_entropy(s: Shapes, device, quick: bool, autocast: bool = False) -> Case:
    """The loss of the final norm's output through the lm head; with `autocast`, as a model of
    fp32 weights calls it: the weight fp32, under autocast to the shapes' dtype."""
    M, V, C = s.batch_size * s.T, s.config.vocab_size, s.config.n_embd
    if quick:  # as cross_entropy's: the float64 reference's logits run to GBs
        M = min(M, 2048)

    def make():  # the final norm's output, the lm head's weight, one target per token
        return [_randn(M, C, device=device, dtype=s.dtype, grad=True),
                _randn(V, C, device=device, dtype=torch.float32 if autocast else s.dtype, scale=0.02, grad=True),
                _randint(V, M, device), torch.ones((), device=device)]

    def call(fn, inputs, pass_):
        x, weight, targets, dloss = inputs
        with torch.autocast(torch.device(device).type, s.dtype) if autocast else contextlib.nullcontext():
            return _outputs(fn(x, weight, targets), [x, weight], dloss, pass_)

    # One pass: the triton backend takes the gradients in its forward. The matmuls' FLOPs: the
    # logits, then d_x and d_weight from their gradient.
    return Case("linear_cross_entropy", f"{M}x{C}x{V}" + (" fp32 weight, autocast" if autocast else ""),
                ("fwd+bwd",), make, call, {"fwd+bwd": 6 * M * C * V}, "TFLOPS", s.dtype)


def param_shapes(config: GPTConfig) -> list[torch.Size]:
    """The model's parameter shapes, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        return [p.shape for p in GPT(config).parameters()]


def _optimizer_shapes(config: GPTConfig, distinct: bool) -> list[torch.Size]:
    shapes = param_shapes(config)
    if distinct:  # one tensor of each shape: every code path (sizes, tails) at a fraction of the cost
        shapes = list(dict.fromkeys(shapes))
    return shapes


def _adamw(s: Shapes, device, distinct: bool, stochastic_rounding: bool | None) -> Case:
    shapes = _optimizer_shapes(s.config, distinct)
    n = len(shapes)
    # Pure bf16 training rounds stochastically, as BF16AdamW does by default.
    if stochastic_rounding is None:
        stochastic_rounding = s.dtype == torch.bfloat16
    rounding = dict(stochastic_rounding=stochastic_rounding, seed=1)

    def make():
        kw = dict(device=device, dtype=s.dtype)
        return ([_randn(*sh, **kw, scale=0.02) for sh in shapes] + [_randn(*sh, **kw, scale=1e-3) for sh in shapes]
                + [_randn(*sh, **kw, scale=1e-4) for sh in shapes]
                + [(torch.rand(*sh, device=device, generator=runtime.drawing_generator()) * 1e-6).to(s.dtype)
                   for sh in shapes])

    def call(fn, inputs, pass_):
        p, g, m, v = (inputs[i * n:(i + 1) * n] for i in range(4))
        fn(p, g, m, v, **ADAMW, **rounding)
        return (*p, *m, *v)

    numel = sum(torch.Size(sh).numel() for sh in shapes)
    # Reads p, g, m, v and writes p, m, v.
    return Case("adamw", f"{n} tensors, {numel / 1e6:.3g}M params", ("step",), make, call,
                {"step": 7 * numel * s.dtype.itemsize}, "GB/s", s.dtype)


def _grad_norm(s: Shapes, device, distinct: bool, dtype: torch.dtype | None = None) -> Case:
    """The norm of the model's grads, in the shapes' dtype or `dtype` (fp32 master weights')."""
    shapes, dtype = _optimizer_shapes(s.config, distinct), dtype or s.dtype

    def make():
        return [_randn(*sh, device=device, dtype=dtype, scale=1e-3) for sh in shapes]

    def call(fn, inputs, pass_):
        return (fn(inputs),)

    numel = sum(torch.Size(sh).numel() for sh in shapes)
    # Reads every grad once.
    return Case("grad_norm", f"{len(shapes)} tensors, {numel / 1e6:.3g}M params" + (
        f" {dtype_name(dtype)}" if dtype != s.dtype else ""), ("step",), make, call,
        {"step": numel * dtype.itemsize}, "GB/s", dtype)


def case(op: str, shapes: Shapes, device, quick: bool = False, residual: bool | None = None,
         stochastic_rounding: bool | None = None) -> Case:
    """`op` at `shapes` on `device`; `quick` keeps one tensor per parameter shape for the
    optimizer's ops, and at most 2048 rows of logits for the cross-entropies. A norm is run with the
    residual add fused in when `residual`; None: as the model runs most of its norms (fused in
    pre-norm models, whose every norm but the first adds the residual). The norms' residual form
    and attention drop out as the config says (its `dropout`), as in training. AdamW's stores round
    stochastically when `stochastic_rounding`; None: as BF16AdamW's default (bf16 only)."""
    if op in ("rms_norm", "layer_norm"):
        if residual is None:
            residual = shapes.config.norm_position == "pre"
        return _norm(op, shapes, device, residual)
    if op == "swiglu":
        return _swiglu(shapes, device)
    if op == "rope":
        return _rope(shapes, device)
    if op == "attention":
        return _attention(shapes, device)
    if op == "cross_entropy":
        return _cross_entropy(shapes, device, quick)
    if op == "linear_cross_entropy":
        return _linear_cross_entropy(shapes, device, quick)
    if op == "adamw":
        return _adamw(shapes, device, distinct=quick, stochastic_rounding=stochastic_rounding)
    if op == "grad_norm":
        return _grad_norm(shapes, device, distinct=quick)
    raise ValueError(f"no benchmark case for op {op!r}")


def _copies(inputs: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Fresh copies of `inputs`, the floating-point ones in `dtype` (integer targets stay as they are)."""
    return [t.detach().to(dtype if dtype and t.is_floating_point() else t.dtype).clone()
            .requires_grad_(t.requires_grad) for t in inputs]


def check(c: Case, fn: Callable, reference: Callable) -> tuple[bool, str]:
    """Whether `fn` is as accurate as `reference` (the torch backend) on every pass of `c`, and
    the worst margin or the first failure in words. An exception is a failure, not a crash."""
    try:
        failure, worst = margin(c, fn, reference)
    except torch.OutOfMemoryError as e:
        return False, out_of_memory(e)
    return failure is None, failure or f"error at most {worst:.0%} of the bound"


def out_of_memory(e: torch.OutOfMemoryError) -> str:
    """A check's failure for running out of memory, on one line (torch's message runs to several:
    a profile's table cell, a start-up warning)."""
    return f"out of memory ({str(e).splitlines()[0]})"


def margin(c: Case, fn: Callable, reference: Callable) -> tuple[str | None, float]:
    """check's findings: the first failure in words (None if none), and the worst error found as
    a fraction of its bound. Running out of memory is raised, not found: it says nothing of the
    backend, and the same check may pass once memory is freed."""
    worst = 0.0
    try:
        inputs = c.make()
        if c.align is not None:
            fn, reference = c.align(fn, reference, inputs)
        for pass_ in c.passes:
            outs = c.call(fn, _copies(inputs), pass_)
            bases = c.call(reference, _copies(inputs), pass_)
            refs = c.call(reference, _copies(inputs, torch.float64), pass_)
            for i, (out, base, ref) in enumerate(zip(outs, bases, refs, strict=True)):
                err, limit = rel_err(out, ref), bound(rel_err(base, ref), c.dtype)
                if not err <= limit:
                    return f"{pass_} result {i}: error {err:.2e} > bound {limit:.2e}", worst
                worst = max(worst, err / limit)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # a refused shape or dtype, a compile failure: the backend fails here
        return f"{type(e).__name__}: {e}", worst
    return None, worst
