"""Every Triton kernel compiles for the GPUs the project targets, with the launch configurations
they would get, and fits them: tests/sm_compile.py in a process of its own (kernels there are
compiled JIT functions, not the interpreter's), started in the background at collection
(tests/background.py). On a GPU machine the suite compiles them for real."""
import re
import sys

import pytest
import torch

from tests import background


cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU's own tests compile every kernel natively")


def command(arch: int) -> tuple[str, ...]:
    return (sys.executable, "-m", "tests.sm_compile", "--arch", str(arch))


@cpu_only
@pytest.mark.parametrize("arch", [pytest.param(arch, id=f"sm{sm}", marks=pytest.mark.background(command(arch)))
                                  for arch, sm in ((8, 80), (9, 90), (10, 100), (12, 120))])
def test_every_kernel_compiles_and_fits(arch):
    run = background.result(command(arch))
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    assert "launches compiled" in run.stdout


SUITE = (sys.executable, "-m", "tests.sm_compile", "--arch", "9", "--suite", "tests/test_swiglu.py")


@cpu_only
@pytest.mark.background(SUITE)
def test_the_suites_launches_compile():
    """--suite runs tests with their launches compiled (swiglu's here, its CPU cases included: the
    stand-in lets the triton backends take CPU tensors), and says how many kernels."""
    run = background.result(SUITE)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    launches, kernels = map(int, re.search(r"the suite's (\d+) launches compiled (\d+) kernels", run.stdout).groups())
    assert launches > kernels >= 2, run.stdout[-2000:]


STEPS = (sys.executable, "-m", "tests.sm_compile", "--arch", "9", "--steps")


@cpu_only
@pytest.mark.background(STEPS)
def test_later_training_steps_compile_nothing():
    """AdamW's lr and step and the rounding and dropout seeds change each step without a kernel
    compiled anew (run without the seed's do_not_specialize, step 2 compiles _adamw_kernel again)."""
    run = background.result(STEPS)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    assert int(re.search(r"3 training steps compiled (\d+) kernels", run.stdout)[1]) >= 10


# check() of stand-in kernels, and main() / suite_problems() with stand-in workloads, printed as JSON.
_PROBE_CODE = r'''
import json, types, sys
import tests.sm_compile as s
s.resources = lambda kernel: kernel.use

def kernel(ptx="", shared=0, reg=32, warps=4):
    return types.SimpleNamespace(metadata=types.SimpleNamespace(num_warps=warps, num_stages=3, shared=shared),
                                 asm=dict(ptx=ptx), use=dict(reg=reg, local=0, stack=0))

def problems(ptx="", name="_k", kind=None, arch=9, **kw):
    return s.check(kernel(ptx, **kw), name, kind, arch)[1]

out = {}
out["shared"] = {arch: [problems(shared=s.GPUS[arch][1], arch=arch), problems(shared=s.GPUS[arch][1] + 1, arch=arch)]
                 for arch in s.GPUS}
out["registers"] = [bool(problems(reg=reg, warps=warps)) for reg, warps in ((128, 16), (129, 16), (255, 8), (255, 9))]
V = "\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
N = "\tld.global.b16 { %rs1 }, [ %rd1 + 0 ];\n\tst.global.b16 [ %rd2 + 0 ], { %rs1 };\n"
V2 = "\t@%p1 st.global.v2.b64 [ %rd3 + 0 ], { %rd4, %rd5 };\n"
out["streams"] = {"narrow": problems(N, "_norm_fwd_kernel", "streams"),
                  "wide": problems(V + N, "_norm_fwd_kernel", "streams"),
                  "v2.b64": problems(V2, "_adamw_kernel", "streams"),
                  "small": problems(N, "_sqrt_of_sum_kernel", "streams"), "not streaming": problems(N, "_k", None),
                  "accesses": list(s.global_accesses(kernel(V + N)))}
F64 = {"add": "\tadd.f64 %fd3, %fd1, %fd2;", "mul": "\tmul.rn.f64 %fd3, %fd1, %fd2;",
       "fma": "\tfma.rn.f64 %fd4, %fd1, %fd2, %fd3;", "setp": "\tsetp.gt.f64 %p1, %fd1, %fd2;",
       "cvt_to_f32": "\tcvt.rn.f32.f64 %f1, %fd1;", "param": "\tld.param.f64 %fd1, [p];",
       "f32": "\tadd.f32 %f3, %f1, %f2;", "predicated": "\t@%p1 add.f64 %fd3, %fd1, %fd2;"}
out["fp64"] = {k: bool(problems(v + "\n")) for k, v in F64.items()}
AT = {"atom": "\tatom.global.gpu.acq_rel.add.f32 %f1, [%rd1], %f2;",
      "pred atom": "\t@%p1 atom.global.gpu.acq_rel.add.f32 %f1, [%rd1], %f2;",
      "red": "\tred.global.gpu.add.f32 [%rd1], %f2;", "neg pred red": "\t@!%p2 red.global.add.f32 [%rd1], %f2;",
      "plain": "\tld.global.b32 { %r1 }, [ %rd1 + 0 ];",  # and a TMA descriptor's atomic_add, as triton 3.8 has it:
      "tma reduction": "\t@%p3 cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.bulk_group [%rd1, {%r1}], [%r3];"}
out["atomics"] = {k: bool(problems(v + "\n")) for k, v in AT.items()}
RS = {"ftz": "\trsqrt.approx.ftz.f32 %f2, %f1;", "pred ftz": "\t@%p1 rsqrt.approx.ftz.f32 %f2, %f1;",
      "no ftz": "\trsqrt.approx.f32 %f2, %f1;", "sqrt_rn": "\tsqrt.rn.f32 %f2, %f1;"}
out["rsqrt"] = {k: bool(problems(v + "\n")) for k, v in RS.items()}
INSTR = {"mma.sync": "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};",
         "wgmma": "\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, p, 1, 1, 0, 1;",
         "tcgen05": "\ttcgen05.mma.cta_group::1.kind::f16 [%r1], %rd1, %rd2, %r2, p;",
         "none": "\tadd.f32 %f3, %f1, %f2;"}
out["mma"] = {f"{arch} {name} {instr}": bool(problems(ptx + "\n", name, "mma", arch))
              for arch in s.GPUS for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")
              for instr, ptx in INSTR.items()}
out["mma other kinds"] = [bool(problems("", "_attn_fwd", None)), bool(problems(V, "_attn_fwd", "streams"))]
sig = s.InductorSignature(types.SimpleNamespace(__name__="k"), {"x": "*fp32", "a": "fp32", "n": "i32", "b": "fp16"})
out["signature"] = sig.signature
out["exit_status"] = [s.exit_status([]), s.exit_status(["a problem"])]
out["tma workloads"] = {arch: any("TMA" in label for label, _, _ in s.workloads(arch)) for arch in s.GPUS}
out["kinds"] = {label.split(": ")[1]: kind for label, _, kind in s.workloads(9)
                if label.split(": ")[0] in ("gpt2", "llama")}

# main(): a workload that fails and one whose kernel has a problem, each reported, the status 1.
import contextlib, io
compiled = []
s.pretend_gpu = lambda arch: compiled
def fails():
    raise RuntimeError("out of resources")
def launches():
    compiled.append(("_norm_fwd_kernel", kernel(N)))
s.workloads = lambda arch: iter([("w1", fails, None), ("w2", launches, "streams")])
with contextlib.redirect_stdout(io.StringIO()) as printed:
    status = s.main(["--arch", "9"])
out["main"] = [status, [l for l in printed.getvalue().splitlines() if l.startswith("PROBLEM")]]

# suite_problems(): a launch that does not compile, and a compiled kernel with a problem.
import pytest
from triton.runtime.jit import JITFunction
def raising_run(self, *args, **kwargs):
    raise ValueError("no compile")
JITFunction.run = raising_run
def fake_main(args):
    try:
        JITFunction.run(types.SimpleNamespace(fn=types.SimpleNamespace(__name__="_bad_kernel")))
    except ValueError:
        pass
    compiled.append(("_atomic_kernel", kernel(AT["atom"] + "\n")))
pytest.main = fake_main
with contextlib.redirect_stdout(io.StringIO()):
    out["suite"] = s.suite_problems(9, compiled, [])
print(json.dumps(out))
'''
PROBE = (sys.executable, "-c", _PROBE_CODE)


def probe() -> dict:
    return background.last_json(PROBE)


@pytest.mark.background(PROBE)
def test_each_arch_fails_a_kernel_past_its_least_shared_memory():
    """Per major: the least opt-in shared memory a block gets on a card taking its tables (99 KB
    on sm80's and sm120's consumer cards: sm86 and sm89 take sm80's, not only the A100 with 163;
    227 KB on sm90 and sm100): that much passes, a byte more fails."""
    shared = probe()["shared"]
    for arch, sm, kb in ((8, 80, 99), (9, 90, 227), (10, 100, 227), (12, 120, 99)):
        assert shared[str(arch)] == [[], [f"_k takes {kb * 1024 + 1} bytes of shared memory, more than a block gets "
                                          f"on some card taking sm_{sm}'s tables (the least: {kb * 1024})"]], arch


@pytest.mark.background(PROBE)
def test_a_block_past_the_sms_registers_fails():
    """128 registers x 16 warps x 32 threads is the 65536 an SM has; 129 is past it."""
    assert probe()["registers"] == [False, True, False, True]


@pytest.mark.background(PROBE)
def test_a_streaming_kernel_without_16_byte_vectors_fails():
    streams = probe()["streams"]
    assert streams["narrow"] and not streams["wide"] and not streams["v2.b64"]
    assert streams["small"] == [] and streams["not streaming"] == []  # the grad norm's last kernel; other kinds
    assert streams["accesses"] == [1, 2]


@pytest.mark.background(PROBE)
def test_every_memory_bound_op_is_checked_for_vectors():
    """The ops whose kernels only stream memory (all but attention's and the fused loss's matmuls)."""
    kinds = probe()["kinds"]
    memory_bound = {"rms_norm", "layer_norm", "swiglu", "rope", "cross_entropy", "adamw", "grad_norm"}
    assert {op: kind for op, kind in kinds.items() if op in memory_bound} == dict.fromkeys(memory_bound, "streams")
    assert kinds["attention"] == "mma"


@pytest.mark.background(PROBE)
def test_fp64_math_fails_but_reading_and_converting_an_fp64_argument_passes():
    assert probe()["fp64"] == {"add": True, "mul": True, "fma": True, "setp": True, "cvt_to_f32": False, "param": False,
                               "f32": False, "predicated": True}


@pytest.mark.background(PROBE)
def test_atomics_fail_predicated_or_not():
    assert probe()["atomics"] == {"atom": True, "pred atom": True, "red": True, "neg pred red": True, "plain": False,
                                  "tma reduction": True}


@pytest.mark.background(PROBE)
def test_a_flush_to_zero_rsqrt_fails_predicated_or_not():
    assert probe()["rsqrt"] == {"ftz": True, "pred ftz": True, "no ftz": False, "sqrt_rn": False}


@pytest.mark.background(PROBE)
def test_attention_matmuls_need_each_archs_tensor_core_instruction():
    """Each of attention's matmul kernels fails without its GPU's instruction: sm90's mma.sync
    fallback and sm100's are no wgmma / tcgen05."""
    mma = probe()["mma"]
    want = {8: "mma.sync", 9: "wgmma", 10: "tcgen05", 12: "mma.sync"}
    for key, failed in mma.items():
        arch, _name, instr = key.split()
        assert failed == (instr != want[int(arch)]), key
    assert probe()["mma other kinds"] == [False, False]


@pytest.mark.background(PROBE)
def test_float_arguments_are_declared_fp64_as_inductor_declares_them():
    """Else the fp64 check has no fp64 to find."""
    assert probe()["signature"] == {"x": "*fp32", "a": "fp64", "n": "i32", "b": "fp16"}


@pytest.mark.background(PROBE)
def test_problems_make_the_exit_status_1():
    assert probe()["exit_status"] == [0, 1]


@pytest.mark.background(PROBE)
def test_main_reports_a_failing_workload_and_a_kernels_problem():
    status, problems = probe()["main"]
    assert status == 1
    assert len(problems) == 2 and problems[0].startswith("PROBLEM w1: RuntimeError: out of resources"), problems
    assert "w2: _norm_fwd_kernel moves no 16-byte vectors" in problems[1], problems


@pytest.mark.background(PROBE)
def test_suite_reports_a_launch_that_does_not_compile_and_a_kernels_problem():
    suite = probe()["suite"]
    assert any(p.startswith("_bad_kernel does not compile: ValueError: no compile") for p in suite), suite
    assert any("_atomic_kernel updates memory atomically" in p for p in suite), suite


@pytest.mark.background(PROBE)
def test_the_tma_twins_compile_from_sm90_on():
    assert probe()["tma workloads"] == {"8": False, "9": True, "10": True, "12": True}
