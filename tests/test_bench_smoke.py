"""The GPU benchmarks' code on CPU at tiny shapes, so that a GPU session finds their numbers, not
their crashes: every per-issue benchmark (bench/op_*.py) and the kernel profile (bench.kernels)
through their command lines, with CUDA-event timing and the measured rooflines replaced by fixed
numbers and torch.compile by the function itself (Inductor's CPU compile takes seconds a shape).
"""
import dataclasses
import functools
import itertools
import importlib
import json
import types

import pytest
import torch

import kernels
from bench import (backends, measure, op_adamw, op_attention, op_cross_entropy, op_linear_cross_entropy,
                   op_norm, op_rope, op_swiglu, profile, report)
from bench import kernels as bench_kernels
from bench.backends import peak_mib as measured_peak_mib  # before the fixture replaces it
from bench.cases import Shapes, case, check
from gpt.model import GPTConfig
from tests import bench_kernels as bench_cases
from tests.devices import H100, interpreter_only

COPY_GBS, MATMUL_TFLOPS, PEAK_MIB = 1000.0, 100.0, 64.0


def fake_matmul_tflops(device="cuda", dtype=torch.bfloat16):
    """A matmul roofline for each dtype, told apart."""
    return {torch.bfloat16: MATMUL_TFLOPS, torch.float16: 2 * MATMUL_TFLOPS, torch.float32: MATMUL_TFLOPS / 8}[dtype]


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    # Each timing reads 1 ms slower than the one before, so that a later pass reads slower, as a
    # forward+backward does beside its forward (the bwd rows are their difference).
    ticks = itertools.count(1)
    monkeypatch.setattr(backends, "median_ms", lambda fn: (fn(), float(next(ticks)))[1])
    monkeypatch.setattr(backends, "peak_mib", lambda fn, device: (fn(), PEAK_MIB)[1])
    monkeypatch.setattr(backends, "copy_gbs", lambda device="cuda": COPY_GBS)
    monkeypatch.setattr(backends, "matmul_tflops", fake_matmul_tflops)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(backends, "detect", lambda: H100)


def tiny(shapes: tuple[Shapes, ...]) -> tuple[Shapes, ...]:
    return tuple(s.tiny() for s in shapes)


# Each benchmark at tiny versions of some of its issue's shapes, and the backends and passes of its rows.
BENCHMARKS = {
    "norm": (op_norm, tiny(op_norm.SHAPES[:1]),
             {"torch", "compile", "triton", "F.rms_norm", "F.layer_norm"}, {"fwd", "fwd+bwd", "bwd"}),
    "swiglu": (op_swiglu, tiny(op_swiglu.SHAPES[:1]),
               {"torch", "compile", "triton", "F.silu(a) * b"}, {"fwd", "fwd+bwd", "bwd"}),
    "rope": (op_rope, tiny(op_rope.SHAPES[-1:]), {"torch", "compile", "triton"}, {"fwd", "fwd+bwd", "bwd"}),
    "attention": (op_attention, tiny(op_attention.SHAPES[::len(op_attention.SEQ_LENS)]),  # D = 64, 128, dropout
                  {"torch", "compile", "triton"}, {"fwd", "fwd+bwd", "bwd"}),
    "cross_entropy": (op_cross_entropy, tiny(op_cross_entropy.SHAPES[:1]),
                      {"torch", "compile", "triton", "F.cross_entropy"}, {"fwd", "fwd+bwd", "bwd"}),
    "linear_cross_entropy": (op_linear_cross_entropy, tiny(op_linear_cross_entropy.SHAPES[:1]),
                             {"torch", "compile", "triton", "linear + triton cross_entropy"}, {"fwd+bwd"}),
    "adamw": (op_adamw, tiny(op_adamw.SHAPES),
              {"triton", "triton sr", "torch loop", "torch", "get_total_norm", *op_adamw.OPTIMIZERS},
              {"step", op_adamw.OPTIMIZER_PASS}),
}


@interpreter_only
@pytest.mark.parametrize("name", BENCHMARKS)
def test_op_benchmark_runs_and_writes_its_rows(name, monkeypatch, tmp_path, capsys):
    module, shapes, backend_names, passes = BENCHMARKS[name]
    monkeypatch.setattr(module, "run", functools.partial(module.run, device="cpu", shapes=shapes))
    path = tmp_path / "rows.json"
    assert module.main(["--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert {"device", "date", "torch", "triton", "git_sha"} <= set(result)
    assert result["roofline"]["value"] in (COPY_GBS, MATMUL_TFLOPS)
    rows = result["rows"]
    assert {r["backend"] for r in rows} == backend_names and {r["pass"] for r in rows} == passes
    assert all(r["ms"] > 0 and r["value"] > 0 and 0 < r["roofline"] for r in rows)
    # Every measured pass has its memory (not bwd, the difference of two passes).
    assert all(r["peak_mib"] == (None if r["pass"] == "bwd" else PEAK_MIB) for r in rows)
    if name == "norm":  # the plain norm and the pre-norm form with the residual add
        assert {"+residual" in r["shape"] for r in rows} == {False, True}
    # Every row of a registry op (all but the optimizers') was checked, and triton passed.
    assert all(r["verified"] for r in rows if r["backend"].startswith("triton"))
    assert all(r["verified"] is not None for r in rows if r["backend"] not in op_adamw.OPTIMIZERS)
    roofline = {"GB/s": f"copy bandwidth {COPY_GBS:.0f} GB/s", "TFLOPS": f"bf16 matmul {MATMUL_TFLOPS:.0f} TFLOPS"}
    out = capsys.readouterr().out
    assert roofline[rows[0]["unit"]] in out  # the table's title
    # Each row was printed as it was measured too: a run cut short still shows what it measured.
    assert all(f"{r['op']} {r['shape']} {r['pass']} {r['backend']}: {r['ms']:.3f} ms" in out for r in rows)
    # bench.report makes the README's table of the file: a row per shape and pass, a column per backend.
    assert report.main([str(path)]) == 0
    table = capsys.readouterr().out
    cases = {(r["op"], r["shape"], r["pass"]) for r in rows}
    several_ops = len({r["op"] for r in rows}) > 1  # then an op column comes first
    first = lambda op: f"| {op} | " if several_ops else "| "  # noqa: E731
    assert sum(line.startswith(f"{first(op)}{shape} | {pass_} |") for line in table.splitlines()
               for op, shape, pass_ in cases) == len(cases)
    assert all(f"| {b} (" in table or f" {b} (" in table for b in backend_names)
    assert f", {PEAK_MIB:.0f} MiB" in table


def test_peak_mib_is_what_a_pass_allocates_beyond_what_was_there():
    assert measured_peak_mib(lambda: torch.ones(1), "cpu") is None
    assert backends.host_ms(lambda: torch.ones(1), "cpu") is None  # the host's share: a GPU's question
    if torch.cuda.is_available():
        there = torch.empty(2**20, device="cuda")  # allocated before the pass: not counted
        mib = measured_peak_mib(lambda: torch.empty(64 * 2**18, device="cuda").sum(), "cuda")  # 64 MiB, then freed
        assert 64 <= mib < 65
        del there


def test_host_ms_is_the_median_call(monkeypatch):
    """One call the host was slow to issue (a page fault, a descheduled thread) moves no median."""
    clock = iter([0.0, 1e-3, 1.0, 1.1, 2.0, 2.001, 3.0, 3.001, 4.0, 4.001])  # 1 ms, then 100 ms, then 1 ms x3
    monkeypatch.setattr(backends, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert backends.host_ms(lambda: None, "cuda") == pytest.approx(1.0)


def test_op_benchmark_without_a_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setattr(backends, "detect", lambda: None)
    assert op_norm.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_backward_is_fwd_bwd_less_fwd():
    c = case("attention", op_attention.SHAPES[0], "meta")
    entry = {"backends": {"triton": {"ms": {"fwd": 1.0, "fwd+bwd": 4.0}, "rate": {}, "roofline": {},
                                     "host_ms": {"fwd": 0.5, "fwd+bwd": 3.5}},
                          "compile": {"ms": {"fwd": 1.0, "fwd+bwd": 0.9}, "rate": {}, "roofline": {}},  # noise
                          "eager": {"ms": {"fwd": 1.0, "fwd+bwd": 1.0}, "rate": {}, "roofline": {}},  # (a 0 ms bwd)
                          "torch": {"error": "boom"}}}
    backends.add_backward(c, entry, peak=MATMUL_TFLOPS)
    triton = entry["backends"]["triton"]
    assert triton["ms"]["bwd"] == 3.0 and triton["host_ms"]["bwd"] == 3.0  # host-bound, as its fwd+bwd
    assert triton["rate"]["bwd"] == pytest.approx(2.5 * c.work["fwd"] / 3.0 / 1e9)
    assert triton["roofline"]["bwd"] == pytest.approx(triton["rate"]["bwd"] / MATMUL_TFLOPS)
    assert "bwd" not in entry["backends"]["compile"]["ms"] and "bwd" not in entry["backends"]["eager"]["ms"]
    assert "ms" not in entry["backends"]["torch"]


def test_an_entry_checks_on_the_checked_case_and_times_the_timed_one(monkeypatch):
    """The float64 reference at the timed (full) size may not fit beside its inputs: the check
    takes the quick case. A backend that fails to run keeps its check's verdict in its row."""
    timed, checked = (case("swiglu", op_swiglu.SHAPES[0], "meta", quick=quick) for quick in (False, True))
    seen = []
    monkeypatch.setattr(backends, "check", lambda c, fn, reference: (seen.append(("check", c)), (False, "off"))[1])

    def time_case(c, fn, device):
        seen.append(("time", c))
        raise RuntimeError("cannot run")
    monkeypatch.setattr(backends, "time_case", time_case)
    e = backends.entry(timed, checked, {"triton": lambda *a: None}, peak=1.0, device="meta")
    assert seen == [("check", checked), ("time", timed)]
    assert [(r.backend, r.verified, r.error) for r in backends.rows({"swiglu": e})] == [
        ("triton", False, "RuntimeError: cannot run")]


def test_attention_names_the_launch_configs_it_timed(monkeypatch):
    line = op_attention.launch_configs("cpu")
    assert line.startswith("triton (block_m, block_n, warps, stages, tma): D=64 fwd (")
    assert "; D=128 " in line and line.count("False)") + line.count("True)") == 6
    # a D whose short sequences take a table of their own is named twice
    from kernels import attention
    monkeypatch.setattr(attention.runtime, "capability", lambda device: (9, 0))
    line = op_attention.launch_configs("cpu")
    short = attention.SHORT_T
    assert f"D=64 T<={short} fwd (128, 64, 4, 3, False)" in line and f"; D=64 T>{short} " in line
    assert line.count("D=128") == 1


def test_the_issues_shapes_and_work():
    """The full-size cases (built on the meta device: nothing allocated) are the issues' shapes."""
    assert [case("rms_norm", s, "meta", residual=False).shape for s in op_norm.SHAPES] == [
        f"16384x{n}" for n in (768, 1024, 2048, 4096, 8192)]
    layer_norm = case("layer_norm", op_norm.SHAPES[0], "meta", residual=False)
    # bf16: x read and y written, weight and bias read; then x, weight, dy read, dx, dw, db written.
    assert layer_norm.work == {"fwd": 2 * (2 * 16384 + 2) * 768, "fwd+bwd": 2 * (5 * 16384 + 5) * 768}
    # The pre-norm form, as the (pre-norm) model runs it: x and the residual read, y and s written;
    # then s, ds, dy, the weight read, dx (the residual's gradient too), dw, db written.
    fused = case("layer_norm", op_norm.SHAPES[0], "meta")
    assert fused.shape == "16384x768 +bias +residual"
    assert fused.work == {"fwd": 2 * (4 * 16384 + 2) * 768, "fwd+bwd": 2 * (8 * 16384 + 5) * 768}
    # With dropout the residual's gradient is a tensor of its own: dx is it masked and scaled.
    dropped = case("layer_norm", dataclasses.replace(op_norm.SHAPES[0], config=dataclasses.replace(
        op_norm.SHAPES[0].config, dropout=0.2)), "meta")
    assert dropped.shape == "16384x768 +bias +residual +dropout 0.2"
    assert dropped.work["fwd+bwd"] == fused.work["fwd+bwd"] + 2 * 16384 * 768
    swiglu = [case("swiglu", s, "meta") for s in op_swiglu.SHAPES]
    assert [c.shape for c in swiglu] == [f"16384x{h}" for h in (2048, 5632, 11008, 14336)]
    # bf16 gate and up read, y written; then gate, up and dy read, both grads written.
    assert swiglu[0].work == {"fwd": 3 * 2 * 16384 * 2048, "fwd+bwd": 8 * 2 * 16384 * 2048}
    rope = [case("rope", s, "meta") for s in op_rope.SHAPES]
    assert [c.shape for c in rope] == ["B=8 T=2048 H=12/12 D=64", "B=8 T=2048 H=32/32 D=128", "B=8 T=2048 H=32/8 D=128"]
    # bf16 q and k read and written, each pass, and the fp32 cos and sin tables (2048 x 64) read.
    assert rope[2].work == {"fwd": 2 * 16384 * 40 * 128 * 2 + 2 * 2048 * 64 * 4 * 2,
                            "fwd+bwd": 4 * 16384 * 40 * 128 * 2 + 4 * 2048 * 64 * 4 * 2}
    attention = [case("attention", s, "meta") for s in op_attention.SHAPES]
    assert [c.shape for c in attention][:2] == ["B=32 H=32/32 T=512 D=64 causal", "B=16 H=32/32 T=1024 D=64 causal"]
    assert attention[-2].shape == "B=1 H=16/16 T=16384 D=128 causal"
    assert attention[-1].shape == "B=16 H=32/32 T=1024 D=64 causal dropout 0.2"
    # 4*B*H*T^2*D / 2 with B*T = 16k tokens and H*D = 2048
    assert [c.work["fwd"] for c in attention] == [4 * 16384 * 2048 * s.T / 2 for s in op_attention.SHAPES]
    cross_entropy = [case("cross_entropy", s, "meta") for s in op_cross_entropy.SHAPES]
    assert [c.shape for c in cross_entropy] == [f"16384x{v}" for v in (32000, 50304, 128256)]
    # bf16 logits read and int64 targets read; then both read again and the gradient written.
    assert cross_entropy[1].work == {"fwd": 16384 * (2 * 50304 + 8), "fwd+bwd": 16384 * (6 * 50304 + 16)}
    heads = [case("linear_cross_entropy", s, "meta") for s in op_linear_cross_entropy.SHAPES]
    assert [c.shape for c in heads] == ["16384x768x50304", "16384x4096x32000", "16384x4096x128256"]
    assert heads[0].work == {"fwd+bwd": 6 * 16384 * 768 * 50304}  # the logits' matmul, then d_x's and d_weight's
    adamw = case("adamw", op_adamw.SHAPES[0], "meta")
    assert adamw.shape == "148 tensors, 124M params" and adamw.work["step"] == 14 * 124_475_904


@pytest.mark.parametrize("asked,expected", [(None, True), (False, False), (True, True)])
def test_adamw_cases_round_as_asked(asked, expected):
    """The backend timed and the torch reference it is checked against round alike: bf16's default
    is stochastic, and a round-to-nearest case checks round-to-nearest backends against torch's
    rounding to nearest (stochastic rounding's larger error would loosen their bound)."""
    c = case("adamw", Shapes(GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=16, block_size=4), batch_size=1,
                             dtype=torch.bfloat16), "cpu", quick=True, stochastic_rounding=asked)
    seen = []
    c.call(lambda *lists, stochastic_rounding, **kw: seen.append(stochastic_rounding), c.make(), "step")
    assert seen == [expected]


@interpreter_only
@pytest.mark.parametrize("op,pos_encoding", [("rms_norm", "learned"), ("layer_norm", "learned"),
                                              ("attention", "learned"), ("attention", "rope")])
def test_dropout_cases_give_the_reference_each_backends_own_mask(op, pos_encoding):
    """torch and triton draw different masks, and both pass the check; a backend that drops
    nothing out, or draws a fresh mask at every call (or leaves q and k unturned), fails it."""
    config = GPTConfig(n_embd=64, n_head=2, n_kv_head=1, block_size=40, bias=True, dropout=0.3,
                       pos_encoding=pos_encoding)
    c = case(op, Shapes(config, batch_size=2, dtype=torch.bfloat16), "cpu", residual=True)
    assert c.align is not None and "dropout 0.3" in c.shape
    reference = kernels.get(op, "torch")
    for backend in ("torch", "triton"):
        ok, why = check(c, kernels.get(op, backend), reference)
        assert ok, f"{backend}: {why}"
    seeds = itertools.count()

    def fresh_mask(*args, **kwargs):
        torch.manual_seed(next(seeds))
        return reference(*args, **kwargs)
    no_dropout = lambda *args, dropout_p, **kwargs: reference(*args, **kwargs)  # noqa: E731
    no_rope = lambda *args, rope, **kwargs: reference(*args, **kwargs)  # noqa: E731
    for wrong in (fresh_mask, no_dropout) + ((no_rope,) if pos_encoding == "rope" else ()):
        assert not check(c, wrong, reference)[0]


@interpreter_only
def test_bench_kernels_writes_a_profile(monkeypatch, tmp_path, capsys):
    """`python -m bench.kernels` on a pretend H100 that runs on the CPU, at tiny llama shapes."""
    monkeypatch.setattr(bench_kernels, "detect", lambda: H100)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(bench_kernels, "measure_op", functools.partial(bench_kernels.measure_op, device="cpu"))
    monkeypatch.setattr(bench_kernels, "Shapes", lambda *args: Shapes(*args).tiny())
    out = tmp_path / "h100.json"
    assert bench_kernels.main(["--gpu", "h100", "--preset", "llama", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h100.json"]  # the partial record gone
    [measured] = profile.load(out).workloads
    assert measured["rooflines"] == {"copy_gbs": COPY_GBS, "matmul_tflops": MATMUL_TFLOPS}
    assert measured["workload"]["preset"] == "llama" and measured["device"]["slug"] == "h100-sxm"
    assert list(measured["ops"]) == list(kernels.OPS)
    for op, entry in measured["ops"].items():
        assert entry["backends"]["triton"]["verified"], (op, entry["backends"]["triton"]["check"])
        assert entry["chosen"]["eager"] in kernels.ops()[op]
    assert f"wrote {out}" in capsys.readouterr().out
    assert report.main([str(out)]) == 0  # the README's table of it: a row per op
    table = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in table and all(f"| {op} | " in table for op in kernels.OPS)


# tests/bench_kernels.py's cases but torch.compile's, which no_gpu makes torch's function itself.
UNCOMPILED_CASES = [c for c in bench_cases.CASES if c[2] != "compile"]


@interpreter_only
@pytest.mark.parametrize("op, pass_, backend", UNCOMPILED_CASES, ids=["-".join(c) for c in UNCOMPILED_CASES])
def test_pytest_benchmark_cases_run(op, pass_, backend):
    """tests/bench_kernels.py, the profile's cases under pytest-benchmark (GPU only), each run here
    at tiny shapes through a stand-in for the benchmark fixture."""
    class Benchmark:
        extra_info, rounds = {}, 0

        def __call__(self, fn):
            fn()
            self.rounds += 1
    benchmark = Benchmark()
    bench_cases.run_case(benchmark, op, pass_, backend, bench_cases.SHAPES.tiny(), "cpu")
    assert benchmark.rounds == 1 and benchmark.extra_info["unit"] in ("GB/s", "TFLOPS")


@pytest.mark.parametrize("args, message", [(["--preset", "giga"], "unknown preset 'giga'"),
                                           (["--ops", "rms_norm,fused_mlp"], "unknown op 'fused_mlp'")])
def test_bench_kernels_refuses_an_unknown_preset_or_op_on_any_machine(args, message, capsys):
    """Before looking for a GPU: a GPU session's call fails at once, a CPU's dry run of it too."""
    with pytest.raises(SystemExit) as exit:
        bench_kernels.main(args)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def _stopped_in_the_second_op(monkeypatch) -> list:
    """bench.kernels on a pretend H100, stopped (a GPU session's time limit) as its second op
    starts: the (op, shapes) it measured, in the list returned."""
    monkeypatch.setattr(bench_kernels, "detect", lambda: H100)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(bench_kernels, "roofline",
                        lambda unit, dtype=torch.bfloat16: 1.0 if unit == "GB/s" else fake_matmul_tflops(dtype=dtype))
    measured = []

    def measure_op(op, shapes, rooflines):
        if measured:
            raise KeyboardInterrupt
        measured.append((op, shapes))
        return {"training_pass": "fwd", "shape": "s", "unit": "GB/s", "backends": {}, "chosen": {}}
    monkeypatch.setattr(bench_kernels, "measure_op", measure_op)
    return measured


def test_bench_kernels_cut_short_keeps_the_ops_it_measured(monkeypatch, tmp_path):
    """Stopped during its second op, bench.kernels leaves the first op's record in
    <profile>.<preset>.partial.json, and the profile as it was."""
    measured = _stopped_in_the_second_op(monkeypatch)
    out = tmp_path / "h100.json"
    with pytest.raises(KeyboardInterrupt):
        bench_kernels.main(["--gpu", "h100", "--preset", "gpt2", "--out", str(out)])
    assert not out.exists()
    [record] = profile.load(tmp_path / "h100.gpt2.partial.json").workloads
    assert list(record["ops"]) == [op for op, _ in measured] == [kernels.OPS[0]]


@pytest.mark.parametrize("setting, dtype", [("dtype = 'float16'", torch.float16),
                                            ("optimizer = 'bf16_adamw'", torch.bfloat16)])  # as train.py trains it
def test_bench_kernels_profiles_a_train_config_s_model_at_its_batch_and_dtype(setting, dtype, monkeypatch, tmp_path,
                                                                              capsys):
    """--preset my_config.py: the record of the model that file trains (train.py --kernels=auto
    then takes it as the nearest), at its batch_size and dtype; the partial file named after it."""
    measured = _stopped_in_the_second_op(monkeypatch)
    config = tmp_path / "my_model.py"
    config.write_text(f"data_dir = {str(tmp_path)!r}\ndataset = 'none'\nn_layer = 2\nn_head = 2\nn_embd = 64\n"
                      f"block_size = 128\nbatch_size = 12\n{setting}\nmlp = 'swiglu'\n")
    monkeypatch.chdir(tmp_path)  # named as ./my_model.py: recorded as my_model.py, the same file
    with pytest.raises(KeyboardInterrupt):
        bench_kernels.main(["--gpu", "h100", "--preset", "./my_model.py", "--out", str(tmp_path / "h100.json")])
    [(_, shapes)] = measured
    assert (shapes.batch_size, shapes.T, shapes.dtype, shapes.config.n_embd, shapes.config.mlp, shapes.config.vocab_size
            ) == (12, 128, dtype, 64, "swiglu", 50304)
    said = " ".join(capsys.readouterr().out.split())
    assert "my_model.py: the model it trains, its 50304-token vocabulary GPT-2's" in said
    [record] = profile.load(tmp_path / "h100.my_model.partial.json").workloads
    assert record["workload"]["preset"] == "my_model.py"
    assert record["rooflines"]["matmul_tflops"] == fake_matmul_tflops(dtype=dtype)  # the dtype's own matmul rate


# The first lines and the last of an error bench.mfu recorded on an H200 (2026-12-04).
INDUCTOR_ERROR = """InductorError: SubprocException: An exception occurred in a subprocess:

Name=_attn_fwd
Traceback (most recent call last):
  File "/opt/torch/.venv/lib/python3.12/site-packages/torch/_inductor/compile_worker/subproc_pool.py", line 457
triton.compiler.errors.CompilationError: at 42:10:
    key = runtime.dropout_key(seed_ptr, bh, DROPOUT)  # each batch and head its own mask
          ^
NameError('runtime is not defined')


Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this especially if you're reporting a bug to PyTorch)."""


def test_report_compares_triton_with_other_backends_and_survives_odd_files(tmp_path, capsys):
    """triton against the fastest backend that is not triton's own (op_adamw's BF16AdamW rows run
    the same kernel: as whole optimizer steps, they are set against torch's optimizers); a GPU missing from the peak table, a profile op with no backend chosen, or
    a file of an unknown layout prints what it can, and the other files' tables still come."""
    provenance = {"device": {"name": "NVIDIA H200"}, "date": "2026-12-04", "torch": "2.11", "triton": "3.6"}
    row = dict(op="adamw", shape="124M", verified=True, roofline=0.5, ms=1.0)
    rows = [{**row, "pass": pass_, "backend": b, "value": v, "host_ms": 0.9 if b == "torch loop" else 0.1}
            for pass_, b, v in (("step", "triton", 100.0), ("step", "torch loop", 20.0),
                                ("optimizer step", "BF16AdamW triton", 90.0),
                                ("optimizer step", "BF16AdamW triton sr", 95.0),
                                ("optimizer step", "torch fused", 60.0))]
    files = {
        "op.json": {**provenance, "title": "adamw", "roofline": {"unit": "GB/s", "name": "copy", "value": 200.0},
                    "rows": rows},
        "mfu.json": {**provenance, "preset": "gpt2", "batch_size": 16, "seq_len": 1024, "dtype": "bfloat16",
                     "optimizer": "adamw", "steps": 30, "warmup": 8, "convention": "PaLM",
                     "peak": {"tflops": None, "source": None},
                     "rows": [{"variant": "triton", "tokens_per_s": 5e5, "ms_median": 32.0, "tflops": 400.0,
                               "mfu": None, "hw_tflops": 420.0, "peak_memory_gib": 30.0},
                              {"variant": "triton+compile", "error": INDUCTOR_ERROR}]},
        "profile.json": {"format": 2, "workloads": [
            {**provenance, "workload": {"preset": preset, "shapes": f"{preset} shapes", "dtype": "bfloat16"},
             "rooflines": {"copy_gbs": 4000.0, "matmul_tflops": 700.0},
             "ops": {"swiglu": {"training_pass": "fwd+bwd", "shape": "16384 x 3072", "unit": "GB/s",
                                "backends": {"torch": {"ms": {"fwd+bwd": 1.0}, "verified": True,
                                                       "host_ms": {"fwd+bwd": 0.9}},
                                             "triton": {"error": "out of memory"}},
                                "chosen": {"eager": None, "compiled": None}}}} for preset in ("gpt2", "llama")]},
        "odd.json": {**provenance, "rows": []},
    }
    for name, result in files.items():
        (tmp_path / name).write_text(json.dumps(result))
    assert report.main([str(tmp_path / name) for name in files]) == 0
    out = capsys.readouterr().out
    # The op against the torch op; the optimizer on it against torch's optimizer, like with like.
    assert "| 124M | step | 100 | 20 host-bound |  |  |  | 50% | 5.00x |" in out
    assert "| 124M | optimizer step |  |  | 90 | 95 | 60 | 50% | 1.50x |" in out
    assert "no peak" in out and "| triton | 500,000 | 32.0 |  | 400 | n/a |" in out
    assert ("| triton+compile | error: InductorError: SubprocException: An exception occurred in a subprocess: "
            "... NameError('runtime is not defined') |" in out)
    assert out.count("| swiglu | 16384 x 3072 | fwd+bwd | 1.000 host-bound |  | error |  | none | none |") == 2
    assert "bench.kernels gpt2: gpt2 shapes" in out and "bench.kernels llama: llama shapes" in out
    assert "odd.json: not reported (KeyError" in out
    with pytest.raises(SystemExit) as exit:  # a path that is not there: a usage error, nothing read
        report.main([str(tmp_path / "mfu.json"), str(tmp_path / "missing.json")])
    assert exit.value.code == 2 and "no such file" in capsys.readouterr().err


def test_a_backend_that_could_not_run_keeps_its_error(capsys, monkeypatch):
    """A per-op benchmark's backend that failed (compile, say) is a row saying why, printed and
    written, not a silent gap; the report shows it, and sets triton against the backends that ran."""
    def ran(ms, rate, roofline):
        return {"verified": True, "check": "ok", "ms": dict(zip(("fwd", "fwd+bwd"), ms)),
                "rate": dict(zip(("fwd", "fwd+bwd"), rate)), "roofline": dict(zip(("fwd", "fwd+bwd"), roofline))}
    entry = {"shape": "16384 x 768", "training_pass": "fwd+bwd", "unit": "GB/s", "backends": {
        "torch": ran((1.0, 3.0), (100.0, 90.0), (0.1, 0.09)),
        "compile": {"verified": True, "check": "ok", "error": "InductorError: boom"},
        "triton": ran((0.5, 1.5), (200.0, 180.0), (0.2, 0.18))}}
    rows = backends.rows({"rms_norm": entry})
    failed = [(r.backend, r.pass_, r.error, r.ms) for r in rows if r.error]
    assert failed == [("compile", "fwd+bwd", "InductorError: boom", None)]
    monkeypatch.setenv("COLUMNS", "200")  # rich's table in one line a row
    measure.print_rows(rows, "t")
    assert "error: InductorError: boom" in capsys.readouterr().out
    result = {"title": "rms_norm", "roofline": {"unit": "GB/s", "name": "copy", "value": 1000.0},
              "rows": [r.as_dict() for r in rows]}
    table = report.op_table(result)
    assert "| 16384 x 768 | fwd+bwd | 90 | error: InductorError: boom | 180 | 18% | 2.00x |" in table
    # Files from before they said how they were timed were timed by do_bench: the report says so.
    assert "triton.testing.do_bench" in report.timing(result)
    assert report.timing(dict(result, timing=measure.TIMING)) == ""


@pytest.mark.parametrize("module", ["bench.kernels", "bench.mfu", "bench.sweep", "bench.report"])
def test_help_describes_the_command_in_whole_sentences(module, capsys):
    """--help's description is the module docstring's first paragraph (its first line cut bench.kernels'
    mid-sentence)."""
    command = importlib.import_module(module)
    with pytest.raises(SystemExit) as done:
        command.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    paragraph = command.__doc__.strip().split("\n\n")[0].split()
    assert " ".join(paragraph[:4]) in text and " ".join(paragraph[-4:]) in text


@pytest.mark.parametrize("module, args, message", [
    ("bench.mfu", ["--recompute", "999"], "recompute: True, False or a number of blocks from 0 to 12, got 999"),
    ("bench.mfu", ["--optimizer", "bf16_adamw", "--dtype", "float16"], "optimizer=bf16_adamw trains in bfloat16"),
    ("bench.mfu", ["--warmup", "0"], "argument --warmup: must be above 0 and finite, got 0"),  # (taken as 1 once)
    ("bench.mfu", ["--profile-steps", "-3"], "argument --profile-steps: must be 0 or more, got -3"),
    ("bench.mfu", ["--json", "{tmp}"], "argument --json: {tmp} is a folder: name a file"),
    ("bench.mfu", ["--json", "{file}/x.json"], "argument --json: no folder for {file}/x.json"),
    ("bench.kernels", ["--out", "{tmp}"], "argument --out: {tmp} is a folder: name a file"),
    ("bench.kernels", ["--gpu", "nonsense"], "--gpu nonsense: no such GPU in the peak table"),
    ("bench.kernels", ["--batch-size", "0"], "argument --batch-size: must be above 0 and finite, got 0"),
    ("bench.kernels", ["--seq-len", "-8"], "argument --seq-len: must be above 0 and finite, got -8"),
    ("bench.kernels", ["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    ("bench.kernels", ["--preset", "giga"],
     "'giga-13b', 'giga-70b', 'giga-175b'], or a train.py config file (name.py)"),
    ("bench.kernels", ["--ops", ","], "argument --ops: names nothing, got ','"),
    ("bench.mfu", ["--kernels", ""], "argument --kernels: names nothing, got ''"),
    ("bench.op_norm", ["--json", "{file}/x.json"], "argument --json: no folder for {file}/x.json"),
    ("bench.sweep", ["--json", "{tmp}"], "argument --json: {tmp} is a folder: name a file"),
    ("bench.sweep", ["--sweeps", "norm,bogus"], "unknown sweep bogus: the sweeps are norm, layer_norm, swiglu"),
    ("bench.sweep", ["--budget-s", "0"], "argument --budget-s: must be above 0 and finite, got 0"),
    ("bench.tune_attention", ["--d", "64,abc"], "--d: head dims 32, 64, 128"),  # (a traceback once)
    ("bench.adamw_curves", ["run", "--out", "{file}"], "--out {file} is a file: name a folder for the runs"),
    ("bench.adamw_curves", ["run", "--scale", "cpu", "--out", "{tmp}/runs", "--set", "bogus=1"],
     "adamw: train.py --bogus=1: unknown config key 'bogus'"),  # (each variant's train.py refused it in turn once)
])
def test_a_bad_argument_is_a_usage_error_before_any_measuring(module, args, message, tmp_path, capsys, monkeypatch):
    """On any machine, a GPU's or a CPU's, before the minutes of measuring or training: a result
    file that could not be written used to fail after them."""
    (tmp_path / "file").write_text("")
    names = dict(tmp=tmp_path, file=tmp_path / "file")
    monkeypatch.chdir(tmp_path)  # (started elsewhere than the repository, adamw_curves' check failed once)
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(module).main([a.format(**names) for a in args])
    assert exit.value.code == 2 and message.format(**names) in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "runs").exists()  # no run started


def test_adamw_curves_says_when_it_has_no_runs_to_tidy_or_plot(tmp_path):
    for command in ("tidy", "plot"):
        with pytest.raises(SystemExit, match=f"bench.adamw_curves {command}: --out {tmp_path}/none: no such folder"):
            importlib.import_module("bench.adamw_curves").main([command, "--out", str(tmp_path / "none")])


def test_report_says_a_file_that_is_not_text_is_not_a_result(tmp_path, capsys):
    (tmp_path / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert report.main([str(tmp_path / "plot.png")]) == 0
    assert "plot.png: not read: not a text file" in capsys.readouterr().out
