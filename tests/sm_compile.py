"""Compile every Triton kernel for a GPU without one: `python -m tests.sm_compile --arch 9`.

Each op's triton backend runs forward and backward (the optimizers: a step) on CPU tensors at the
shapes training gives it, with Triton's driver replaced by a compile-only stand-in for sm_<arch>:
every launch compiles (Triton IR -> PTX -> cubin, with the ptxas Triton ships) with the launch
configuration that GPU would get, and runs nothing; float arguments are declared fp64, as
torch.compile declares them (InductorSignature). Per kernel it prints the constexprs, warps,
stages, shared memory, registers and local memory (spills and stack), and it fails when a kernel
does not compile or would not launch (shared memory or registers past the GPU's limits), when a
memory-bound kernel moves no 16-byte vectors, or when attention's 16-bit matmuls miss the GPU's
tensor-core instruction (wgmma on sm90, tcgen05.mma on sm100, mma.sync on sm80 and sm120), or
when a kernel computes in fp64, updates memory atomically or takes a flush-to-zero reciprocal
square root: errors, races and slow paths that Triton's CPU interpreter cannot show.
The outputs are never computed, so the backward reads garbage; only what is launched matters.
tests/test_sm_compile.py runs it for each GPU generation, and `--steps` (recompiled_by_later_steps)
and `--suite` once.
"""
import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the kernels are defined as compiled JIT functions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import kernels  # noqa: E402
from bench import described  # noqa: E402
from bench.cases import Case, Shapes, case  # noqa: E402
from gpt.model import GPT, GPTConfig, model_ops, preset  # noqa: E402
from gpt.optim import BF16AdamW, clip_for_step, derived_seed  # noqa: E402
from kernels import attention, runtime  # noqa: E402

# Per compute-capability major: (sm, shared memory a block may take, SMs), from CUDA's tables
# (the opt-in maximum per block) and one representative card. Major 8's tables serve sm86 and
# sm89 (RTX 30xx/40xx, A10, L4, L40S) as well as the A100's sm80: their 99 KB, not its 163 KB.
GPUS = {8: (80, 99 * 1024, 108), 9: (90, 227 * 1024, 132), 10: (100, 227 * 1024, 148),
        12: (120, 99 * 1024, 84)}
# The tensor-core instruction Triton's 16-bit tl.dot becomes per compute-capability major.
MMA = {8: "mma.sync", 9: "wgmma.mma_async", 10: "tcgen05.mma", 12: "mma.sync"}
REGISTERS_PER_SM = 65536


class CompileOnlyDriver:
    """What JITFunction.run asks of Triton's active driver before it launches."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def compile_only(compiled: list) -> None:
    """JITFunction.run compiles and returns at its `warmup` exit: nothing launches."""
    run = JITFunction.run

    def warmup_run(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = warmup_run


class InductorSignature(triton.compiler.ASTSource):
    """A kernel source whose float arguments are declared fp64, as torch.compile declares them
    when Inductor compiles a wrap_triton kernel itself (eager launches pass them as fp32)."""

    def __init__(self, fn, signature, constexprs=None, attrs=None):
        signature = {name: "fp64" if ty == "fp32" else ty for name, ty in signature.items()}
        super().__init__(fn, signature, constexprs, attrs)


def pretend_gpu(arch: int) -> list:
    """Make this process launch the triton backends as on an sm_<arch> GPU, from CPU tensors: each
    launch compiles for that GPU with the configuration it would get there, runs nothing, and
    appends (kernel name, compiled kernel) to the list returned."""
    sm, _, sms = GPUS[arch]
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", sm, 32)))
    triton.compiler.ASTSource = InductorSignature  # what the JIT compiles from (read at first launch)
    compiled: list = []
    compile_only(compiled)
    runtime.CPU_TENSORS = True
    runtime.capability = lambda device: (arch, 0)
    runtime.num_sms = lambda device: sms
    return compiled


def global_accesses(kernel) -> tuple[int, int]:
    """(16-byte vector, 2-byte scalar) global loads and stores in a kernel's PTX: a streaming
    kernel moves its bf16 data in 16-byte vectors where the compiler can prove alignment and
    whole vectors, else one element at a time, with several times the instructions."""
    ptx = kernel.asm["ptx"]
    wide = len(re.findall(r"\b(?:ld|st)\.global[\w:.]*\.(?:v4\.b32|v2\.b64)\b", ptx))
    narrow = len(re.findall(r"\b(?:ld|st)\.global(?:\.(?!v\d)[\w:]+)*\.b16\b", ptx))
    return wide, narrow


def resources(kernel) -> dict:
    """Registers and local memory per thread of a compiled kernel, from cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return {key.lower(): int(value) for key, value in usage.items()}


# The models whose training shapes are compiled: GPT-2 and LLaMA small (layer_norm and rms_norm,
# gelu and swiglu, learned and rotary positions, D = 64), and a LLaMA-like one with D = 128,
# grouped-query heads and GPT-2's unpadded vocabulary (a row stride that is no multiple of 16).
CONFIGS = {"gpt2": GPTConfig(**preset("gpt2")), "llama": GPTConfig(**preset("llama")),
           "llama D=128 GQA 16/4": GPTConfig(**preset("llama") | dict(n_embd=2048, n_head=16, n_kv_head=4,
                                                                       vocab_size=50257))}


def _non_causal(q, k, v, causal, dropout_p, rope):
    """The attention op as bench.cases calls it, but without the causal mask."""
    return kernels.get("attention", "triton")(q, k, v, causal=False, dropout_p=dropout_p, rope=rope)


def _attention_with_tma(q, k, v, causal, dropout_p, rope):
    """Each pass launched with its configuration's TMA twin, as bench/tune_attention.py does
    (without dropout or rope)."""
    cfgs = {which: attention._config(q, which)._replace(tma=True) for which in ("fwd", "dkdv", "dq")}
    o, lse = attention._launch_fwd(q, k, v, causal, 0.0, None, cfgs["fwd"])
    attention._launch_bwd(o, q, k, v, o, lse, causal, 0.0, None, cfgs["fwd"], cfgs["dkdv"], cfgs["dq"])
    return o


def _adamw_clipped_then_kahan(params, grads, exp_avgs, exp_avg_sqs, **options):
    """The adamw op as BF16AdamW runs it with gradient clipping (grads scaled as they are read,
    the default grad_clip=1.0), then also with Kahan-compensated params (kahan_summation=True)."""
    adamw = kernels.get("adamw", "triton")
    scale = torch.ones(1, device=params[0].device)
    adamw(params, grads, exp_avgs, exp_avg_sqs, **options, grad_scale=scale)
    adamw(params, grads, exp_avgs, exp_avg_sqs, **options, grad_scale=scale,
          compensations=[torch.zeros_like(p) for p in params])


def _run(c: Case, fn, pass_: str | None = None):
    """A thunk running `fn` through case `c`'s pass (by default the training step's)."""
    return lambda: c.call(fn, c.make(), pass_ or c.passes[-1])


# The memory-bound ops: at widths of whole 16-byte vectors each of their kernels must move data in
# them (but the grad norm's last one, which sums a few per-block partials).
STREAMING = {"rms_norm", "layer_norm", "swiglu", "rope", "cross_entropy", "adamw", "grad_norm"}
SMALL_KERNELS = {"_sqrt_of_sum_kernel"}
# Attention's kernels whose work is tl.dot (the backward's preprocess is a row sum).
MATMUL_KERNELS = {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"}


def workloads(arch: int):
    """(label, thunk, kind) of every launch to compile: each config's ops (optimizer included) in
    bf16 at 64 tokens (launch configurations depend on widths, dtypes and strides, not on rows),
    then attention's other paths. `kind`: "streams" for the memory-bound ops, "mma" where the
    matmuls must run on the tensor cores (16-bit attention), else None (fp32 checks fp32)."""
    for name, config in CONFIGS.items():
        shapes = Shapes(config, batch_size=1, seq_len=64)
        # Training's ops, generation's (rope: training's attention launches the same kernel), the
        # optimizer's, and cross_entropy (the loss of a forward that returns its logits).
        ops = model_ops(config) | model_ops(config, generation=True) | {"adamw", "grad_norm", "cross_entropy"}
        for op in sorted(ops):
            kind = "streams" if op in STREAMING else "mma" if op == "attention" else None
            yield f"{name}: {op}", _run(case(op, shapes, "cpu", quick=True), kernels.get(op, "triton")), kind
    gpt2 = Shapes(CONFIGS["gpt2"], batch_size=1, seq_len=64)
    yield "gpt2: adamw clipped, and Kahan", _run(case("adamw", gpt2, "cpu", quick=True), _adamw_clipped_then_kahan), \
        "streams"
    yield "gpt2: layer_norm without the residual", _run(case("layer_norm", gpt2, "cpu", residual=False),
                                                        kernels.get("layer_norm", "triton")), "streams"
    dropped = {name: Shapes(dataclasses.replace(config, dropout=0.1), batch_size=1, seq_len=64)
               for name, config in CONFIGS.items()}  # the mask's hashing takes registers
    for name, op in (("gpt2", "layer_norm"), ("llama", "rms_norm")):
        yield f"{name}: {op} with dropout", _run(case(op, dropped[name], "cpu"), kernels.get(op, "triton")), "streams"
    for name in ("gpt2", "llama D=128 GQA 16/4"):
        c = case("attention", Shapes(CONFIGS[name], batch_size=1, seq_len=64), "cpu")
        # past SHORT_T: the configurations of longer sequences (64 tokens take the short-T table's)
        long = case("attention", Shapes(CONFIGS[name], batch_size=1, seq_len=attention.SHORT_T + 1), "cpu")
        yield f"{name}: attention at T = {attention.SHORT_T + 1}", _run(long, kernels.get("attention", "triton")), "mma"
        yield f"{name}: attention, non-causal", _run(c, _non_causal), "mma"
        yield f"{name}: attention, dropout", _run(case("attention", dropped[name], "cpu"),
                                                  kernels.get("attention", "triton")), "mma"
        long_dropped = case("attention", dataclasses.replace(dropped[name], seq_len=attention.SHORT_T + 1), "cpu")
        yield f"{name}: attention, dropout at T = {attention.SHORT_T + 1}", \
            _run(long_dropped, kernels.get("attention", "triton")), "mma"
        if arch >= 9:  # the tuner's TMA twins, launched one pass at a time
            yield f"{name}: attention, TMA", _run(c, _attention_with_tma, "fwd"), "mma"
    for dtype in (torch.float16, torch.float32):  # fp16 where there is no bf16; fp32 checks the others
        shapes = Shapes(GPTConfig(n_embd=384, n_head=4), batch_size=1, seq_len=64, dtype=dtype)  # D = 96
        kind = "mma" if dtype == torch.float16 else None
        c = case("attention", shapes, "cpu")
        yield f"D=96 {dtype}: attention", _run(c, kernels.get("attention", "triton")), kind


def _instruction(pattern: str) -> re.Pattern:
    """A PTX line whose instruction matches `pattern`, predicated (@%p1, @!%p1) or not."""
    return re.compile(r"^\s*(?:@!?%p\d+\s+)?" + pattern, re.MULTILINE)


# An fp64 instruction other than reading a float argument or converting it: Inductor passes floats
# as fp64, and fp64 math runs at a fraction of fp32's rate (and changes the kernel's numerics).
FP64_MATH = _instruction(r"(?!ld\.param|cvt\.)[a-z]+(?:\.\w+)*\.f64\b")


# An atomic read-modify-write of memory: sums it makes come out in the order the programs happen to
# run, which the interpreter (programs one after another) cannot show; gradients must be bit-identical.
# (cp.reduce.async.bulk: a TMA descriptor's atomic_add, a reduction into global memory too.)
ATOMICS = _instruction(r"(?:atom|red|cp\.reduce\.async\.bulk)\.")


# A flush-to-zero reciprocal square root: a subnormal argument (a statistic of tiny values) becomes
# 0, and its reciprocal root inf, where torch's is finite.
RSQRT_FTZ = _instruction(r"rsqrt\.approx\.ftz\.")


def check(kernel, name: str, kind: str | None, arch: int) -> tuple[str, list[str]]:
    """A compiled kernel's line of the report, and what is wrong with it."""
    sm, max_shared, _ = GPUS[arch]
    meta, use = kernel.metadata, resources(kernel)
    wide, narrow = global_accesses(kernel)
    line = (f"{name} warps={meta.num_warps} stages={meta.num_stages} shared={meta.shared} regs={use['reg']} "
            f"local={use['local']} stack={use['stack']} 16B/2B accesses={wide}/{narrow}")
    problems = []
    if meta.shared > max_shared:
        problems.append(f"{name} takes {meta.shared} bytes of shared memory, more than a block gets on some card "
                        f"taking sm_{sm}'s tables (the least: {max_shared})")
    if use["reg"] * meta.num_warps * 32 > REGISTERS_PER_SM:
        problems.append(f"{name} needs {use['reg'] * meta.num_warps * 32} registers a block, an SM has "
                        f"{REGISTERS_PER_SM}")
    if kind == "streams" and name not in SMALL_KERNELS and not wide:
        problems.append(f"{name} moves no 16-byte vectors ({narrow} 2-byte accesses)")
    if FP64_MATH.search(kernel.asm["ptx"]):
        problems.append(f"{name} computes in fp64 with fp64 float arguments: cast them to fp32 first")
    if RSQRT_FTZ.search(kernel.asm["ptx"]):
        problems.append(f"{name} takes rsqrt.approx.ftz, which flushes a subnormal argument to 0: "
                        f"use div_rn(1, sqrt_rn(x))")
    if ATOMICS.search(kernel.asm["ptx"]):
        problems.append(f"{name} updates memory atomically: its sums would change from run to run")
    if kind == "mma" and name in MATMUL_KERNELS and MMA[arch] not in kernel.asm["ptx"]:
        problems.append(f"{name} has no {MMA[arch]}: its matmuls miss the tensor cores")
    return line, problems


def exit_status(problems: list[str]) -> int:
    """Print each problem found; the process's exit status: 1 if there are any."""
    for p in problems:
        print("PROBLEM", p)
    return 1 if problems else 0


def suite_problems(arch: int, compiled: list, paths: list[str]) -> list[str]:
    """What is wrong with the launches the tests in `paths` (the whole suite when empty) make,
    compiled for sm_<arch> (pretend_gpu has made `compiled`): far more shapes, dtypes and options
    than the workloads, each kernel checked as check() checks, and a launch that does not compile.
    Some minutes for the suite. The tests' own results mean nothing here (no output is computed:
    most fail); their triton cases on CPU tensors run (pretend_gpu lets the backends take them)."""
    import pytest

    failed = set()
    run = JITFunction.run

    def recording(self, *args, **kwargs):
        try:
            return run(self, *args, **kwargs)
        except Exception as e:
            failed.add(f"{self.fn.__name__} does not compile: {type(e).__name__}: {str(e)[:1000]}")
            raise
    JITFunction.run = recording
    tests = Path(__file__).parent
    pytest.main([*(paths or [str(tests)]), "-q", "--tb=no", "-rN", "-p", "no:cacheprovider", "-p", "no:warnings",
                 "--ignore", str(tests / "test_sm_compile.py"), "--ignore", str(tests / "test_inductor_graph.py")])
    kernels_by_id = {id(kernel): (name, kernel) for name, kernel in compiled}
    problems = {p for name, kernel in kernels_by_id.values() for p in check(kernel, name, None, arch)[1]}
    print(f"sm_{GPUS[arch][0]}: the suite's {len(compiled)} launches compiled {len(kernels_by_id)} kernels")
    return sorted(failed) + sorted(problems)


def recompiled_by_later_steps(compiled: list) -> list[str]:
    """The kernels a training step compiles that the step before it did not: what changes from
    step to step (AdamW's lr under a schedule and its step count, its rounding seed, dropout's
    seeds) must reach the kernels as values, never specialized on, or each step pays a compile
    (seconds). Three steps of a small LLaMA-like model with dropout on every op's triton
    backend, bf16 weights and BF16AdamW clipping, its lr changed each step. The optimizer's
    seed is picked so that step 2's rounding seed is a multiple of 16 and step 1's not: Triton
    specializes an int on that."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=64, vocab_size=128, norm="rmsnorm",
                       pos_encoding="rope", mlp="swiglu", bias=False, dropout=0.1)
    model = GPT(config, {op: "triton" for op in model_ops(config)}).to(torch.bfloat16)
    seed = next(s for s in range(1000) if derived_seed(s, 0, 2) % 16 == 0 and derived_seed(s, 0, 1) % 16)
    optimizer = BF16AdamW(model.param_groups(0.1), backend="triton", seed=seed)
    grad_norm = kernels.get("grad_norm", "triton")
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    seen, problems = set(), []
    for step in (1, 2, 3):
        start = len(compiled)
        model(idx, idx, return_logits=False)[1].backward()
        clip_for_step(optimizer, model.parameters(), 1.0, grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * step / 3  # a warm-up
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        new = {(name, id(kernel)) for name, kernel in compiled[start:]} - seen
        problems += [f"training step {step} compiled {name} anew" for name, _ in sorted(new) if step > 1]
        seen |= new
    print(f"3 training steps compiled {len(seen)} kernels")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=described(__doc__))
    parser.add_argument("--arch", type=int, choices=sorted(GPUS), default=9, help="compute-capability major")
    parser.add_argument("--suite", nargs="*", metavar="PATH",
                        help="compile every launch the tests make (those in the PATHs given, else the whole suite: "
                             "minutes) instead of the training workloads; pytest's own counts then mean nothing")
    parser.add_argument("--steps", action="store_true",
                        help="instead, run three training steps and fail if a later one compiles a kernel anew")
    args = parser.parse_args(argv)
    sm = GPUS[args.arch][0]
    compiled = pretend_gpu(args.arch)
    if args.suite is not None:
        return exit_status(suite_problems(args.arch, compiled, args.suite))
    if args.steps:
        return exit_status(recompiled_by_later_steps(compiled))
    problems = []
    for label, thunk, kind in workloads(args.arch):
        start = len(compiled)
        try:
            thunk()
        except Exception as e:  # noqa: BLE001 (every failure is reported, then the run fails)
            problems.append(f"{label}: {type(e).__name__}: {e}")
            print(f"{label}: FAILED {type(e).__name__}: {str(e)[:2000]}")
            continue
        for name, kernel in compiled[start:]:
            line, wrong = check(kernel, name, kind, args.arch)
            print(f"{label}: {line}")
            problems += [f"{label}: {w}" for w in wrong]
    print(f"sm_{sm}: {len(compiled)} launches compiled (triton {triton.__version__}, torch {torch.__version__})")
    return exit_status(problems)


if __name__ == "__main__":
    sys.exit(main())
