import dataclasses
import json
import re
import threading
import time
import types

import pytest
import torch

import kernels
from bench import backends, measure, write_json
from bench import kernels as bench_kernels
from bench import profile
from bench.cases import Case, Shapes, case, check
from bench.hardware import find
from bench.profile import Profile, fastest_verified, launched_compiled
from gpt.model import GPTConfig, model_ops, preset
from gpt.optim import optimizer_ops
from kernels import adamw, runtime
from tests.devices import A100, H100, cuda_only, interpreter_only


def backend(ms: float, verified: bool = True) -> dict:
    return {"ms": {"fwd": ms / 3, "fwd+bwd": ms}, "verified": verified, "check": "test"}


def entry(**backends) -> dict:
    return {"shape": "test", "training_pass": "fwd+bwd", "unit": "GB/s", "backends": backends}


def record(ops: dict, preset_name: str = "gpt2", slug: str = "test", **shapes) -> dict:
    """One workload's measurement in a profile: `preset_name`'s shapes, 16 sequences, bf16."""
    shapes = Shapes(GPTConfig(**preset(preset_name)), shapes.pop("batch_size", 16), **shapes)
    return {"workload": profile.workload(preset_name, shapes), "device": {"name": "test", "slug": slug},
            "torch": "2.11.0", "kernels_source": profile.kernels_source(), "ops": ops}


def profile_data(*records: dict) -> dict:
    return {"format": profile.FORMAT, "workloads": list(records)}


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


def test_a_slower_unverified_backend_is_not_named_faster():
    e = entry(torch=backend(3.0), triton=backend(5.0, verified=False))
    assert fastest_verified(e, ["torch", "triton"], compiled=False) == (
        "torch", "fastest verified at fwd+bwd: torch 3 ms")


def test_compiled_models_time_torch_ops_as_inductor_runs_them():
    e = entry(torch=backend(3.0), compile=backend(0.5), triton=backend(1.0))
    assert fastest_verified(e, ["torch", "triton"], compiled=False)[0] == "triton"
    chosen, why = fastest_verified(e, ["torch", "triton"], compiled=True)
    assert chosen == "torch" and "compile 0.5 ms" in why


def test_eagerly_a_pass_costs_its_hosts_time_where_that_is_longer():
    slow_host = {**backend(1.0), "host_ms": {"fwd": 0.5, "fwd+bwd": 4.0}}
    e = entry(torch={**backend(3.0), "host_ms": {"fwd+bwd": 1.0}}, compile=backend(2.0), triton=slow_host)
    assert fastest_verified(e, ["torch", "triton"], compiled=False) == (
        "torch", "fastest verified at fwd+bwd: torch 3 ms vs triton 4 ms")
    assert fastest_verified(e, ["torch", "triton"], compiled=True)[0] == "triton"


def test_generation_goes_by_the_forward_timings():
    """gpt.sample runs no backward: a backend fastest forward and backward but slower forward is
    not its pick. An op timed at its step (the optimizer's) has no forward: its step counts."""
    e = entry(torch={**backend(3.0), "ms": {"fwd": 0.2, "fwd+bwd": 3.0}}, triton=backend(1.0))
    assert fastest_verified(e, ["torch", "triton"], compiled=False)[0] == "triton"
    assert fastest_verified(e, ["torch", "triton"], compiled=False, generation=True) == (
        "torch", "fastest verified at fwd: torch 0.2 ms vs triton 0.333 ms")
    step = {"shape": "test", "training_pass": "step", "unit": "GB/s",
            "backends": {"torch": {"ms": {"step": 2.0}}, "triton": {"ms": {"step": 1.0}, "verified": True}}}
    assert fastest_verified(step, ["torch", "triton"], False, generation=True)[0] == "triton"


def test_torch_is_the_reference_and_always_eligible():
    e = entry(torch={**backend(3.0), "verified": False}, triton=backend(9.0, verified=False))
    assert fastest_verified(e, ["torch", "triton"], compiled=False)[0] == "torch"
    assert fastest_verified(entry(triton={"error": "boom", "verified": False}), ["torch", "triton"], False)[0] is None


def test_write_then_load(tmp_path):
    data = profile_data(record({"swiglu": entry(torch=backend(1.0))}))
    path = tmp_path / "gpu.json"
    write_json(path, data)
    loaded = profile.load(path)
    assert loaded.data == data and loaded.workloads[0]["ops"]["swiglu"]["training_pass"] == "fwd+bwd"
    assert profile.load(tmp_path / "none.json") is None
    path.write_text(json.dumps({"format": 1, "ops": {}}))  # one workload a GPU, before workloads were kept apart
    with pytest.raises(ValueError, match="not a format-2 kernel profile"):
        profile.load(path)


@pytest.fixture
def self_check(monkeypatch):
    """Replace the self-check by a switchboard: op -> passes (so "cuda" choices run on CPU)."""
    results = {op: True for op in kernels.OPS}
    monkeypatch.setattr(profile, "self_check", lambda op, shapes, device_type, *_: (
        results[op], "test shapes: " + ("fine" if results[op] else "wrong numbers")))
    return results


def fake_profile(**ops) -> Profile:
    return Profile("profiles/test.json", profile_data(record(ops)))


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


def test_the_device_may_be_given_as_a_device_or_with_its_index(self_check):
    """"cuda:1" and torch.device("cuda") are the GPU, not read as the CPU by comparison with
    "cuda"; a string that is no device, a `used` given as one op's name and shapes of a dtype
    given by name are ValueErrors."""
    prof = fake_profile(swiglu=entry(torch=backend(3.0), compile=backend(2.0), triton=backend(1.0)))
    expected = kernels.choose("auto", "cuda", profile=prof)
    assert expected["swiglu"].backend == "triton"
    for device in ("cuda:1", torch.device("cuda"), torch.device("cuda", 0)):
        assert kernels.choose("auto", device, profile=prof) == expected, device
    with pytest.raises(ValueError, match="device_type must be a device"):
        kernels.choose("auto", "gpu")
    with pytest.raises(ValueError, match="used must be a collection of op names"):
        kernels.choose("triton", "cuda", used="linear_cross_entropy")
    with pytest.raises(ValueError, match="Shapes: dtype must be a torch.dtype"):
        Shapes(GPTConfig(), 1, dtype="float32")


def test_generation_chooses_by_the_profile_s_forward_timings(self_check):
    prof = fake_profile(swiglu=entry(torch={**backend(3.0), "ms": {"fwd": 0.2, "fwd+bwd": 3.0}}, triton=backend(1.0)))
    assert kernels.choose("auto", "cuda", profile=prof)["swiglu"].backend == "triton"
    choice = kernels.choose("auto", "cuda", profile=prof, generation=True)["swiglu"]
    assert choice.backend == "torch" and "fastest verified at fwd: torch" in choice.reason


def test_a_profiled_triton_op_still_needs_the_self_check(self_check):
    self_check["swiglu"] = False
    prof = fake_profile(swiglu=entry(torch=backend(3.0), triton=backend(1.0)))
    with pytest.warns(UserWarning, match="kernels=auto: swiglu falls back to torch"):
        choice = kernels.choose("auto", "cuda", profile=prof)["swiglu"]
    assert choice.backend == "torch" and "failed its self-check" in choice.reason


def test_no_profile_means_triton_where_the_self_check_passes(self_check):
    self_check["attention"] = False
    with pytest.warns(UserWarning, match="kernels=auto: attention falls back to torch"):
        choices = kernels.choose("auto", "cuda", profile=None)
    assert choices["attention"].backend == "torch" and "wrong numbers" in choices["attention"].reason
    assert choices["layer_norm"].backend == "triton"
    assert "no profile for this GPU" in choices["layer_norm"].reason


def test_forced_triton_falls_back_with_a_warning(self_check):
    self_check["adamw"] = False
    with pytest.warns(UserWarning, match="kernels=triton: adamw falls back to torch"):
        choices = kernels.choose("triton", "cuda", profile=None)
    assert choices["adamw"].backend == "torch" and choices["swiglu"].backend == "triton"


def test_gpus_the_kernels_are_not_written_for_are_refused(monkeypatch):
    """Triton supports NVIDIA's Ampere (compute capability 8.0) and newer; the kernels are tuned
    for those alone. On a Turing or Volta card, or an AMD GPU under ROCm, every triton backend
    refuses the tensors with a ValueError naming the op, "auto" takes torch for every op without
    compiling a self-check, and "triton" tries and falls back with a warning."""
    gpu_tensor = types.SimpleNamespace(device=torch.device("cuda", 0))  # all check_device reads
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    for cc in ((8, 0), (8, 9), (9, 0), (12, 0)):
        monkeypatch.setattr(runtime, "capability", lambda device, cc=cc: cc)
        runtime.check_device("swiglu", gpu_tensor)
    monkeypatch.setattr(torch.version, "hip", "6.4")
    with pytest.raises(ValueError, match="swiglu: the triton backends are written and tuned for NVIDIA GPUs, and "
                                         "cuda:0 is a ROCm one: use the torch backend"):
        runtime.check_device("swiglu", gpu_tensor)
    assert "ROCm" in kernels.choose("auto", "cuda")["swiglu"].reason
    monkeypatch.setattr(torch.version, "hip", None)
    for cc in ((7, 5), (7, 0)):
        monkeypatch.setattr(runtime, "capability", lambda device, cc=cc: cc)
        with pytest.raises(ValueError, match=rf"swiglu: the triton backends need a GPU of compute capability 8.0 "
                                             rf"or newer \(the ones Triton supports\), cuda:0 is {cc[0]}.{cc[1]}: "
                                             rf"use the torch backend"):
            runtime.check_device("swiglu", gpu_tensor)
    checked = []
    monkeypatch.setattr(profile, "self_check",
                        lambda op, shapes, device_type, *_: checked.append(op) or (False, "ValueError: cuda is 7.5"))
    choices = kernels.choose("auto", "cuda")
    assert checked == [] and {c.backend for c in choices.values()} == {"torch"}
    assert "compute capability 8.0 or newer" in choices["attention"].reason and "is 7.0" in choices["attention"].reason
    with pytest.warns(UserWarning) as warned:
        choices = kernels.choose("triton", "cuda", profile=None)
    assert {c.backend for c in choices.values()} == {"torch"} and set(checked) == set(kernels.OPS)
    assert len(warned) == len(kernels.OPS) and all("falls back to torch" in str(w.message) for w in warned)


def test_auto_on_a_gpu_takes_torch_where_triton_would_run_in_its_interpreter(monkeypatch):
    """A TRITON_INTERPRET left set on a GPU machine runs the kernels on the host, for tests: auto,
    for speed, takes torch saying why, checking nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(runtime, "capability", lambda device: (9, 0))
    monkeypatch.setattr(runtime, "INTERPRET", True)
    monkeypatch.setattr(profile, "self_check", lambda *args: pytest.fail("self-checked"))
    choices = kernels.choose("auto", "cuda")
    assert all(c == kernels.Choice("torch", f"auto: {kernels.select.INTERPRETED_ON_A_GPU}") for c in choices.values())


def test_the_gpu_check_stays_out_of_compiled_graphs(monkeypatch):
    """Traced by torch.compile, the device rule reads no GPU properties (Dynamo would trace their
    cache and warn of it, on every compile on a GPU)."""
    gpu_tensor = types.SimpleNamespace(device=torch.device("cuda", 0))  # all check_device reads
    monkeypatch.setattr(runtime, "capability", lambda device: pytest.fail("read a GPU's properties while tracing"))

    def f(x):
        runtime.check_device("swiglu", gpu_tensor)
        return x + 1
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(torch.ones(2)), torch.full((2,), 2.0))


@cuda_only
@pytest.mark.parametrize("op", kernels.OPS)
def test_each_triton_op_refuses_a_gpu_older_than_triton_supports(op, monkeypatch):
    monkeypatch.setattr(runtime, "capability", lambda device: (7, 5))
    adamw._plan.cache_clear()  # the optimizer's ops check devices once per pointer table
    c = case(op, Shapes(GPTConfig(**preset("llama")), batch_size=1, seq_len=64), "cuda", quick=True)
    with pytest.raises(ValueError, match=f"{op}: the triton backends need a GPU of compute capability 8.0"):
        c.call(kernels.get(op, "triton"), c.make(), c.passes[-1])


def test_ops_the_run_does_not_call_are_left_unchecked(monkeypatch):
    """A GPT-2 run trained with torch's AdamW calls neither rms_norm, swiglu, rope, adamw nor
    cross_entropy (its loss is the fused one): they are not self-checked (each check compiles
    kernels) and the table says why."""
    checked = []
    monkeypatch.setattr(profile, "self_check", lambda op, shapes, device_type, *_: (checked.append(op) or True, "fine"))
    used = model_ops(GPTConfig(**preset("gpt2"))) | optimizer_ops("adamw")
    assert used == {"layer_norm", "attention", "linear_cross_entropy", "grad_norm"}
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
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_the_self_check_runs_backward_whatever_the_callers_grad_mode(mode, monkeypatch):
    """Kernels chosen under no_grad or inference_mode (a script about to generate) are checked
    forward and backward all the same: the backward failed there, and every op fell back to torch
    for the rest of the process (the failure cached)."""
    monkeypatch.setattr(profile, "_checked", {})
    with mode():
        choices = kernels.choose("triton", "cpu", used={"rms_norm", "swiglu"})
    assert choices["rms_norm"].backend == choices["swiglu"].backend == "triton", choices


def test_self_checks_from_threads_at_once_run_one_at_a_time(monkeypatch):
    """Two threads choosing kernels at once run a check of an op once (the second waits for the
    first's verdict), and never two checks side by side."""
    running, ran = [], []

    def check(op, shapes, device_type, backend):
        running.append(op)
        ran.append(len(running))
        time.sleep(0.2)
        running.remove(op)
        return True, "fine"
    monkeypatch.setattr(profile, "_checked", {})
    monkeypatch.setattr(profile, "_check", check)
    shapes = Shapes(GPTConfig(**preset("gpt2")), batch_size=1, dtype=torch.float32)
    threads = [threading.Thread(target=profile.self_check, args=(op, shapes, "cpu"))
               for op in ("rms_norm", "rms_norm", "swiglu")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ran) == [1, 1]


@interpreter_only
def test_the_norms_self_check_runs_every_form_the_model_calls(monkeypatch):
    """Plain and with the residual add (and its dropout), in the run's dtype and as under autocast
    with fp32 weights and stream (train.py's adamw runs): a layer_norm wrong only where out_dtype
    is given (autocast's calls) fails it, whichever form the blocks use."""
    triton = kernels.get("layer_norm", "triton")

    def wrong_under_autocast(x, w, b, eps, residual=None, out_dtype=None, dropout_p=0.0):
        out = triton(x, w, b, eps, residual=residual, out_dtype=out_dtype, dropout_p=dropout_p)
        if out_dtype is None:
            return out
        return (out[0] * 1.5, out[1]) if residual is not None else out * 1.5
    config = GPTConfig(**(preset("gpt2") | dict(dropout=0.1)))
    shapes = Shapes(config, batch_size=1, dtype=torch.bfloat16)
    monkeypatch.setattr(profile, "_checked", {})
    ok, why = profile.self_check("layer_norm", shapes, "cpu")
    assert ok and "in 4 forms" in why
    monkeypatch.setattr(profile, "_checked", {})
    monkeypatch.setitem(kernels.registry._impls["layer_norm"], "triton", wrong_under_autocast)
    ok, why = profile.self_check("layer_norm", shapes, "cpu")
    assert not ok and "fp32 weights+stream" in why


@interpreter_only
@pytest.mark.parametrize("op", ["layer_norm", "attention"])
def test_the_self_check_draws_from_a_generator_of_its_own(op, monkeypatch):
    """The check's inputs and dropout seeds come from its own generator: torch's, drawn from by
    another thread meanwhile (here before each of the kernel's calls), draw on as without the
    check. It reseeded them before each call and restored them after: the other thread drew the
    same numbers again, and a draw of its between a seeding and the kernel's own changed the
    check's masks, and failed it."""
    monkeypatch.setattr(torch, "manual_seed", lambda seed: pytest.fail("torch.manual_seed seeds every device"))
    monkeypatch.setattr(profile, "_checked", {})
    triton, drawn = kernels.get(op, "triton"), []

    def beside_another_thread(*args, **kwargs):
        drawn.append(torch.rand(1))
        return triton(*args, **kwargs)
    monkeypatch.setitem(kernels.registry._impls[op], "triton", beside_another_thread)
    shapes = Shapes(GPTConfig(**(preset("gpt2") | dict(dropout=0.1))), batch_size=1, dtype=torch.float32)
    state = torch.get_rng_state()
    ok, why = profile.self_check(op, shapes, "cpu")
    assert ok, why
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    assert drawn and torch.equal(torch.cat(drawn), torch.rand(len(drawn)))
    assert torch.equal(torch.get_rng_state(), after)


@interpreter_only
@pytest.mark.parametrize("op", ["linear_cross_entropy", "grad_norm"])
def test_the_self_check_runs_the_loss_and_the_grad_norm_as_fp32_weights_call_them(monkeypatch, op):
    """train.py's default (adamw: fp32 weights, bf16 autocast) calls the loss with the lm head's
    fp32 weight under autocast and the gradient norm over fp32 grads: the self-check runs those
    forms beside the pure-bf16 ones, so a backend wrong only there fails it."""
    triton = kernels.get(op, "triton")

    def wrong_for_fp32(*args, **kwargs):
        tensors = args[1:2] if op == "linear_cross_entropy" else args[0]
        return triton(*args, **kwargs) * (1.5 if tensors[0].dtype == torch.float32 else 1.0)
    shapes = Shapes(GPTConfig(**preset("gpt2")), batch_size=1, dtype=torch.bfloat16)
    monkeypatch.setattr(profile, "_checked", {})
    assert profile.self_check(op, shapes, "cpu")[0]
    monkeypatch.setattr(profile, "_checked", {})
    monkeypatch.setitem(kernels.registry._impls[op], "triton", wrong_for_fp32)
    ok, why = profile.self_check(op, shapes, "cpu")
    assert not ok and ("fp32 weight, autocast" if op == "linear_cross_entropy" else "float32") in why


@interpreter_only
def test_a_self_check_out_of_memory_fails_and_is_checked_again(monkeypatch):
    """A check that ran out of memory (the GPU full of another run's model) says nothing of the
    kernel: the op falls back to torch this time, and the next choice in the process checks it
    again. Kept, it fell back for the rest of the process. A profile's check (bench.cases.check)
    records it as a failure, on one line as the warning has it (torch's message runs to several)."""
    triton, calls = kernels.get("rms_norm", "triton"), []

    def full_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore of torch's text")
        return triton(*args, **kwargs)
    monkeypatch.setattr(profile, "_checked", {})
    monkeypatch.setitem(kernels.registry._impls["rms_norm"], "triton", full_once)
    with pytest.warns(UserWarning, match="rms_norm falls back to torch"):
        choices = kernels.choose("triton", "cpu", used={"rms_norm"})
    assert "out of memory (CUDA out of memory. Tried" in choices["rms_norm"].reason
    assert kernels.choose("triton", "cpu", used={"rms_norm"})["rms_norm"].backend == "triton"
    calls.clear()
    shapes = Shapes(GPTConfig(**preset("llama")), batch_size=1, dtype=torch.float32).tiny()
    ok, why = check(case("rms_norm", shapes, "cpu", quick=True), full_once, kernels.get("rms_norm", "torch"))
    assert (ok, why) == (False, "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB.)")  # one line


def test_the_optimizers_check_sees_a_step_that_does_nothing():
    """The adamw case's update is of the order of the weights: a step that updates nothing, or
    at half the learning rate, fails the check (at train.py's lr it was inside bf16's rounding)."""
    config = GPTConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=64, block_size=16)
    c = case("adamw", Shapes(config, batch_size=1), "cpu", quick=True)
    reference = kernels.get("adamw", "torch")
    assert check(c, reference, reference)[0]
    half = lambda p, g, m, v, lr, **kw: reference(p, g, m, v, lr=lr / 2, **kw)  # noqa: E731
    for wrong in (lambda *args, **kwargs: None, half):
        assert not check(c, wrong, reference)[0]


def test_the_check_holds_each_result_to_its_bound_and_reports_the_worst():
    """fp32 results torch gets exact (bound: the 1e-6 floor): 1.5x the bound fails, whichever
    result it is; the margin reported is the worst result's, not the last one's."""
    identity = lambda x: (x.clone(), x.clone())  # noqa: E731
    c = Case("two", "4096", ("fwd",), lambda: [torch.randn(4096)], lambda fn, inputs, pass_: fn(*inputs),
             {"fwd": 1}, "GB/s", torch.float32)
    off = lambda first, second: lambda x: (x * (1 + first), x * (1 + second))  # noqa: E731
    assert not check(c, off(1.5e-6, 0.0), identity)[0] and not check(c, off(0.0, 1.5e-6), identity)[0]
    ok, text = check(c, off(0.8e-6, 0.2e-6), identity)
    assert ok and re.fullmatch(r"error at most (7[5-9]|8[0-5])% of the bound", text), text


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
    assert [(r.backend, r.pass_, r.error) for r in rows] == [("torch", "fwd", None), ("torch", "fwd+bwd", None),
                                                             ("triton", "fwd+bwd", "boom")]


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
    write_json(path, profile_data(record(ops)))
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
    prof = fake_profile(swiglu=entry(torch={"error": "oom"}, triton=backend(1.0, False)))
    choices = kernels.choose("auto", "cuda", profile=prof)
    assert choices["swiglu"].backend == "torch" and "failed verification" not in choices["swiglu"].reason
    assert choices["swiglu"].reason.startswith("profiles/test.json (gpt2 bfloat16 16x1024, torch 2.11.0): nothing")
    assert choices["rms_norm"].reason.startswith("profiles/test.json has no entry for rms_norm; self-check passed")


def _broken(**changes) -> str:
    """A one-workload profile's JSON with `changes` made to its record (None deletes a key)."""
    rec = record({"swiglu": entry(torch=backend(1.0))})
    for key, value in changes.items():
        rec.pop(key) if value is None else rec.update({key: value})
    return json.dumps(profile_data(rec))


WORKLOAD = record({})["workload"]


@pytest.mark.parametrize("text, problem", [
    ('{"format": 2, "workloads": [{"swi', "not JSON"),
    ("[]", "not a format-2 kernel profile"),
    ('{"format": 2, "workloads": []}', "not a format-2 kernel profile"),
    ('{"format": 2, "workloads": [null]}', "not a format-2 kernel profile"),
    (_broken(ops=None), r"workloads\[0\]: no ops"),
    (_broken(workload={"preset": "gpt2"}), r"workloads\[0\]: its workload or device is not readable \(KeyError"),
    (_broken(workload={**record({})["workload"], "batch_size": 0}), r"workloads\[0\]: .*batch_size and seq_len"),
    (_broken(workload={**record({})["workload"], "config": {"n_head": 5}}), r"workloads\[0\]: .*ValueError: GPTConfig"),
    (_broken(device={"name": "x"}), r"workloads\[0\]: .*no device slug"),
    (_broken(device="h100"), r"workloads\[0\]: .*AttributeError"),
    (_broken(ops={"swiglu": {"backends": {}}}), r"workloads\[0\]: ops.swiglu lacks"),
    (_broken(ops={"swiglu": {"training_pass": "fwd+bwd", "backends": {"torch": {"ms": {"fwd": 1}}}}}),
     r"workloads\[0\]: ops.swiglu lacks"),
    *((_broken(ops={"swiglu": entry(torch={**backend(1.0), **bad})}), r"workloads\[0\]: ops.swiglu lacks")
      for bad in ({"ms": {"fwd+bwd": None}}, {"host_ms": {"fwd+bwd": "1"}}, {"verified": "false"})),
    (_broken(workload={**WORKLOAD, "config": {**WORKLOAD["config"], "vocab_size": "50304"}}),
     r"workloads\[0\]: its workload or device is not readable \(ValueError: GPTConfig: vocab_size must be an int"),
    (_broken(workload={k: v for k, v in WORKLOAD.items() if k != "preset"}),  # (the reasons name it)
     r"workloads\[0\]: its workload or device is not readable \(KeyError: 'preset'"),
], ids=["json", "list", "empty", "null", "no-ops", "no-config", "batch", "config", "slug", "device", "backends",
         "timings", "null-ms", "text-host-ms", "text-verified", "text-vocab", "no-preset"])
def test_a_broken_profile_is_a_value_error_that_train_py_reports(tmp_path, text, problem, monkeypatch):
    path = tmp_path / "gpu.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"gpu.json: {problem}"):
        profile.load(path)
    import train

    monkeypatch.setattr(train.kernels, "choose", lambda *a, **k: profile.load(path))
    with pytest.raises(SystemExit, match=f"train.py: kernels=auto: .*gpu.json: {problem}"):
        train.main(["--device=cpu", "--compile=False", f"--data_dir={tmp_path}"])


def test_a_profile_of_other_kernel_sources_is_used_with_a_warning(self_check):
    """A record that timed other kernels (or does not say which) still picks, its reasons marked
    stale, and the run is told once."""
    ops = dict(swiglu=entry(torch=backend(3.0), compile=backend(2.0), triton=backend(1.0)),
               rms_norm=entry(torch=backend(3.0), compile=backend(2.0), triton=backend(1.0)))
    old = {**record(ops), "kernels_source": "0" * 16}
    with pytest.warns(UserWarning, match="kernels=auto: profiles/test.json timed other kernel sources") as caught:
        choices = kernels.choose("auto", "cuda", profile=Profile("profiles/test.json", profile_data(old)))
    assert len(caught) == 1 and "stale" in choices["swiglu"].reason and choices["swiglu"].backend == "triton"


def test_another_gpus_profile_under_this_gpus_name_is_refused(monkeypatch, tmp_path):
    """profiles/<this slug>.json holding another GPU's records (copied or renamed there)."""
    _on_a_gpu(monkeypatch, tmp_path, {0: "h100-pcie"})
    write_json(tmp_path / "h100-pcie.json", profile_data(record({}, slug="h200-sxm")))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(ValueError, match="holds measurements of h200-sxm, not of this GPU .h100-pcie.: rerun"):
        profile.for_this_gpu()


def test_a_profile_path_that_is_not_there_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="kernels: no profile at .*typo.json"):
        kernels.choose("auto", "cuda", profile=tmp_path / "typo.json")


def test_auto_warns_when_the_self_check_fails(self_check):
    self_check["swiglu"] = False
    with pytest.warns(UserWarning, match="kernels=auto: swiglu falls back to torch"):
        choices = kernels.choose("auto", "cuda", profile=None)
    assert choices["swiglu"].backend == "torch"


def test_the_optimizers_ops_cost_their_hosts_time_in_a_compiled_model_too():
    """adamw and grad_norm run outside the compiled graph: launched eagerly whatever the model."""
    e = entry(torch={**backend(1.0), "host_ms": {"fwd+bwd": 3.0}}, triton=backend(1.5))
    in_graph = launched_compiled("attention", True)
    assert fastest_verified(e, ["torch", "triton"], compiled=in_graph)[0] == "torch"
    for op in ("adamw", "grad_norm"):
        assert fastest_verified(e, ["torch", "triton"], compiled=launched_compiled(op, True))[0] == "triton"


def test_ranks_that_chose_differently_all_take_torch():
    choices = {"swiglu": kernels.Choice("triton", "self-check passed"), "rms_norm": kernels.Choice("triton", "ok")}
    agreed = kernels.agreed(choices, [{"swiglu": "triton", "rms_norm": "triton"},
                                      {"swiglu": "torch", "rms_norm": "triton"}])
    assert agreed["rms_norm"] == choices["rms_norm"]
    assert agreed["swiglu"] == kernels.Choice("torch", "the ranks chose differently (triton, torch): torch on every rank")


def test_the_gpu_self_check_caps_the_sequence_and_attentions_heads():
    """The float64 reference attention at T = 16k would need 25 GB for GPT-2's 12 heads, and 4.3
    GB at 4096 for 32: attention is checked on one key/value head's group of query heads, which
    its launch configurations do not depend on (T, the head size and the group they do)."""
    config = GPTConfig(**(preset("llama") | dict(n_embd=4096, n_head=32, n_kv_head=8, dropout=0.1)))
    shapes = Shapes(config, 8, seq_len=16384)
    checked = profile.check_shapes("swiglu", shapes, "cuda")
    assert (checked.config, checked.batch_size, checked.T, checked.dtype) == (config, 1, 4096, shapes.dtype)
    attention = profile.check_shapes("attention", shapes, "cuda")
    c = attention.config
    assert (c.n_head, c.n_kv_head, c.head_dim, c.n_embd, attention.T) == (4, 1, 128, 512, 4096)
    assert (c.dropout, c.pos_encoding, c.rope_theta, attention.dtype) == (0.1, "rope", config.rope_theta, shapes.dtype)


def test_bench_kernels_refuses_to_overwrite_the_profile_with_some_ops(monkeypatch, capsys):
    monkeypatch.setattr(bench_kernels, "detect", lambda: H100)
    monkeypatch.setattr(bench_kernels, "run", lambda *a: pytest.fail("measured"))
    assert find("h100") is not None
    assert bench_kernels.main(["--ops", "rms_norm"]) == 2
    assert "pass --out" in capsys.readouterr().err


def test_a_run_takes_each_op_from_the_workload_nearest_its_shapes(self_check):
    """gpt2 (learned positions, layer norm) and llama (RoPE, rms norm, swiglu) measured on one
    GPU: attention's fastest backend differs between them, and each run takes its own."""
    gpt2 = record({"attention": entry(torch=backend(1.0), triton=backend(2.0)),
                   "layer_norm": entry(torch=backend(2.0), triton=backend(1.0))}, "gpt2")
    llama = record({"attention": entry(torch=backend(2.0), triton=backend(1.0)),
                    "swiglu": entry(torch=backend(1.0), triton=backend(2.0))}, "llama", batch_size=4)
    prof = Profile("profiles/test.json", profile_data(gpt2, llama))
    for name, attention in (("gpt2", "torch"), ("llama", "triton")):
        shapes = Shapes(GPTConfig(**preset(name)), 8)
        choices = kernels.choose("auto", "cuda", shapes=shapes, profile=prof)
        assert choices["attention"].backend == attention, name
        assert choices["attention"].reason.startswith(f"profiles/test.json ({name} bfloat16 ")
        # An op measured at one workload only is taken from it, whatever the run.
        assert choices["layer_norm"].backend == "triton" and "(gpt2 bfloat16 16x1024" in choices["layer_norm"].reason
        assert choices["swiglu"].backend == "torch" and "(llama bfloat16 4x" in choices["swiglu"].reason


def test_nearness_is_dtype_then_the_op_s_kinds_then_its_sizes():
    gpt2 = Shapes(GPTConfig(**preset("gpt2")), 16)
    bf16, fp16 = record({}, "gpt2")["workload"], record({}, "gpt2", dtype=torch.float16)["workload"]
    llama = record({}, "llama")["workload"]
    for op in kernels.OPS:
        assert profile.distance(op, bf16, gpt2) == (False, 0, 0.0, False), op
        assert profile.distance(op, fp16, gpt2)[0]
        assert profile.distance(op, llama, gpt2) < profile.distance(op, fp16, gpt2)
    # Dropout is a kind for the ops that drop out only (another kernel runs): not for the loss.
    dropout = Shapes(GPTConfig(**(preset("gpt2") | {"dropout": 0.1})), 16)
    assert profile.distance("attention", bf16, dropout)[:2] == profile.distance("layer_norm", bf16, dropout)[:2] == (
        False, 1)
    assert profile.distance("linear_cross_entropy", bf16, dropout) == (False, 0, 0.0, True)  # (another model)
    # Same model, another batch and sequence: nearer than another model at the same batch and sequence.
    other_batch = Shapes(GPTConfig(**preset("gpt2")), 4, seq_len=512)
    assert (False, 0, 0.0, False) < profile.distance("attention", bf16, other_batch) < profile.distance(
        "attention", llama, other_batch)
    # The optimizer's ops see the parameters, whatever the batch.
    assert profile.distance("adamw", bf16, other_batch) == (False, 0, 0.0, False)
    # Of two records that ran an op alike, the one of the run's own model.
    assert profile.distance("rms_norm", llama, Shapes(GPTConfig(**preset("llama")), 16)) < profile.distance(
        "rms_norm", bf16, Shapes(GPTConfig(**preset("llama")), 16))


def test_each_op_is_taken_from_the_workload_that_ran_it_alike(self_check):
    """A run's op is compared with each record by what decides its speed alone: attention's
    RoPE (fused into the kernel), dropout only for the ops that drop out, and only its sizes.
    (The same rule for all ops took attention without RoPE from a llama record that timed it
    with RoPE, 2x slower there, and a GPT-2 loss from a 384-wide model's for its dropout.)"""
    gpt2 = record({"attention": entry(torch=backend(1.0), triton=backend(2.0)),
                   "linear_cross_entropy": entry(torch=backend(1.0), triton=backend(2.0))}, "gpt2")
    llama = record({"attention": entry(torch=backend(2.0), triton=backend(1.0))}, "llama")
    char = record({"linear_cross_entropy": entry(torch=backend(2.0), triton=backend(1.0))}, "shakespeare-char")
    prof = Profile("profiles/test.json", profile_data(gpt2, llama, char))
    gated = Shapes(GPTConfig(**(preset("gpt2") | {"mlp": "swiglu", "norm": "rmsnorm"})), 16)  # no RoPE
    choices = kernels.choose("auto", "cuda", shapes=gated, profile=prof)
    assert choices["attention"].backend == "torch" and "(gpt2 bfloat16" in choices["attention"].reason
    dropped = Shapes(GPTConfig(**(preset("gpt2") | {"dropout": 0.1})), 16)
    choices = kernels.choose("auto", "cuda", shapes=dropped, profile=prof)
    loss = choices["linear_cross_entropy"]
    assert loss.backend == "torch" and "(gpt2 bfloat16" in loss.reason


def test_a_record_without_a_timing_of_the_op_does_not_hide_one_with(self_check):
    failed = {"error": "out of memory", "verified": False}
    gpt2 = record({"swiglu": entry(torch=failed, triton=failed)}, "gpt2")
    llama = record({"swiglu": entry(torch=backend(1.0), triton=backend(2.0))}, "llama")
    prof = Profile("profiles/test.json", profile_data(gpt2, llama))
    choice = kernels.choose("auto", "cuda", shapes=Shapes(GPTConfig(**preset("gpt2")), 16), profile=prof)["swiglu"]
    assert choice.backend == "torch" and "(llama bfloat16" in choice.reason


def test_a_profile_keeps_every_workload_and_replaces_a_remeasured_one(tmp_path):
    path = tmp_path / "gpu.json"
    first = record({"swiglu": entry(torch=backend(1.0))}, "gpt2")
    write_json(path, profile.merged(path, first))
    llama = record({"swiglu": entry(torch=backend(2.0))}, "llama")
    write_json(path, profile.merged(path, llama))
    again = record({"swiglu": entry(torch=backend(3.0))}, "gpt2")
    write_json(path, profile.merged(path, again))
    assert profile.load(path).workloads == [llama, again]
    with pytest.raises(ValueError, match="holds measurements of test, not of this GPU .h100-sxm.: pass another --out"):
        profile.merged(path, record({}, slug="h100-sxm"))


def test_bench_kernels_refuses_another_gpus_file_before_measuring(monkeypatch, capsys, tmp_path):
    path = tmp_path / "gpu.json"
    write_json(path, profile_data(record({"swiglu": entry(torch=backend(1.0))}, slug="a100-sxm-80gb")))
    monkeypatch.setattr(bench_kernels, "detect", lambda: H100)
    monkeypatch.setattr(bench_kernels, "run", lambda *a: pytest.fail("measured"))
    assert bench_kernels.main(["--out", str(path)]) == 2
    assert "holds measurements of a100-sxm-80gb, not of this GPU (h100-sxm)" in capsys.readouterr().err


def test_bench_kernels_measures_in_train_py_s_dtype_or_the_one_given(monkeypatch, tmp_path):
    """A run takes each op from a record of its dtype first: a GPU without bf16 (train.py runs it
    in fp16 there) and an fp32 run need records of theirs, which bench.kernels was bf16-only to make."""
    measured = []
    monkeypatch.setattr(bench_kernels, "run", _fake_run(measured))
    for capability, args in (((9, 0), []), ((7, 0), []), ((9, 0), ["--dtype", "float32"])):
        monkeypatch.setattr(bench_kernels, "detect", lambda: dataclasses.replace(H100, capability=capability))
        assert bench_kernels.main(["--out", str(tmp_path / "gpu.json"), *args]) == 0
    assert [shapes.dtype for _, shapes, _ in measured] == [torch.bfloat16, torch.float16, torch.float32]
    assert [w["workload"]["dtype"] for w in profile.load(tmp_path / "gpu.json").workloads] == [
        "bfloat16", "float16", "float32"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a CUDA GPU")
def test_a_gpu_self_check_without_a_gpu_says_so():
    """Asked for CUDA's choices on a machine without CUDA (a script's kernels.choose("auto",
    "cuda")), the self-check says why, not torch's bare "Torch not compiled with CUDA" assertion."""
    with pytest.raises(ValueError, match="a self-check on the GPU, and this machine has no CUDA GPU"):
        kernels.choose("auto", "cuda")


@interpreter_only  # (swiglu's self-check runs the triton backend on CPU tensors)
def test_a_mapping_says_which_ops_it_left_to_torch():
    choices = kernels.choose({"swiglu": "triton"}, "cpu")
    assert choices["swiglu"] == kernels.Choice("triton", "asked for")
    assert choices["attention"] == kernels.Choice("torch", "default")


def test_auto_off_cuda_is_torch_on_any_other_device(monkeypatch):
    """Not only "cpu": "auto" on mps, xpu or meta takes torch, self-checking nothing."""
    monkeypatch.setattr(profile, "self_check", lambda *a: pytest.fail("self-checked off CUDA"))
    for device_type in ("mps", "xpu", "meta"):
        choices = kernels.choose("auto", device_type, profile=None)
        assert {c.backend for c in choices.values()} == {"torch"}, device_type


def test_forced_triton_ignores_the_profile(self_check):
    """--kernels=triton asks for Triton wherever it passes its self-check, whatever a profile
    timed: a profile where torch is faster does not turn it back to torch."""
    prof = fake_profile(swiglu=entry(torch=backend(1.0), compile=backend(1.0), triton=backend(3.0)))
    assert kernels.choose("auto", "cuda", profile=prof)["swiglu"].backend == "torch"
    choice = kernels.choose("triton", "cuda", profile=prof)["swiglu"]
    assert choice == kernels.Choice("triton", "asked for; self-check passed at test shapes: fine")


def test_a_run_that_uses_no_op_checks_none(monkeypatch):
    """used=set() (a run calling none of the ops) is not used=None (all of them)."""
    monkeypatch.setattr(profile, "self_check", lambda *a: pytest.fail("self-checked an unused op"))
    for mode in ("triton", "auto"):
        choices = kernels.choose(mode, "cuda", profile=None, used=set())
        assert set(choices.values()) == {kernels.Choice("torch", "not used by this run")}, mode


def test_one_stale_record_among_current_ones_still_warns(self_check):
    """The warning of stale timings is for any op chosen by a stale record, not only the last op
    looked up: here rms_norm's record is stale and swiglu's (later in OPS) is current."""
    fast_triton = entry(torch=backend(3.0), compile=backend(2.0), triton=backend(1.0))
    stale = {**record({"rms_norm": fast_triton}), "kernels_source": "0" * 16}
    current = record({"swiglu": fast_triton})
    prof = Profile("profiles/test.json", profile_data(stale, current))
    with pytest.warns(UserWarning, match="timed other kernel sources"):
        choices = kernels.choose("auto", "cuda", profile=prof)
    assert "stale" in choices["rms_norm"].reason and "stale" not in choices["swiglu"].reason


def test_a_compiled_model_times_the_optimizer_eagerly_in_auto(self_check):
    """adamw runs outside the compiled graph: kernels.choose(compiled=True) must not weigh it by
    a compiled timing of torch's (bench.profile.launched_compiled)."""
    prof = fake_profile(adamw=entry(torch=backend(3.0), compile=backend(0.5), triton=backend(1.0)),
                        swiglu=entry(torch=backend(3.0), compile=backend(0.5), triton=backend(1.0)))
    choices = kernels.choose("auto", "cuda", profile=prof, compiled=True)
    assert choices["swiglu"].backend == "torch"  # in the graph: Inductor's 0.5 ms wins
    assert choices["adamw"].backend == "triton"  # outside it: torch's eager 3 ms loses


def test_an_op_without_a_triton_backend_is_torch_unchecked(self_check, monkeypatch):
    """An op registered without triton (a new op, torch only) takes torch, not a check of a missing backend."""
    monkeypatch.setattr(kernels.registry, "_impls", {op: dict(b) for op, b in kernels.registry._impls.items()})
    del kernels.registry._impls["swiglu"]["triton"]
    for mode in ("triton", "auto"):
        choice = kernels.choose(mode, "cuda", profile=None)["swiglu"]
        assert choice == kernels.Choice("torch", "no triton backend yet: falls back to torch"), mode


def test_a_profile_entry_timing_no_registered_backend_takes_the_self_check(self_check):
    """A record timing the op, none of the registry's backends (only torch.compile's here):
    no backend to take from it, so the no-timing path (self-check), never a Choice of None."""
    choice = kernels.choose("auto", "cuda", profile=fake_profile(swiglu=entry(compile=backend(1.0))))["swiglu"]
    assert choice.backend == "triton" and "has no timing for it; self-check passed" in choice.reason


def _on_a_gpu(monkeypatch, tmp_path, slugs):
    """A fake Hopper GPU whose profile directory is tmp_path; slugs: CUDA index -> slug."""
    from bench import hardware
    monkeypatch.setattr(profile, "PROFILES", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(runtime, "capability", lambda device: (9, 0))
    monkeypatch.setattr(runtime, "INTERPRET", False)
    monkeypatch.setattr(hardware, "detect", lambda index=None: type("D", (), {"slug": slugs[index]})())


def test_auto_reads_the_profile_of_this_gpu_by_default(self_check, monkeypatch, tmp_path):
    """choose's default profile=DETECT loads profiles/<this GPU's slug>.json."""
    _on_a_gpu(monkeypatch, tmp_path, {0: "h100-pcie"})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    write_json(tmp_path / "h100-pcie.json", profile_data(record(
        {"swiglu": entry(torch=backend(1.0), triton=backend(3.0))}, slug="h100-pcie")))
    choice = kernels.choose("auto", "cuda")["swiglu"]
    assert choice.backend == "torch" and "h100-pcie.json" in choice.reason


def test_the_profile_is_the_current_gpu_s_not_gpu_0_s(monkeypatch, tmp_path):
    """train.py sets the current device to its own: a rank on cuda:1 reads that GPU's profile."""
    _on_a_gpu(monkeypatch, tmp_path, {0: "a100-sxm-80gb", 1: "h100-pcie"})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    write_json(tmp_path / "h100-pcie.json", profile_data(record({}, slug="h100-pcie")))
    assert profile.for_this_gpu().name.endswith("h100-pcie.json")


def test_a_backend_whose_verification_is_not_recorded_is_not_chosen():
    """Only verified: true makes a backend eligible (a record without it, as for a crashed check)."""
    unverified = {"ms": {"fwd": 0.3, "fwd+bwd": 1.0}}
    e = entry(torch=backend(3.0), triton=unverified)
    assert profile.fastest_verified(e, ["torch", "triton"], compiled=False)[0] == "torch"


def test_a_record_that_does_not_say_which_sources_it_timed_is_stale(self_check):
    """Profile.stale: a record without kernels_source is stale too, and the run is warned."""
    rec = record({"swiglu": entry(torch=backend(3.0), triton=backend(1.0))})
    del rec["kernels_source"]
    assert profile.Profile.stale(rec)
    with pytest.warns(UserWarning, match="timed other kernel sources"):
        kernels.choose("auto", "cuda", profile=profile.Profile("profiles/test.json", profile_data(rec)))


@pytest.mark.parametrize("this, other", [("l40", "l40s"), ("a10", "a100-sxm-80gb")])
def test_a_gpu_whose_slug_prefixes_another_s_refuses_its_profile(tmp_path, this, other):
    """Slugs match whole (l40 is not l40s, a10 not a100-*): an L40 refuses an L40S's records."""
    write_json(tmp_path / f"{this}.json", profile_data(record({}, slug=other)))
    with pytest.raises(ValueError, match=f"holds measurements of {other}, not of this GPU"):
        profile.load_own(tmp_path / f"{this}.json", this)


def test_one_foreign_record_among_own_ones_is_refused(tmp_path):
    """Every record of the file must be this GPU's, not only the first."""
    write_json(tmp_path / "h100-sxm.json", profile_data(record({}, slug="h100-sxm"),
                                                        record({}, "llama", slug="h200-sxm")))
    with pytest.raises(ValueError, match="holds measurements of h200-sxm, not of this GPU .h100-sxm."):
        profile.load_own(tmp_path / "h100-sxm.json", "h100-sxm")


def test_eager_torch_faster_but_unverified_is_still_chosen_over_a_slower_triton():
    """Torch, the reference, is eligible eagerly whatever its check: it beats a slower verified triton."""
    e = entry(torch=backend(1.0, verified=False), triton=backend(3.0))
    assert profile.fastest_verified(e, ["torch", "triton"], compiled=False) == (
        "torch", "fastest verified at fwd+bwd: torch 1 ms vs triton 3 ms")


def test_check_request_refuses_an_unregistered_backend_before_any_set_up():
    """train.py/gpt.sample call check_request before loading data or building the model:
    a misspelt backend is refused there, not after set-up (at choose's self-check)."""
    with pytest.raises(ValueError, match="swiglu: no 'fast' backend; registered: \\['torch', 'triton'\\]"):
        kernels.check_request({"swiglu": "fast"})
    kernels.check_request({"swiglu": "triton"})  # (a registered one passes, unchecked)


def test_a_profile_of_another_format_is_refused(tmp_path):
    """A file whose workloads look right but whose format is not FORMAT (an older or newer bench) is refused."""
    for fmt in (1, 3, None):
        write_json(tmp_path / "gpu.json", {**profile_data(record({})), "format": fmt})
        with pytest.raises(ValueError, match="not a format-2 kernel profile"):
            profile.load(tmp_path / "gpu.json")


def test_attention_with_rope_is_another_kind_than_without_even_at_equal_sizes(self_check):
    """A llama-sized run without RoPE takes attention from a GPT-2 record (no RoPE), not
    from the llama record of its sizes that timed the RoPE-fused kernel."""
    gpt2 = record({"attention": entry(torch=backend(1.0), triton=backend(2.0))}, "gpt2")
    llama = record({"attention": entry(torch=backend(2.0), triton=backend(1.0))}, "llama")
    run = Shapes(GPTConfig(**(preset("llama") | {"pos_encoding": "learned"})), 16)
    assert profile.distance("attention", llama["workload"], run)[1] == 1
    prof = profile.Profile("profiles/test.json", profile_data(gpt2, llama))
    choice = kernels.choose("auto", "cuda", shapes=run, profile=prof)["attention"]
    assert choice.backend == "torch" and "(gpt2 bfloat16" in choice.reason


@pytest.mark.parametrize("ms", [float("nan"), float("inf"), 0, True], ids=["nan", "inf", "zero", "bool"])
def test_a_timing_that_is_not_a_finite_positive_number_is_refused(tmp_path, ms):
    """NaN, infinity, 0 or true as a pass's ms (a broken measurement) would win or poison min()."""
    rec = record({"swiglu": entry(torch=backend(1.0), triton={**backend(1.0), "ms": {"fwd": 1.0, "fwd+bwd": ms}})})
    (tmp_path / "gpu.json").write_text(json.dumps(profile_data(rec)))
    with pytest.raises(ValueError, match="ops.swiglu lacks"):
        profile.load(tmp_path / "gpu.json")


def test_a_verified_backend_as_fast_as_an_unverified_one_is_not_called_slower():
    """Only a strictly faster unverified backend is named "faster but failed verification"."""
    e = entry(torch=backend(3.0), triton=backend(3.0, verified=False))
    assert profile.fastest_verified(e, ["torch", "triton"], compiled=False) == (
        "torch", "fastest verified at fwd+bwd: torch 3 ms")


def test_a_triton_choice_from_the_profile_says_what_it_measured(self_check):
    """The reason of a profile's triton pick gives its timings, not "has no timing"."""
    prof = fake_profile(swiglu=entry(torch=backend(3.0), triton=backend(1.0)))
    reason = kernels.choose("auto", "cuda", profile=prof)["swiglu"].reason
    assert "fastest verified at fwd+bwd: triton 1 ms vs torch 3 ms; self-check passed" in reason
    assert "has no timing" not in reason


def test_generation_skips_a_backend_that_timed_only_the_training_pass():
    """A backend record with ms but none at the pass looked up (fwd, in generation) is not timed there."""
    e = entry(torch={"ms": {"fwd+bwd": 3.0}}, triton=backend(1.0))
    assert profile.fastest_verified(e, ["torch", "triton"], compiled=False, generation=True) == (
        "triton", "fastest verified at fwd: triton 0.333 ms")


@pytest.mark.parametrize("ops, problem", [
    ([], "no ops"), ({"swiglu": {"training_pass": "fwd+bwd", "backends": {"torch": None}}}, "ops.swiglu lacks"),
], ids=["ops-list", "backend-null"])
def test_ops_or_backends_of_the_wrong_type_are_a_value_error(tmp_path, ops, problem):
    """What is not a dict there is the ValueError train.py reports, not an AttributeError later."""
    (tmp_path / "gpu.json").write_text(json.dumps(profile_data({**record({}), "ops": ops})))
    with pytest.raises(ValueError, match=problem):
        profile.load(tmp_path / "gpu.json")


def _fake_run(measured: list):
    """A stand-in for bench.kernels.run: the (preset, shapes, ops) asked for, in `measured`."""
    return lambda device, shapes, name, ops, partial: (
        measured.append((name, shapes, ops)) or record({}, name, slug=device.slug, batch_size=shapes.batch_size,
                                                  seq_len=shapes.T, dtype=shapes.dtype)
        | {"rooflines": {"copy_gbs": 1.0, "matmul_tflops": 1.0}})


def test_bench_kernels_by_default_profiles_this_gpu_at_gpt2_s_shapes_16_sequences(monkeypatch, tmp_path):
    measured = []
    monkeypatch.setattr(bench_kernels, "detect", lambda: A100)
    monkeypatch.setattr(bench_kernels, "run", _fake_run(measured))
    assert bench_kernels.main(["--out", str(tmp_path / "gpu.json")]) == 0
    [(name, shapes, ops)] = measured
    assert ops == list(kernels.OPS) and (name, shapes.batch_size, shapes.T, shapes.config, shapes.dtype) == (
        "gpt2", 16, 1024, GPTConfig(**preset("gpt2")), torch.bfloat16)
    [w] = profile.load(tmp_path / "gpu.json").workloads
    assert w["device"]["slug"] == "a100-sxm-80gb"


def test_bench_kernels_refuses_to_profile_a_gpu_other_than_the_one_named(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench_kernels, "detect", lambda: H100)
    monkeypatch.setattr(bench_kernels, "run", lambda *a: pytest.fail("measured"))
    assert bench_kernels.main(["--gpu", "a100-sxm-80gb", "--out", str(tmp_path / "gpu.json")]) == 2
    assert "asked for 'a100-sxm-80gb' but this machine has 'NVIDIA H100 80GB HBM3'" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()


def test_bench_kernels_measures_each_op_named_once(monkeypatch, tmp_path):
    """A repeated or trailing-comma --ops is the ops named, each measured once (minutes of a GPU
    session each)."""
    monkeypatch.setattr(bench_kernels, "detect", lambda: H100)
    measured = []
    monkeypatch.setattr(bench_kernels, "run", _fake_run(measured))
    assert bench_kernels.main(["--ops", "swiglu,rope,swiglu,", "--out", str(tmp_path / "gpu.json")]) == 0
    assert [ops for _, _, ops in measured] == [["swiglu", "rope"]]


def test_a_measured_record_says_what_it_timed_and_with_what(monkeypatch, tmp_path):
    """Its kernel sources (a record without is stale), timing method, versions, workload, device
    and rooflines."""
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(bench_kernels, "roofline", lambda unit, dtype=torch.bfloat16: 1.0)
    monkeypatch.setattr(bench_kernels, "measure_op", lambda op, shapes, rooflines: {
        **entry(torch={**backend(1.0), "rate": {"fwd": 1.0, "fwd+bwd": 1.0}, "roofline": {"fwd": 0.1, "fwd+bwd": 0.1}}),
        "chosen": {"eager": "torch", "compiled": "torch"}})
    shapes = Shapes(GPTConfig(**preset("gpt2")), 16)
    rec = bench_kernels.run(H100, shapes, "gpt2", ["swiglu"], tmp_path / "p.json")
    assert rec["kernels_source"] == profile.kernels_source() and not Profile.stale(rec)
    assert rec["timing"] == measure.TIMING
    assert rec["torch"] == torch.__version__ and rec["date"] and "git_sha" in rec and "triton" in rec
    assert rec["workload"] == profile.workload("gpt2", shapes) and rec["device"] == H100.as_dict()
    assert rec["rooflines"] == {"copy_gbs": 1.0, "matmul_tflops": 1.0}


def _measure_op_timing(monkeypatch, timings: dict, peaks: list | None = None):
    """bench.kernels.measure_op with `timings` for the entry it would measure (attention's rate
    in TFLOPS, the others' in GB/s; each entry's roofline in `peaks`)."""
    peaks = [] if peaks is None else peaks
    monkeypatch.setattr(bench_kernels, "case", lambda op, *a, **k: types.SimpleNamespace(
        unit="TFLOPS" if op == "attention" else "GB/s"))
    monkeypatch.setattr(bench_kernels, "implementations", lambda op: {})
    monkeypatch.setattr(bench_kernels, "entry", lambda timed, checked, impls, peak, device:
                        peaks.append(peak) or json.loads(json.dumps(timings)))


def test_bench_kernels_records_the_choice_eagerly_and_in_a_compiled_model(monkeypatch):
    _measure_op_timing(monkeypatch, entry(torch=backend(3.0), compile=backend(0.5), triton=backend(1.0)))
    shapes, rooflines = Shapes(GPTConfig(**preset("gpt2")), 16), {"copy_gbs": 1.0, "matmul_tflops": 1.0}
    assert bench_kernels.measure_op("swiglu", shapes, rooflines)["chosen"] == {"eager": "triton", "compiled": "torch"}
    # the optimizer runs outside the compiled graph: its compiled choice is the eager one
    assert bench_kernels.measure_op("adamw", shapes, rooflines)["chosen"] == {"eager": "triton", "compiled": "triton"}


def test_a_matmul_bound_op_is_held_to_the_matmul_rate_and_a_memory_bound_one_to_the_copy_bandwidth(monkeypatch):
    peaks = []
    _measure_op_timing(monkeypatch, entry(torch=backend(1.0)), peaks)
    shapes = Shapes(GPTConfig(**preset("gpt2")), 16)
    for op in ("attention", "swiglu"):
        bench_kernels.measure_op(op, shapes, {"copy_gbs": 1000.0, "matmul_tflops": 100.0})
    assert peaks == [100.0, 1000.0]


def test_a_self_check_without_shapes_runs_gpt2_in_the_device_s_training_dtype():
    for device_type, dtype in (("cuda", torch.bfloat16), ("cpu", torch.float32)):
        shapes = profile.default_shapes(device_type)
        assert (shapes.config, shapes.batch_size, shapes.dtype) == (GPTConfig(**preset("gpt2")), 1, dtype)


@pytest.mark.parametrize("key", ["batch_size", "seq_len"])
def test_a_workload_of_a_fractional_batch_or_sequence_is_refused(tmp_path, key):
    rec = record({"swiglu": entry(torch=backend(1.0))})
    rec["workload"][key] = 16.5
    (tmp_path / "gpu.json").write_text(json.dumps(profile_data(rec)))
    with pytest.raises(ValueError, match=r"workloads\[0\]: .*batch_size and seq_len must be positive integers"):
        profile.load(tmp_path / "gpu.json")


@pytest.mark.parametrize("ops", [
    {"swiglu": {"training_pass": None, "backends": {"torch": {"error": "out of memory", "verified": False}}}},
    {"swiglu": {"training_pass": ["fwd+bwd"], "backends": {"torch": backend(1.0)}}},
], ids=["null", "list"])
def test_a_training_pass_that_is_not_a_name_is_a_value_error(tmp_path, ops):
    """(A list escaped load as a TypeError, which train.py does not report as a bad profile.)"""
    (tmp_path / "gpu.json").write_text(json.dumps(profile_data(record(ops))))
    with pytest.raises(ValueError, match="ops.swiglu lacks its training_pass"):
        profile.load(tmp_path / "gpu.json")


def test_a_host_time_without_the_training_pass_loads_and_leaves_the_gpu_time(tmp_path):
    """The format lets a host time leave passes out; the choice is then by the GPU's time."""
    rec = record({"swiglu": entry(torch={**backend(3.0), "host_ms": {"fwd": 5.0}}, triton=backend(2.0))})
    write_json(tmp_path / "gpu.json", profile_data(rec))
    [loaded] = profile.load(tmp_path / "gpu.json").workloads
    assert profile.fastest_verified(loaded["ops"]["swiglu"], ["torch", "triton"], compiled=False)[0] == "triton"


def test_the_self_check_reports_the_worst_form_s_margin_not_the_last_one_s(monkeypatch):
    forms = [types.SimpleNamespace(shape="plain"), types.SimpleNamespace(shape="+residual")]
    monkeypatch.setattr(profile, "check_cases", lambda op, shapes, device_type: forms)
    fractions = iter([0.5, 0.1])
    monkeypatch.setattr(profile, "margin", lambda c, fn, reference: (None, next(fractions)))
    shapes = Shapes(GPTConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=64, block_size=16), batch_size=1)
    ok, why = profile._check("layer_norm", shapes, "cpu", "triton")
    assert ok and why.endswith(": error at most 50% of the bound in 2 forms"), why
