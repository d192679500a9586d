import json

import pytest
import torch

import kernels
from bench import backends
from bench import kernels as bench_kernels
from bench import profile
from bench.cases import Shapes
from bench.profile import Profile, fastest_verified
from gpt.model import GPTConfig, model_ops, preset
from gpt.optim import optimizer_ops
from tests.devices import interpreter_only


def backend(ms: float, verified: bool = True) -> dict:
    return {"ms": {"fwd": ms / 3, "fwd+bwd": ms}, "verified": verified, "check": "test"}


def entry(**backends) -> dict:
    return {"shape": "test", "training_pass": "fwd+bwd", "unit": "GB/s", "backends": backends}


def test_fastest_verified_wins():
    e = entry(torch=backend(3.0), compile=backend(2.0), triton=backend(1.0))
    assert fastest_verified(e, ["torch", "triton"], compiled=False) == (
        "triton", "fastest verified at fwd+bwd: triton 1 ms vs torch 3 ms")
    assert fastest_verified(e, ["torch", "triton"], compiled=True)[0] == "triton"


def test_faster_but_unverified_is_never_chosen():
    e = entry(torch=backend(3.0), compile=backend(2.0), triton=backend(1.0, verified=False))
    for compiled in (False, True):
        chosen, why = fastest_verified(e, ["torch", "triton"], compiled)
        assert chosen == "torch"
        assert "triton 1 ms faster but failed verification" in why


def test_compiled_models_time_torch_ops_as_inductor_runs_them():
    e = entry(torch=backend(3.0), compile=backend(0.5), triton=backend(1.0))
    assert fastest_verified(e, ["torch", "triton"], compiled=False)[0] == "triton"
    chosen, why = fastest_verified(e, ["torch", "triton"], compiled=True)
    assert chosen == "torch" and "compile 0.5 ms" in why


def test_torch_is_the_reference_and_always_eligible():
    e = entry(torch={**backend(3.0), "verified": False}, triton=backend(9.0, verified=False))
    assert fastest_verified(e, ["torch", "triton"], compiled=False)[0] == "torch"
    assert fastest_verified(entry(triton={"error": "boom", "verified": False}), ["torch", "triton"], False)[0] is None


def test_write_then_load(tmp_path):
    data = {"format": profile.FORMAT, "device": {"name": "test"}, "ops": {"swiglu": entry(torch=backend(1.0))}}
    path = tmp_path / "gpu.json"
    profile.write(data, path)
    loaded = profile.load(path)
    assert loaded.data == data and loaded.ops["swiglu"]["training_pass"] == "fwd+bwd"
    assert profile.load(tmp_path / "none.json") is None
    path.write_text(json.dumps({"format": 0}))
    with pytest.raises(ValueError, match="not a format-1 kernel profile"):
        profile.load(path)


@pytest.fixture
def self_check(monkeypatch):
    """Replace the self-check by a switchboard: op -> passes (so "cuda" choices run on CPU)."""
    results = {op: True for op in kernels.OPS}
    monkeypatch.setattr(profile, "self_check", lambda op, shapes, device_type: (
        results[op], "test shapes: " + ("fine" if results[op] else "wrong numbers")))
    return results


def fake_profile(**ops) -> Profile:
    return Profile("profiles/test.json", {"format": profile.FORMAT, "ops": ops})


def test_auto_takes_the_fastest_verified_backend_of_the_profile(self_check):
    prof = fake_profile(swiglu=entry(torch=backend(3.0), compile=backend(2.0), triton=backend(1.0)),
                        rms_norm=entry(torch=backend(3.0), compile=backend(2.0), triton=backend(1.0, False)),
                        attention=entry(torch=backend(1.0), compile=backend(1.0), triton=backend(2.0)))
    choices = kernels.choose("auto", "cuda", profile=prof)
    assert choices["swiglu"].backend == "triton"
    assert "profiles/test.json" in choices["swiglu"].reason and "self-check passed" in choices["swiglu"].reason
    assert choices["rms_norm"].backend == "torch" and "failed verification" in choices["rms_norm"].reason
    assert choices["attention"].backend == "torch" and "fastest verified" in choices["attention"].reason
    # Ops the profile does not cover take the no-profile path.
    assert choices["adamw"].backend == "triton" and "self-check passed" in choices["adamw"].reason


def test_a_profiled_triton_op_still_needs_the_self_check(self_check):
    self_check["swiglu"] = False
    prof = fake_profile(swiglu=entry(torch=backend(3.0), triton=backend(1.0)))
    choice = kernels.choose("auto", "cuda", profile=prof)["swiglu"]
    assert choice.backend == "torch" and "failed its self-check" in choice.reason


def test_no_profile_means_triton_where_the_self_check_passes(self_check):
    self_check["attention"] = False
    choices = kernels.choose("auto", "cuda", profile=None)
    assert choices["attention"].backend == "torch" and "wrong numbers" in choices["attention"].reason
    assert choices["layer_norm"].backend == "triton"
    assert "no profile for this GPU" in choices["layer_norm"].reason


def test_forced_triton_falls_back_with_a_warning(self_check):
    self_check["adamw"] = False
    with pytest.warns(UserWarning, match="kernels=triton: adamw falls back to torch"):
        choices = kernels.choose("triton", "cuda", profile=None)
    assert choices["adamw"].backend == "torch" and choices["swiglu"].backend == "triton"


def test_ops_the_run_does_not_call_are_left_unchecked(monkeypatch):
    """A GPT-2 run trained with torch's AdamW calls neither rms_norm, swiglu, rope nor adamw:
    they are not self-checked (each check compiles kernels) and the table says why."""
    checked = []
    monkeypatch.setattr(profile, "self_check", lambda op, shapes, device_type: (checked.append(op) or True, "fine"))
    used = model_ops(GPTConfig(**preset("gpt2"))) | optimizer_ops("adamw")
    assert used == {"layer_norm", "attention", "cross_entropy", "linear_cross_entropy", "grad_norm"}
    for mode in ("triton", "auto"):
        checked.clear()
        choices = kernels.choose(mode, "cuda", profile=None, used=used)
        assert sorted(checked) == sorted(used)
        for op in set(kernels.OPS) - used:
            assert choices[op] == kernels.Choice("torch", "not used by this run"), op


@interpreter_only
def test_self_check_in_the_interpreter_passes_at_the_models_kinds_of_layer():
    shapes = Shapes(GPTConfig(**(preset("llama") | dict(n_kv_head=4))), batch_size=12, dtype=torch.float32)
    choices = kernels.choose("triton", "cpu", shapes=shapes)
    assert {c.backend for c in choices.values()} == {"triton"}
    assert "heads 2/1" in choices["attention"].reason  # tiny, and grouped-query like the model


@interpreter_only
def test_self_check_failure_falls_back_to_torch():
    # A head size the Triton attention does not support (80): the model still trains, on torch.
    shapes = Shapes(GPTConfig(n_layer=2, n_head=2, n_embd=160, block_size=32, vocab_size=64), 2,
                    dtype=torch.float32)
    with pytest.warns(UserWarning, match="attention falls back to torch"):
        choices = kernels.choose("triton", "cpu", shapes=shapes)
    assert choices["attention"].backend == "torch" and "head dims" in choices["attention"].reason
    assert choices["layer_norm"].backend == "triton"


def test_profile_rows_for_the_table():
    ops = {"swiglu": entry(torch={**backend(2.0), "rate": {"fwd": 1.0, "fwd+bwd": 2.0},
                                  "roofline": {"fwd": 0.1, "fwd+bwd": 0.2}},
                           triton={"error": "boom", "verified": False, "check": "x"})}
    rows = bench_kernels.rows(ops)
    assert [(r.backend, r.pass_) for r in rows] == [("torch", "fwd"), ("torch", "fwd+bwd")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_bench_kernels_on_cpu_says_what_to_run(capsys):
    assert bench_kernels.main(["--gpu", "auto"]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


@interpreter_only
def test_measure_op_writes_a_profile_entry_that_loads_and_selects(monkeypatch, tmp_path, self_check):
    """bench.kernels' per-op path on CPU, with do_bench's timing replaced by a fixed 0.5 ms and
    no torch.compile variant (Inductor's CPU compile is slow): checks, rates, rooflines, choice."""
    monkeypatch.setattr(backends, "median_ms", lambda fn: (fn(), 0.5)[1])
    monkeypatch.setattr(bench_kernels, "implementations",
                        lambda op: {b: kernels.get(op, b) for b in ("torch", "triton")})
    shapes = Shapes(GPTConfig(**preset("gpt2")), 1, dtype=torch.float32).tiny()
    rooflines = {"copy_gbs": 100.0, "matmul_tflops": 10.0}
    ops = {op: bench_kernels.measure_op(op, shapes, rooflines, device="cpu") for op in ("layer_norm", "adamw")}
    norm = ops["layer_norm"]
    assert norm["training_pass"] == "fwd+bwd" and norm["backends"]["triton"]["verified"]
    # tiny, fp32, pre-norm (the residual add fused in): x and the residual (16 tokens x 64), weight
    # and bias read, y and the sum written
    fwd_bytes = (4 * 16 + 2) * 64 * 4
    assert norm["backends"]["torch"]["rate"]["fwd"] == pytest.approx(fwd_bytes / 0.5 / 1e6)
    assert norm["backends"]["torch"]["roofline"]["fwd"] == pytest.approx(fwd_bytes / 0.5 / 1e6 / 100.0)
    assert norm["chosen"] == {"eager": "torch", "compiled": "torch"}  # a tie keeps the reference
    assert ops["adamw"]["training_pass"] == "step" and "compile" not in ops["adamw"]["backends"]
    path = tmp_path / "cpu.json"
    profile.write({"format": profile.FORMAT, "ops": ops}, path)
    assert kernels.choose("auto", "cuda", profile=path)["layer_norm"].backend == "torch"


def test_a_compiled_torch_op_that_failed_verification_is_not_chosen():
    """In a compiled model torch is timed by Inductor's compile of it: where that failed its
    check, the verified triton wins though slower; where everything measured failed, torch."""
    e = entry(torch=backend(1.0), compile=backend(0.5, verified=False), triton=backend(0.8))
    chosen, why = fastest_verified(e, ["torch", "triton"], compiled=True)
    assert chosen == "triton" and "compile 0.5 ms faster but failed verification" in why
    assert fastest_verified(e, ["torch", "triton"], compiled=False)[0] == "triton"
    failed = entry(torch={"error": "out of memory"}, triton=backend(0.5, verified=False))
    assert fastest_verified(failed, ["torch", "triton"], compiled=False) == (
        "torch", "nothing measured at fwd+bwd passed verification (triton 0.5 ms): torch, the reference")


def test_reasons_say_what_the_profile_measured_and_lacks(self_check):
    prof = Profile("profiles/test.json", {"format": profile.FORMAT, "torch": "2.11.0",
                                          "workload": {"preset": "gpt2", "dtype": "bfloat16", "batch_size": 16,
                                                       "seq_len": 1024},
                                          "ops": {"swiglu": entry(torch={"error": "oom"}, triton=backend(1.0, False))}})
    choices = kernels.choose("auto", "cuda", profile=prof)
    assert choices["swiglu"].backend == "torch" and "failed verification" not in choices["swiglu"].reason
    assert choices["swiglu"].reason.startswith("profiles/test.json (gpt2 bfloat16 16x1024, torch 2.11.0): nothing")
    assert choices["rms_norm"].reason.startswith("profiles/test.json (gpt2 bfloat16 16x1024, torch 2.11.0) has no "
                                                 "entry for rms_norm; self-check passed")


@pytest.mark.parametrize("text, problem", [
    ('{"format": 1, "ops": {"swi', "not JSON"),
    ("[]", "not a format-1 kernel profile"),
    ('{"format": 1, "ops": null}', "not a format-1 kernel profile"),
    ('{"format": 1, "ops": {"swiglu": {"backends": {}}}}', "ops.swiglu lacks"),
    ('{"format": 1, "ops": {"swiglu": {"training_pass": "fwd+bwd", "backends": {"torch": {"ms": {"fwd": 1}}}}}}',
     "ops.swiglu lacks"),
])
def test_a_broken_profile_is_a_value_error_that_train_py_reports(tmp_path, text, problem, monkeypatch):
    path = tmp_path / "gpu.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"gpu.json: {problem}"):
        profile.load(path)
    import train

    monkeypatch.setattr(train.kernels, "choose", lambda *a, **k: profile.load(path))
    with pytest.raises(SystemExit, match=f"train.py: kernels=auto: .*gpu.json: {problem}"):
        train.main(["--device=cpu", "--compile=False", f"--data_dir={tmp_path}"])


def test_ranks_that_chose_differently_all_take_torch():
    choices = {"swiglu": kernels.Choice("triton", "self-check passed"), "rms_norm": kernels.Choice("triton", "ok")}
    agreed = kernels.agreed(choices, [{"swiglu": "triton", "rms_norm": "triton"},
                                      {"swiglu": "torch", "rms_norm": "triton"}])
    assert agreed["rms_norm"] == choices["rms_norm"]
    assert agreed["swiglu"] == kernels.Choice("torch", "the ranks chose differently (triton, torch): torch on every rank")


def test_the_gpu_self_check_caps_the_sequence():
    """The float64 reference attention at T = 16k would need 25 GB for GPT-2's 12 heads."""
    shapes = Shapes(GPTConfig(**preset("gpt2")), 8, seq_len=16384)
    checked = profile.check_shapes(shapes, "cuda")
    assert (checked.batch_size, checked.T) == (1, profile.CHECK_SEQ_LEN)


def test_bench_kernels_refuses_to_overwrite_the_profile_with_some_ops(monkeypatch, capsys):
    from bench.hardware import Device, find

    monkeypatch.setattr(bench_kernels, "detect", lambda: Device(0, "NVIDIA H100 80GB HBM3", 132, 80, (9, 0)))
    monkeypatch.setattr(bench_kernels, "run", lambda *a: pytest.fail("measured"))
    assert find("h100") is not None
    assert bench_kernels.main(["--ops", "rms_norm"]) == 2
    assert "pass --out" in capsys.readouterr().err
