import contextlib
import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

import kernels
from bench import mfu, plan, report
from bench.flops import flops_per_token, param_count
from bench.hardware import Device, find, peak_for
from gpt.model import GPT, GPTConfig, model_ops, preset
from gpt.optim import optimizer_ops
from tests.devices import H100, interpreter_only
from tests.memory import saved_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2 = GPTConfig(**preset("gpt2"))


def test_planning_table_for_a_gpu_not_here():
    """The documented command, as a user runs it: no H100 here, so it plans."""
    out = subprocess.run([sys.executable, "-m", "bench.mfu", "--gpu", "h100", "--world-size", "8"],
                         cwd=ROOT, capture_output=True, text=True,
                         env=os.environ | {"COLUMNS": "200", "CUDA_VISIBLE_DEVICES": ""})  # not even on an H100
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # rich wraps lines at the terminal's width
    assert "Plan for H100 SXM" in text and "989.4" in text and "Estimates, not measurements" in text
    for name in plan.DEFAULT_PLAN:
        assert name in text
    assert "fsdp" in text and "zero1" in text and "does not fit" in text


def test_plan_rows_for_one_preset(capsys):
    assert mfu.main(["--gpu", "a100-sxm-80gb", "--preset", "giga-13b"]) == 0
    text = capsys.readouterr().out
    assert "A100 SXM 80GB" in text and "giga-13b" in text and "single GPU" in text and "gpt2" not in text


@pytest.mark.parametrize("args, message", [
    (["--gpu", "h100", "--preset", "gpt2,giga-7b"], "unknown preset 'giga-7b'"),  # a plan
    (["--preset", "giga-7b"], "unknown preset 'giga-7b'"),  # a measurement, on any machine
    (["--gpu", "h100", "--kernels", "torch,fast"], "unknown variant 'fast'"),
    (["--kernels", "torch,fast"], "unknown variant 'fast'"),
])
def test_an_unknown_preset_or_variant_is_a_usage_error_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        mfu.main(args)
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--world-size", "0"), ("--peak-tflops", "-5"), ("--seq-len", "0"),
                                         ("--batch-size", "0"), ("--peak-tflops", "0"), ("--peak-tflops", "inf"),
                                         ("--batch-size", "1" + "0" * 400), ("--world-size", str(2 ** 63))])
def test_plan_numbers_not_above_zero_are_usage_errors(capsys, flag, value):
    """A world of 0 GPUs divided by zero, a negative peak planned negative tokens/s, and a peak
    or length of 0 was silently taken as the default; an int past a float's range was an
    OverflowError's traceback."""
    with pytest.raises(SystemExit) as exit:
        mfu.main(["--gpu", "h100", "--preset", "gpt2", flag, value])
    assert exit.value.code == 2 and (f"argument {flag}: must be above 0 and finite, got {value}"
                                     in capsys.readouterr().err)


def _models(*names):
    return {name: plan.config_for(name) for name in names}


def test_plan_tables_label_binary_units(capsys):
    """The plan counts memory in GiB and MiB (the GPU's nominal 80 taken as GiB): so its labels."""
    plan.print_plan(plan.Plan(find("h100"), "bfloat16", 989.4, 8, None), _models("gpt2"), mfu.Console(width=250))
    text = capsys.readouterr().out
    assert "80 GiB" in text and "90% of 80 GiB" in text and "static GiB" in text and "act MiB/token" in text
    assert not re.search(r"\b[GM]B\b", text)


def test_throughput_of_a_preset_that_fits_nowhere_says_so(capsys):
    """giga-175b fits on one H100 with neither optimizer, even recomputing every block: no rates for it."""
    plan.print_plan(plan.Plan(find("h100"), "bfloat16", 989.4, 1, None), _models("gpt2", "giga-175b"),
                    mfu.Console(width=250))
    lines = capsys.readouterr().out.splitlines()
    [big] = [line for line in lines if "175B" in line]
    [small] = [line for line in lines if "0.124B" in line]
    assert big.count("does not fit") == 5 and "does not fit" not in small


def test_the_plan_prints_to_an_ascii_stdout(ascii_stdout, monkeypatch):
    """The plan's own text is ASCII: its '·' raised UnicodeEncodeError on an ASCII stdout."""
    monkeypatch.setattr(mfu, "detect", lambda: None)
    printed = ascii_stdout()
    assert mfu.main(["--gpu", "h100", "--preset", "gpt2"]) == 0
    assert "the loss's 8*vocab*h + 1 GiB" in " ".join(printed.getvalue().decode("ascii").split())


def test_plan_credits_a_given_peak_to_the_user(capsys, monkeypatch):
    monkeypatch.setattr(mfu, "detect", lambda: None)  # plans even on an H100
    assert mfu.main(["--gpu", "h100", "--preset", "gpt2", "--peak-tflops", "500"]) == 0
    assert "dense bfloat16 500 TFLOPS (your --peak-tflops)," in " ".join(capsys.readouterr().out.split())
    assert mfu.main(["--gpu", "h100", "--preset", "gpt2"]) == 0
    assert "your --peak-tflops" not in capsys.readouterr().out


def test_plan_says_it_does_not_use_optimizer_dtype_and_recompute(capsys, monkeypatch):
    monkeypatch.setattr(mfu, "detect", lambda: None)
    note = "--optimizer, --dtype and --recompute are not used in planning"
    assert mfu.main(["--gpu", "h100", "--preset", "gpt2"]) == 0
    assert note not in " ".join(capsys.readouterr().out.split())
    for flags in (["--optimizer", "bf16_adamw"], ["--dtype", "float32"], ["--recompute"], ["--recompute", "4"]):
        assert mfu.main(["--gpu", "h100", "--preset", "gpt2", *flags]) == 0
        assert note in " ".join(capsys.readouterr().out.split())
    # A number of blocks no preset of the plan has is an error, not ignored.
    with pytest.raises(SystemExit) as exit:
        mfu.main(["--gpu", "h100", "--preset", "giga-13b,gpt2", "--recompute", "20"])
    assert exit.value.code == 2
    assert "gpt2: recompute: True, False or a number of blocks from 0 to 12, got 20" in (
        capsys.readouterr().err)


def _train_config(tmp_path, *lines: str) -> str:
    """A train.py config file of a small character model, its dataset's meta.pkl in tmp_path."""
    (tmp_path / "chars").mkdir(exist_ok=True)
    (tmp_path / "chars" / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "itos": {}, "stoi": {}}))
    path = tmp_path / "my_model.py"
    path.write_text("\n".join([f"data_dir = {str(tmp_path)!r}", "dataset = 'chars'", "n_layer = 3", "n_head = 4",
                               "n_embd = 128", "block_size = 64", "batch_size = 24", *lines]) + "\n")
    return str(path)


def test_a_train_config_file_is_planned_with_its_data_s_vocabulary(tmp_path, capsys, monkeypatch):
    """--preset my_config.py: the model train.py would train from that file, its vocabulary the
    prepared dataset's (or GPT-2's where none is), its batch_size the plan's micro-batch; the
    device it names need not be here, nor a character dataset built offline be built yet."""
    monkeypatch.setattr(mfu, "detect", lambda: None)
    path = _train_config(tmp_path)
    model = GPTConfig(n_layer=3, n_head=4, n_embd=128, block_size=64, vocab_size=65, bias=False)
    assert mfu.main(["--gpu", "h100", "--preset", path]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"{path}: the model it trains, its 65-token vocabulary {tmp_path / 'chars' / 'meta.pkl'}" in text
    assert f"{param_count(model) / 1e9:.3g}B" in text and "recompute for 24" in text
    assert "not used in planning" not in text  # the file's optimizer and recompute: not the user's asking
    assert mfu.main(["--gpu", "h100", "--preset", path, "--optimizer", "bf16_adamw"]) == 0
    assert "--optimizer, --dtype and --recompute are not used in planning" in " ".join(
        capsys.readouterr().out.split())
    (tmp_path / "chars" / "meta.pkl").unlink()
    assert mfu.main(["--gpu", "h100", "--preset", path]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "its 50304-token vocabulary GPT-2's, padded (dataset 'chars': no" in text
    path = _train_config(tmp_path, "dataset = 'shakespeare_char'", "device = 'cuda:7'")
    assert mfu.main(["--gpu", "h100", "--preset", path]) == 0
    assert f"its 65-token vocabulary {tmp_path / 'shakespeare_char' / 'meta.pkl'}" in " ".join(
        capsys.readouterr().out.split())


def test_a_train_config_file_is_measured_with_its_batch_optimizer_dtype_and_recompute(tmp_path, monkeypatch,
                                                                                      capsys):
    monkeypatch.setattr(mfu, "detect", lambda: Device(0, "NVIDIA V100-SXM2-32GB", 80, 32.0, (7, 0)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    seen = []

    def measure(run, variant, device):
        seen.append(run)
        raise KeyboardInterrupt  # what was to be measured is known: stop there
    monkeypatch.setattr(mfu, "measure", measure)
    reads, read = [], plan.training_file
    monkeypatch.setattr(plan, "training_file", lambda path: reads.append(path) or read(path))
    path = _train_config(tmp_path, "optimizer = 'bf16_adamw'", "recompute = 2")
    with pytest.raises(KeyboardInterrupt):
        mfu.main(["--gpu", "auto", "--kernels", "torch", "--preset", path, "--json", str(tmp_path / "m.json")])
    with pytest.raises(KeyboardInterrupt):  # the command line's settings win
        mfu.main(["--gpu", "auto", "--kernels", "torch", "--preset", path, "--batch-size", "8", "--recompute", "1",
                  "--optimizer", "adamw", "--json", str(tmp_path / "m.json")])
    for lines, flags in (([], []), (["dtype = 'float32'"], []), ([], ["--dtype", "float32"])):
        with pytest.raises(KeyboardInterrupt):
            mfu.main(["--gpu", "auto", "--kernels", "torch", "--preset", _train_config(tmp_path, *lines), *flags,
                      "--json", str(tmp_path / "m.json")])
    from_file, overridden, default, file_s, asked = seen
    assert (from_file.batch_size, from_file.seq_len, from_file.optimizer, from_file.dtype, from_file.recompute,
            from_file.config.vocab_size) == (24, 64, "bf16_adamw", torch.bfloat16, 2, 65)
    # bf16_adamw's file trains in bf16, and measures so under torch's AdamW too
    assert (overridden.batch_size, overridden.optimizer, overridden.dtype, overridden.recompute) == (
        8, "adamw", torch.bfloat16, 1)
    assert [run.dtype for run in (default, file_s, asked)] == [torch.float16, torch.float32, torch.float32]
    assert reads[:2] == [path, path]  # read (its dataset prepared) once a command
    # As train.py, bf16_adamw refuses float16, a file's or the command line's.
    for lines, flags in ((["optimizer = 'bf16_adamw'", "dtype = 'float16'"], []),
                         (["optimizer = 'bf16_adamw'"], ["--dtype", "float16"])):
        with pytest.raises(SystemExit) as exit:
            mfu.main(["--gpu", "auto", "--preset", _train_config(tmp_path, *lines), *flags])
        assert exit.value.code == 2 and "optimizer=bf16_adamw trains in bfloat16, and dtype is float16" in " ".join(
            capsys.readouterr().err.split())
    assert len(seen) == 5


def test_a_config_file_s_result_is_named_by_its_normalized_path(tmp_path, monkeypatch):
    """./my_model.py and sub/../my_model.py are the file my_model.py, and its result says so."""
    monkeypatch.setattr(mfu, "detect", lambda: H100)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(mfu, "measure", lambda run, variant, device: {"variant": variant, "error": "not measured"})
    named = []

    def record(run, preset, *rest):
        named.append(preset)
        raise KeyboardInterrupt  # the result's name is known: stop there
    monkeypatch.setattr(mfu, "record", record)
    _train_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    for name in ("./my_model.py", "sub/../my_model.py", "my_model.py,./my_model.py"):  # (the last: one model)
        with pytest.raises(KeyboardInterrupt):
            mfu.main(["--gpu", "auto", "--kernels", "torch", "--preset", name, "--json", str(tmp_path / "m.json")])
    assert named == ["my_model.py"] * 3


def test_a_variant_named_twice_is_measured_once(tmp_path, monkeypatch):
    monkeypatch.setattr(mfu, "detect", lambda: H100)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    measured = []
    monkeypatch.setattr(mfu, "measure", lambda run, variant, device: measured.append(variant) or {
        "variant": variant, "error": "not measured", "kernels": {op: {"backend": "torch"} for op in kernels.OPS}})
    mfu.main(["--gpu", "auto", "--kernels", "torch,triton,torch,", "--json", str(tmp_path / "m.json")])
    assert measured == ["torch", "triton"]


def test_an_unknown_sharding_is_refused_not_planned_as_nothing():
    with pytest.raises(ValueError, match=re.escape("sharding must be one of ('ddp', 'zero1', 'fsdp'), got 'zero3'")):
        plan.static_bytes(plan.config_for("gpt2"), "adamw", "zero3", 8)


def test_recomputing_just_enough_to_reach_the_usable_memory_exactly_fits(monkeypatch):
    """A plan's peak equal to the usable memory fits (the fewest blocks recomputed that reach it)."""
    monkeypatch.setattr(plan, "USABLE", 1.0)  # (0.9 of a byte count is rarely a whole number)
    config = plan.config_for("gpt2")
    peaks = [plan.peak_bytes(config, "adamw", 16, 1024, n) for n in range(config.n_layer + 1)]
    assert peaks[3] < peaks[2]
    assert plan.blocks_to_recompute(peaks[3], config, "adamw", "ddp", 1, 1024, 16) == 3
    assert plan.blocks_to_recompute(peaks[3] - 1, config, "adamw", "ddp", 1, 1024, 16) == 4


@pytest.mark.parametrize("gpu, here", [("auto", None), ("auto", "NVIDIA H100 80GB HBM3"),
                                       ("h100", "NVIDIA H100 80GB HBM3")])
def test_measuring_takes_one_preset(gpu, here, monkeypatch, capsys):
    """Several presets are planned for a GPU not here; the one here (auto, or named) measures one."""
    monkeypatch.setattr(mfu, "detect", lambda: here and Device(0, here, 132, 80.0, (9, 0)))
    with pytest.raises(SystemExit) as exit:
        mfu.main(["--gpu", gpu, "--preset", "gpt2,llama"])
    assert exit.value.code == 2 and (f"--gpu {gpu} measures this machine's GPU, one model at a time"
                                     in " ".join(capsys.readouterr().err.split()))


@pytest.mark.parametrize("name, message", [
    ("nosuch.py", "No such file"),
    ("finetune_shakespeare.py", "starts from init_from=gpt2-xl: a config file gives the model it trains from scratch"),
])
def test_a_config_file_it_cannot_take_is_a_usage_error(name, message, capsys):
    with pytest.raises(SystemExit) as exit:
        mfu.main(["--gpu", "h100", "--preset", os.path.join(ROOT, "config", name)])
    assert exit.value.code == 2 and message in " ".join(capsys.readouterr().err.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_auto_on_cpu_says_what_to_run_and_exits_cleanly(capsys):
    assert mfu.main(["--gpu", "auto"]) == 0
    text = capsys.readouterr().out
    assert "no CUDA GPU" in text and "--gpu h100" in text


def test_unknown_gpu_name_lists_candidates(capsys):
    assert mfu.main(["--gpu", "a100"]) == 2
    assert "a100-sxm-80gb" in capsys.readouterr().out
    assert mfu.main(["--gpu", "list"]) == 0
    assert "rtx-5090" in capsys.readouterr().out


@pytest.mark.parametrize("variant, parsed", [
    ("torch", ("torch", None)), ("compile", ("torch", "default")), ("triton", ("triton", None)),
    ("triton+compile", ("triton", "default")), ("auto+compile", ("auto", "default")),
    ("compile:reduce-overhead", ("torch", "reduce-overhead")),
    ("triton+compile:max-autotune", ("triton", "max-autotune"))])
def test_parse_variant(variant, parsed):
    assert mfu.parse_variant(variant) == parsed


@pytest.mark.parametrize("variant", ["triton:reduce-overhead", "compile:fast", "compile:", "triton+compiled", "cudnn"])
def test_parse_variant_refuses(variant):
    """A compile mode only for a compiled variant, and one of torch.compile's."""
    with pytest.raises(ValueError, match=re.escape(f"unknown variant '{variant}'")):
        mfu.parse_variant(variant)


def test_like_for_like_pairs_each_compile_mode():
    assert mfu.like_for_like(["torch", "compile", "triton+compile:reduce-overhead", "compile:reduce-overhead"]) == [
        ("triton", "torch"), ("triton+compile", "compile"), ("auto+compile", "compile"),
        ("triton+compile:reduce-overhead", "compile:reduce-overhead"),
        ("auto+compile:reduce-overhead", "compile:reduce-overhead"),
        ("compile:reduce-overhead", "compile"), ("triton+compile:reduce-overhead", "triton+compile"),
        ("triton", "compile")]


def test_half_mfu_on_h100_is_the_issues_580k_tokens_per_s():
    rate = plan.tokens_per_s(find("h100").bf16, flops_per_token(GPT2, 1024).palm, 0.5)
    assert rate == pytest.approx(578_337, rel=1e-5)


def test_static_memory_per_optimizer_and_sharding():
    P = param_count(GPT2)
    assert plan.static_bytes(GPT2, "adamw", "ddp", 8) == 16 * P
    assert plan.static_bytes(GPT2, "bf16_adamw", "ddp", 1) == 8 * P
    # ZeRO-1's optimizer states by whole parameters (ZeroRedundancyOptimizer): the rank given wte
    # keeps its 38.6M parameters' states, not P/8's 15.6M.
    assert plan.static_bytes(GPT2, "adamw", "zero1", 8) == 8 * P + 8 * 50304 * 768
    assert plan.static_bytes(GPT2, "bf16_adamw", "ddp", 1, kahan=True) == 10 * P  # + the compensation
    # FSDP gathers in bf16 two blocks (7,077,888 matmul weights, 6,912 biases, two layer norms'
    # 3,072) and the root unit it keeps gathered: wte, wpe and ln_f.
    block, root = 7_077_888 + 6_912 + 3_072, 50304 * 768 + 1024 * 768 + 2 * 768
    assert P == 12 * block + root
    # and, while a block's grads are reduce-scattered, them whole in bf16 and the reduce-scatter
    # input whole in the reduce dtype: fp32 for adamw, bf16 for bf16_adamw.
    assert plan.static_bytes(GPT2, "adamw", "fsdp", 8) == 16 * P // 8 + 2 * (2 * block + root) + (2 + 4) * block
    assert plan.static_bytes(GPT2, "bf16_adamw", "fsdp", 8) == 8 * P // 8 + 2 * (2 * block + root) + (2 + 2) * block
    # Autocast's bf16 copies of the layers' matmul weights (linear_cross_entropy keeps no copy of
    # the lm head's); none in pure bf16 or under FSDP, which gathers the weights in bf16.
    matmul_weights = 12 * (768 * 3 * 768 + 768 * 768 + 2 * 768 * 3072)
    assert (plan.cast_copy_bytes(GPT2, "adamw", "ddp") == plan.cast_copy_bytes(GPT2, "adamw", "zero1")
            == 2 * matmul_weights)
    assert plan.cast_copy_bytes(GPT2, "bf16_adamw", "ddp") == plan.cast_copy_bytes(GPT2, "adamw", "fsdp") == 0


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("world_size", [1, 3, 8, 64, 1000])  # (1000: more ranks than parameters)
def test_zero1_share_is_what_zero_redundancy_optimizer_gives_its_fullest_rank(name, world_size):
    """torch's own partition of the model's parameter groups, as train.py passes them: its method
    on a bare instance, which needs no process group of world_size ranks."""
    config = GPTConfig(**preset(name))
    with torch.device("meta"):
        groups = GPT(config).param_groups(0.1)
    zero = ZeroRedundancyOptimizer.__new__(ZeroRedundancyOptimizer)
    zero.param_groups, zero.world_size, zero._partition_parameters_cache = groups, world_size, []
    ranks = zero._partition_parameters()
    assert plan.zero1_share(config, world_size) == max(sum(p.numel() for group in rank for p in group["params"])
                                                       for rank in ranks)


def test_activation_formula():
    # Pure bf16 GPT-2 layer: 32·h bytes per token (Korthikanti et al.'s 34·h less dropout masks).
    h = 768
    per_layer = 32 * h
    # The head: ln_f's input, and the gradient of its output in fp32 (linear_cross_entropy keeps
    # no logits).
    head = 2 * h + 4 * h
    assert plan.activation_bytes_per_token(GPT2, "bf16_adamw") == 12 * per_layer + head
    # Autocast keeps the residual stream (the two norm inputs per layer, and ln_f's) in fp32.
    assert plan.activation_bytes_per_token(GPT2, "adamw") == 12 * (per_layer + 4 * h) + head + 2 * h
    # Under FSDP the weights are gathered in bf16, so the embeddings' sum and the stream are bf16.
    assert plan.activation_bytes_per_token(GPT2, "adamw", sharding="fsdp") == 12 * per_layer + head
    # Recomputing every block keeps its inputs only (the stream and the pending branch, bf16),
    # plus one block while it is recomputed; recomputing the first 4 keeps the other 8 whole, and
    # the peak is then at the start of backward, before any recomputation.
    # (The first block has no pending branch.)
    assert (plan.activation_bytes_per_token(GPT2, "bf16_adamw", recompute=True)
            == (12 * 2 + 11 * 2) * h + per_layer + head)
    assert (plan.activation_bytes_per_token(GPT2, "bf16_adamw", recompute=4)
            == (4 * 2 + 3 * 2) * h + 8 * per_layer + head)
    assert plan.activation_bytes_per_token(GPT2, "bf16_adamw", recompute=0) == 12 * per_layer + head
    with pytest.raises(ValueError, match="a number of blocks from 0 to 12, got 13"):
        plan.activation_bytes_per_token(GPT2, "bf16_adamw", recompute=13)


@interpreter_only
@pytest.mark.parametrize("recompute", [0, 1], ids=["whole", "first-block-recomputed"])
@pytest.mark.parametrize("optimizer", plan.OPTIMIZERS)
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_activation_formula_is_what_the_model_saves(name, optimizer, recompute):
    """bench.plan's activations per token and autocast's weight copies against what autograd saves
    in a training forward of a small model of the preset's kind with the Triton kernels (pure
    bf16, or fp32 weights under bf16 autocast), less the lm head's fp32 weight gradient, which the
    loss keeps whatever the micro-batch (plan.loss_bytes). What the formula leaves out (fp32 row statistics of the
    norms, attention and the loss; RoPE's tables) is within 2% here (1% measured), less at real
    widths. A recomputed block's weight copies are not saved, but autocast's cache holds them to
    the end of the forward, so the plan keeps counting them."""
    config = dataclasses.replace(GPTConfig(**preset(name)), n_layer=2, n_head=4, n_kv_head=2 if name == "llama" else 4,
                                 n_embd=128, block_size=64, vocab_size=512, mlp_hidden=None, dropout=0.0)
    model = GPT(config, {op: "triton" for op in kernels.OPS})
    model.recompute_blocks(recompute)
    if optimizer == "bf16_adamw":
        model, context = model.to(torch.bfloat16), contextlib.nullcontext()
    else:
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    B, T = 3, config.block_size
    activations, copies, _loss = saved_bytes(model, torch.randint(0, config.vocab_size, (B, T)), context)
    activations -= 4 * config.vocab_size * config.n_embd
    planned = plan.activation_bytes_per_token(config, optimizer, recompute)
    assert 1.0 <= activations / (B * T) / planned <= 1.02
    assert copies == plan.cast_copy_bytes(config, optimizer, "ddp") * (config.n_layer - recompute) // config.n_layer


def test_largest_micro_batch():
    memory = find("h100").memory_gb * plan.GiB  # 80 GiB
    fits = plan.max_micro_batch(memory, GPT2, "adamw", "ddp", 1, 1024)
    usable = (plan.USABLE * 80 * 2**30 - 16 * param_count(GPT2) - plan.cast_copy_bytes(GPT2, "adamw", "ddp")
              - plan.loss_bytes(GPT2))
    assert fits == int(usable // (plan.activation_bytes_per_token(GPT2, "adamw") * 1024)) > 0
    # With torch's loss: no fused buffers, and 12 bytes a class a token at the head instead of 4h.
    unfused = plan.max_micro_batch(memory, GPT2, "adamw", "ddp", 1, 1024, fused_loss=False)
    per_token = plan.activation_bytes_per_token(GPT2, "adamw") - 4 * GPT2.n_embd + 12 * GPT2.vocab_size
    assert unfused == int((usable + plan.loss_bytes(GPT2)) // (per_token * 1024)) < fits
    big = plan.config_for("giga-175b")
    assert plan.max_micro_batch(memory, big, "adamw", "ddp", 1, 2048) == 0
    # Sharded over 256 GPUs the states fit, but one 2048-token sequence's activations do not
    # unless the blocks are recomputed.
    assert plan.max_micro_batch(memory, big, "bf16_adamw", "fsdp", 256, 2048) == 0
    assert plan.max_micro_batch(memory, big, "bf16_adamw", "fsdp", 256, 2048, recompute=True) > 0
    # On 64 under adamw, FSDP's reduce-scatter of a block's 1.8B grads (6 bytes each, 10 GiB) leaves
    # too little for one sequence even so.
    assert plan.max_micro_batch(memory, big, "adamw", "fsdp", 64, 2048, recompute=True) == 0
    # The fewest blocks to recompute for a micro-batch: none where it fits whole.
    xl = plan.config_for("gpt2-xl")
    n = plan.blocks_to_recompute(memory, xl, "bf16_adamw", "ddp", 1, 1024, 32)
    assert 0 < n < xl.n_layer
    assert plan.max_micro_batch(memory, xl, "bf16_adamw", "ddp", 1, 1024, n) >= 32
    assert plan.max_micro_batch(memory, xl, "bf16_adamw", "ddp", 1, 1024, n - 1) < 32
    assert plan.blocks_to_recompute(memory, xl, "bf16_adamw", "ddp", 1, 1024, 1) == 0
    assert plan.blocks_to_recompute(memory, big, "adamw", "ddp", 1, 2048, 1) is None


def test_summarize_a_measured_row():
    run = mfu.Run(GPT2, batch_size=16, seq_len=1024, optimizer="adamw", dtype=torch.bfloat16, warmup=1, steps=10)
    flops = flops_per_token(GPT2, 1024)
    peak = peak_for("NVIDIA H100 80GB HBM3", "bfloat16")
    row = dict(variant="triton", kernels={}, step_ms=[30.0] * 8 + [20.0, 40.0], loss=10.9,
               peak_memory_gib=20.0, clocks=None)
    out = mfu.summarize(row, run, flops, peak)
    assert out["ms_median"] == 30.0 and out["ms_p10"] < 30.0 < out["ms_p90"]
    assert out["tokens_per_s"] == pytest.approx(16 * 1024 / 0.030)
    assert out["mfu"] == pytest.approx(out["tokens_per_s"] * flops.palm / 1e12 / 989.4)
    assert out["hw_tflops"] < out["tflops"] and out["sm_mhz"] is None and out["mfu_at_clock"] is None


def test_summarize_the_breakdown():
    """busy: the profiled device time over the median step; the matmul and attention rates: the
    model's matmul FLOPs and attention's hardware FLOPs over their kernels' time."""
    run = mfu.Run(GPT2, batch_size=16, seq_len=1024, optimizer="adamw", dtype=torch.bfloat16, warmup=1, steps=2)
    flops = flops_per_token(GPT2, 1024)
    ms = dict.fromkeys(["matmul", "attention", "norm"], 0.0) | dict(matmul=20.0, attention=5.0, norm=2.0)
    row = dict(variant="triton", kernels={}, step_ms=[30.0, 30.0], loss=10.9, peak_memory_gib=20.0, clocks=None,
               breakdown=dict(steps=3, ms=ms, top=[]))
    b = mfu.summarize(row, run, flops, peak_for("NVIDIA H100 80GB HBM3", "bfloat16"))["breakdown"]
    assert b["busy"] == pytest.approx(27 / 30)
    assert b["matmul_tflops"] == pytest.approx(flops.matmul * 16 * 1024 / 0.020 / 1e12)
    assert b["attention_tflops"] == pytest.approx(7 * flops.attention_unit * 16 * 1024 / 0.005 / 1e12)
    # Recomputed blocks: their second forward counts in the kernels' rates.
    flops = flops_per_token(GPT2, 1024, recomputed=12)
    recomputed = mfu.summarize(row, dataclasses.replace(run, recompute=12), flops,
                               peak_for("NVIDIA H100 80GB HBM3", "bfloat16"))["breakdown"]
    assert recomputed["matmul_tflops"] == pytest.approx(b["matmul_tflops"] * flops.hardware_matmul / flops.matmul)
    assert recomputed["attention_tflops"] == pytest.approx(9 * flops.attention_unit * 16 * 1024 / 0.005 / 1e12)
    assert recomputed["busy"] == b["busy"]


def test_meter_for_train_py_on_cpu():
    meter = mfu.MFUMeter(GPT2, 1024, "float32", "cpu")
    assert meter.record(10_000)["mfu"] is None and "MFU n/a" in meter.describe()
    given = mfu.MFUMeter(GPT2, 1024, "bfloat16", "cpu", world_size=2, peak_tflops=100.0)
    rec = given.record(20_000)  # two processes: 10k tokens/s per GPU
    assert rec["tflops"] == pytest.approx(10_000 * flops_per_token(GPT2).palm / 1e12)
    assert rec["mfu"] == pytest.approx(rec["tflops"] / 100.0)
    given.close()


class _HostEvent:
    """torch.cuda.Event's timing interface on the host clock."""

    def __init__(self, enable_timing: bool):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end) -> float:
        return 1e3 * (end.t - self.t)


@interpreter_only
def test_measured_path_end_to_end_on_cpu(monkeypatch, capsys, tmp_path):
    """bench.mfu's GPU path on a tiny model, with CUDA's timing and memory calls on the host:
    what a GPU session would otherwise be first to find broken."""
    monkeypatch.setattr(torch.cuda, "Event", _HostEvent)
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args, **kwargs: 2**30)
    # The host's clock (CUDA only) and the optimizer's pointer tables as a GPU run would give them:
    # 1.25 ms a step, and 3 tables made during each variant's timed steps.
    monkeypatch.setattr(mfu.backends, "host_ms", lambda *args, **kwargs: 1.25)
    made = iter(range(0, 100, 3))
    monkeypatch.setattr(mfu.adamw_kernels, "tables_made", lambda: next(made))
    config = GPTConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=64, block_size=16, vocab_size=64,
                       norm="rmsnorm", mlp="swiglu", pos_encoding="rope", bias=False, tie_weights=False)
    device = H100
    flops, peak = flops_per_token(config, 16), peak_for(device.name, "bfloat16")
    rows = []
    for optimizer, variant in (("adamw", "torch"), ("bf16_adamw", "triton")):
        run = mfu.Run(config, 1, 16, optimizer, torch.bfloat16, warmup=1, steps=2, device="cpu",
                      recompute=int(optimizer == "bf16_adamw"))
        row = mfu.measure(run, variant, device)
        assert "error" not in row, row["error"]
        rows.append(mfu.summarize(row, run, flops, peak))
    # Triton for every op the run calls; the others (layer_norm; rope: attention turns q and k
    # itself in training; cross_entropy: the loss is the fused one) left unchecked to torch.
    triton_ops = {op for op, c in rows[1]["kernels"].items() if c["backend"] == "triton"}
    assert triton_ops == model_ops(config) | optimizer_ops("bf16_adamw") == set(kernels.OPS) - {
        "layer_norm", "rope", "cross_entropy"}
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 and r["peak_memory_gib"] == 1.0 for r in rows)
    # The profiled steps (on a CPU: its ops' self times): both attentions and the matmuls found.
    assert all(r["breakdown"]["ms"]["matmul"] > 0 and r["breakdown"]["ms"]["attention"] > 0 for r in rows)
    mfu.print_results(rows, run, device, peak, flops, mfu.Console(width=250))
    text = capsys.readouterr().out
    assert f"triton / torch: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x tokens/s" in text
    assert "op -> backend" in text and "blocks recomputed" in text
    assert "by kind of work" in text
    assert "host ms" in text and "1.25" in text and all(r["host_ms"] == 1.25 for r in rows)
    assert all(r["pointer_tables_made"] == 3 for r in rows)
    assert "triton: 3 optimizer pointer tables made" in text
    # The result file, as the README's table
    path = tmp_path / "mfu.json"
    path.write_text(json.dumps(mfu.record(run, "tiny", device, peak, flops, rows)))
    assert report.main([str(path)]) == 0
    table = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in table and "| variant | tokens/s |" in table
    assert "planned peak with the triton ops (bench/plan.py)" in table
    assert "| variant | busy | matmul | attention |" in table
    assert f"| triton | {rows[1]['tokens_per_s']:,.0f} |" in table


@pytest.mark.parametrize("variant, modes", [("compile:reduce-overhead", ["reduce-overhead"]), ("compile", ["default"]),
                                           ("torch", [])])
def test_a_compiled_variant_compiles_in_its_mode(variant, modes, monkeypatch):
    asked = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: asked.append(kw["mode"]) or model)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=32)
    run = mfu.Run(config, 1, 8, "adamw", torch.bfloat16, warmup=1, steps=2, device="cpu")
    mfu._train_step(run, {op: "torch" for op in kernels.OPS}, mfu.parse_variant(variant)[1])()
    assert asked == modes


def test_a_failing_variant_is_reported_not_fatal(monkeypatch):
    monkeypatch.setattr(mfu, "_train_step", lambda *args: (_ for _ in ()).throw(RuntimeError("no luck")))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    run = mfu.Run(GPT2, 2, 16, "adamw", torch.bfloat16, warmup=1, steps=2, device="cpu")
    row = mfu.measure(run, "torch", Device(0, "cpu", 1, 0.0, (0, 0)))
    assert row["error"] == "RuntimeError: no luck"


def test_out_of_memory_says_what_batch_fits(monkeypatch):
    """GPT-2 at 16 x 1024 on an 8 GB card: the plan's largest micro-batch of the variant (the
    torch variant's loss keeps its logits) comes with the error."""
    oom = torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(mfu, "_train_step", lambda *args: (_ for _ in ()).throw(oom))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    run = mfu.Run(GPT2, 16, 1024, "adamw", torch.bfloat16, warmup=1, steps=2, device="cpu")
    fits = plan.max_micro_batch(8 * plan.GiB, GPT2, "adamw", "ddp", 1, 1024, fused_loss=False)
    assert 0 < fits < plan.max_micro_batch(8 * plan.GiB, GPT2, "adamw", "ddp", 1, 1024) < 16
    row = mfu.measure(run, "torch", Device(0, "NVIDIA GeForce RTX 4060", 24, 8.0, (8, 9)))
    assert row["error"] == (f"out of memory at batch size 16 x 1024; bench/plan.py fits {fits} sequences of this "
                            f"variant on this GPU's 8 GiB (--batch-size)")


def test_the_result_file_keeps_each_variant_as_it_is_measured(monkeypatch, tmp_path):
    """A run cut short (the GPU session's time limit) still leaves the variants it measured."""
    monkeypatch.setattr(mfu, "detect", lambda: H100)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)

    def measure(run, variant, device):
        if variant == "compile":
            raise KeyboardInterrupt  # the time limit's signal, in the middle of the second variant
        return {"variant": variant, "error": "measured"}
    monkeypatch.setattr(mfu, "measure", measure)
    monkeypatch.setattr(mfu, "summarize", lambda row, *args: row)
    out = tmp_path / "mfu.json"
    with pytest.raises(KeyboardInterrupt):
        mfu.main(["--gpu", "auto", "--kernels", "triton,compile", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["rows"]] == ["triton"] and result["device"]["name"] == "NVIDIA H100 80GB HBM3"


def test_no_variant_starts_once_the_budget_is_spent(monkeypatch, tmp_path, capsys):
    """--budget-s: a GPU session's step keeps within its time without cutting a variant midway."""
    monkeypatch.setattr(mfu, "detect", lambda: H100)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(mfu, "print_results", lambda *args: None)
    clock = iter([0.0, 0.0, 50.0, 101.0])  # the start, then before each variant
    monkeypatch.setattr(mfu, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    monkeypatch.setattr(mfu, "measure", lambda run, variant, device: {"variant": variant, "error": "measured"})
    monkeypatch.setattr(mfu, "summarize", lambda row, *args: row)
    out = tmp_path / "mfu.json"
    assert mfu.main(["--gpu", "auto", "--kernels", "triton,compile,torch", "--budget-s", "100",
                     "--json", str(out)]) == 0
    assert [r["variant"] for r in json.loads(out.read_text())["rows"]] == ["triton", "compile"]
    assert "not started, --budget-s 100 spent: torch" in capsys.readouterr().out


@pytest.mark.parametrize("seq_len, block_size", [(2048, 2048), (512, 1024)])
def test_a_sequence_past_the_presets_block_is_measured_on_a_model_that_long(seq_len, block_size, monkeypatch, tmp_path):
    """--seq-len 2048 on GPT-2 (1024 positions) lengthens its position table; a shorter one runs
    on the preset's model as it is."""
    monkeypatch.setattr(mfu, "detect", lambda: H100)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    seen = []

    def measure(run, variant, device):
        seen.append((run.seq_len, run.config.block_size))
        raise KeyboardInterrupt
    monkeypatch.setattr(mfu, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        mfu.main(["--gpu", "auto", "--kernels", "torch", "--seq-len", str(seq_len), "--json", str(tmp_path / "m.json")])
    assert seen == [(seq_len, block_size)]


@pytest.mark.parametrize("flags, dtype", [([], torch.float16), (["--dtype", "bfloat16"], torch.bfloat16),
                                          (["--optimizer", "bf16_adamw", "--dtype", "bfloat16"], torch.bfloat16),
                                          (["--optimizer", "bf16_adamw"], None)])
def test_a_gpu_without_bf16_measures_what_train_py_runs(flags, dtype, monkeypatch, tmp_path, capsys):
    """On a V100 train.py trains in fp16 with a loss scale, unless told bf16 (emulated); its
    bf16_adamw, always bf16, takes being told: bench.mfu times the same, and refuses the same."""
    monkeypatch.setattr(mfu, "detect", lambda: Device(0, "Tesla V100-SXM2-16GB", 80, 16.0, (7, 0)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    seen = []

    def measure(run, variant, device):
        seen.append(run.dtype)
        raise KeyboardInterrupt  # what was to be measured is known: stop there
    monkeypatch.setattr(mfu, "measure", measure)
    with pytest.raises(SystemExit if dtype is None else KeyboardInterrupt):
        mfu.main(["--gpu", "auto", "--kernels", "torch", *flags, "--json", str(tmp_path / "m.json")])
    assert seen == ([dtype] if dtype else [])
    if dtype is None:
        assert "(set so, or the default on a GPU without native bfloat16)" in " ".join(capsys.readouterr().err.split())


def test_clock_column_shows_the_peak_the_clock_implies():
    assert mfu._clock(1755.4, 949.3) == "1755 (949)"
    assert mfu._clock(1500, None) == "1500"  # no peak behind it (an unknown GPU, --peak-tflops)
    assert mfu._clock(None, None) == "n/a"
