"""What train.py's runs compute, time, log and save, and the config values it takes or refuses:
behaviours a mutation test of train.py found no test pinned (each docstring names the change it
catches)."""
import io
import json
import math
import os
import re
import sys
from pathlib import Path
from importlib.machinery import ModuleSpec
from types import ModuleType, SimpleNamespace

import pytest
import torch
from rich.console import Console

import kernels
import train
from bench.flops import flops_per_token
from gpt import checkpoint, files
from gpt.config import COMPILE_MODES, CUDA_GRAPH_MODES, ConfigError
from gpt.data import Batches
from gpt.model import GPT, GPTConfig
from tests.devices import interpreter_only
from tests.test_files import aged, temp_name
from tests.test_train import read_log, run

CPU = ["--device=cpu", "--dtype=float32"]


def steps(log):
    return [r for r in log if "loss" in r]


def evals(log):
    return [r for r in log if "val_loss" in r]


# --- configuration ---------------------------------------------------------------------------

# nanoGPT's train.py globals: its config files (train_gpt2.py, finetune_shakespeare.py) rely on them.
NANOGPT_DEFAULTS = dict(
    out_dir="out", eval_interval=2000, log_interval=1, eval_iters=200, eval_only=False, always_save_checkpoint=True,
    init_from="scratch", wandb_log=False, wandb_project="owt", wandb_run_name="gpt2", dataset="openwebtext",
    gradient_accumulation_steps=40, batch_size=12, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0,
    bias=False, learning_rate=6e-4, max_iters=600000, weight_decay=1e-1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    decay_lr=True, warmup_iters=2000, lr_decay_iters=600000, min_lr=6e-5, backend="nccl", compile=True)


def test_a_config_file_that_sets_nothing_gets_nanogpts_defaults(tmp_path):
    """nanoGPT's config files (train_gpt2.py, finetune_shakespeare.py) leave these to its defaults."""
    empty = tmp_path / "empty.py"
    empty.write_text("# nothing set\n")
    config, _ = train.read_config([str(empty)])
    assert {k: config[k] for k in NANOGPT_DEFAULTS} == NANOGPT_DEFAULTS


@pytest.mark.parametrize("arg, message", [
    ("--eval_interval=0", "eval_interval must be at least 1, got 0"),  # a ZeroDivisionError at step 0 else
    ("--gradient_accumulation_steps=0", "gradient_accumulation_steps must be at least 1, got 0"),
    ("--grad_clip=-1.0", "grad_clip must be finite and not negative, got -1.0"),
    ("--min_lr=-1e-4", "min_lr must be finite and not negative, got -0.0001"),
    ("--peak_tflops=0", "peak_tflops must be finite and above 0, got 0.0"),
    (f"--seed={2**63}", r"seed must be in \[0, 2\*\*63\)"),
    ("--compile_mode=fast", "compile_mode must be one of .*'reduce-overhead'.*, got 'fast'"),
    ("--compile_mode=", "compile_mode must be one of .*, got ''"),
    ("--warmup_iters=-1", "warmup_iters must be finite and not negative, got -1"),
    ("--lr_decay_iters=-1", "lr_decay_iters must be finite and not negative, got -1"),
    ("--beta1=1.0", r"beta1 must be in \[0, 1\), got 1.0"),
    ("--beta1=-0.1", r"beta1 must be in \[0, 1\), got -0.1"),
    ("--init_from=", "init_from must be scratch, resume, .*got ''"),
    ("--backend=fake", "backend must be one of .*, got 'fake'"),  # torch's own, for its tests
    ("--backend=cpu:glo,cuda:nccl", "backend must be one of .*, got 'cpu:glo,cuda:nccl'"),
    ("--dtype=float64", r"dtype must be one of \('float32', 'bfloat16', 'float16'\), got 'float64'"),
])
def test_more_values_out_of_range_are_refused(arg, message):
    """Counts of at least 1, amounts not negative, betas in [0, 1), a peak above 0, a seed torch
    takes (seed + rank too), names of what exists: each refused before the set-up, where it ended
    in a schedule run backwards, a division by zero, a process group waiting for a misspelt
    backend, or a run in a dtype no kernel takes."""
    with pytest.raises(ConfigError, match=message):
        train.read_config(["--device=cpu", arg])


def test_tritongpts_own_defaults():
    """The defaults docs/training.md gives for the keys nanoGPT lacks: a run that leaves them
    unset trains as documented (compiled in torch's default mode, torch's AdamW in fp32 with the
    kernels chosen per op, nanoGPT's seed)."""
    assert {k: train.DEFAULTS[k] for k in ("compile_mode", "parallel", "kernels", "optimizer", "recompute",
                                           "stochastic_rounding", "kahan_summation", "norm_eps", "rope_theta",
                                           "data_dir", "seed")} == dict(
        compile_mode="default", parallel="ddp", kernels="auto", optimizer="adamw", recompute=False,
        stochastic_rounding=True, kahan_summation=False, norm_eps=1e-5, rope_theta=10000.0, data_dir="data",
        seed=1337)


def test_without_a_device_it_is_cuda_where_torch_sees_one(monkeypatch):
    """As nanoGPT: a GPU machine trains on its GPU, in its native dtype, from the GPU config,
    with no --device given (not on the CPU, hundreds of times slower)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train, "check_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    config, argv = train.read_config([])
    assert (config["device"], config["dtype"], argv) == ("cuda", "bfloat16", [train.DEFAULT_CONFIG])


def test_beta1_may_be_zero():
    """AdamW's beta1=0 (no momentum) is in [0, 1)."""
    assert train.read_config(["--beta1=0.0"])[0]["beta1"] == 0.0


def test_an_override_ending_in_py_is_no_config_file(tmp_path, data_dir, capsys):
    """--out_dir=run.py is a value, not a config file: the default config still comes first, and
    the run's summary names only that config as the one it read."""
    config, argv = train.read_config(["--out_dir=run.py"])
    assert argv[0] in (train.DEFAULT_CONFIG, train.DEFAULT_CPU_CONFIG) and config["dataset"] == "shakespeare_char"
    assert config["out_dir"] == "run.py"
    run(tmp_path / "run.py", data_dir, "--device=cpu", "--max_iters=0")
    out = " ".join(capsys.readouterr().out.split())
    assert "train_shakespeare_char_cpu.py, init_from scratch" in out and "--out_dir=" not in out


def test_one_process_with_parallel_fsdp_may_train_in_float16(monkeypatch, tmp_path):
    """The fsdp/float16 refusal is for torchrun's ranks: one process ignores parallel."""
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="dataset 'nosuch'"):  # got past the refusal to the data
        train.main(["--device=cpu", "--dataset=nosuch", "--dtype=float16", "--parallel=fsdp", f"--data_dir={tmp_path}"])


def test_the_architecture_warning_names_only_keys_the_config_set():
    """A resumed/pretrained checkpoint's architecture wins; the warning lists what the config set
    (n_layer 3), not keys left at their defaults (n_head 12)."""
    c = dict(train.DEFAULTS, init_from="resume", n_layer=3)
    model_args = {k: c[k] for k in train.ARCH_KEYS} | dict(n_layer=2, n_head=2, n_embd=32)
    out = io.StringIO()
    train.take_architecture(c, model_args, Console(file=out, width=1000))
    said = out.getvalue()
    assert "n_layer 3 (it has 2)" in said and "n_head" not in said and "n_embd" not in said
    assert (c["n_layer"], c["n_head"], c["n_embd"]) == (2, 2, 32)


# --- memory, compile failures ------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux's /proc")
def test_memory_on_the_cpu_is_the_peak_rss_in_gb():
    """ru_maxrss is KiB on Linux."""
    hwm_kib = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
    allocated, peak, reserved = train.memory_gb("cpu")
    assert peak == pytest.approx(hwm_kib * 1024 / 1e9, rel=0.1) and allocated == peak == reserved


def test_a_dynamo_failure_with_triton_ops_is_explained_too(capsys):
    """torch.compile's failures surface as torch._dynamo errors too (BackendCompilerFailed)."""
    dynamo_error = type("BackendCompilerFailed", (RuntimeError,), {"__module__": "torch._dynamo.exc"})
    with pytest.raises(dynamo_error):
        with train.compile_failure_explained(True, {"attention": kernels.Choice("triton", "asked for")}):
            raise dynamo_error("the compiler's own words")
    assert capsys.readouterr().err.startswith("train.py: torch.compile failed on the model with the triton kernels "
                                              "of attention")


# --- what a run computes ---------------------------------------------------------------------

def test_a_steps_loss_is_the_mean_over_its_micro_steps_of_the_seeded_windows(tmp_path, data_dir):
    """lr 0 keeps the initial weights: the step's logged loss is the mean of the model's loss over
    the gradient_accumulation_steps batches that Batches(seed) draws first."""
    run(tmp_path, data_dir, *CPU, "--dropout=0.0", "--learning_rate=0", "--seed=7", "--gradient_accumulation_steps=3",
        "--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--always_save_checkpoint=True")
    model = checkpoint.build_model(checkpoint.load(tmp_path, "cpu"))
    batches = Batches(Path(data_dir) / "shakespeare_char", 32, 8, "cpu", seed=7)
    with torch.no_grad():
        want = torch.stack([model(*batches.next())[1] for _ in range(3)]).mean().item()
    assert steps(read_log(tmp_path))[0]["loss"] == pytest.approx(want, rel=1e-5)


def test_an_evaluation_scores_each_splits_eval_windows(tmp_path, data_dir):
    """train_loss and val_loss: the mean loss over eval_iters windows of their own split."""
    log = run(tmp_path, data_dir, *CPU, "--max_iters=1", "--eval_interval=1", "--always_save_checkpoint=True")
    model = checkpoint.build_model(checkpoint.load(tmp_path, "cpu")).eval()
    batches = Batches(Path(data_dir) / "shakespeare_char", 32, 8, "cpu", seed=1337)
    with torch.no_grad():
        want = {split: torch.stack([model(x, y)[1] for x, y in batches.eval_batches(split, 4)]).mean().item()
                for split in ("train", "val")}
    last = evals(log)[-1]
    assert last["iter"] == 1
    assert (last["train_loss"], last["val_loss"]) == pytest.approx((want["train"], want["val"]), rel=1e-5)


def test_dropout_is_on_again_in_the_steps_after_an_evaluation(tmp_path, data_dir):
    """estimate_loss puts the model back in training mode."""
    args = [*CPU, "--max_iters=2", "--eval_interval=1", "--eval_iters=1"]
    on = steps(run(tmp_path / "on", data_dir, *args, "--dropout=0.5"))
    off = steps(run(tmp_path / "off", data_dir, *args, "--dropout=0.0"))
    assert all(a["loss"] != b["loss"] for a, b in zip(on, off))


def test_grad_clip_clips_at_its_value(tmp_path, data_dir):
    """A grad_clip far above the grads' norm changes nothing; a tiny one changes the steps."""
    args = [*CPU, "--dropout=0.0", "--max_iters=4", "--eval_interval=4", "--eval_iters=1"]
    losses = {clip: [r["loss"] for r in steps(run(tmp_path / clip, data_dir, *args, f"--grad_clip={clip}"))]
              for clip in ("0.0", "100.0", "0.01")}
    norms = [r["grad_norm"] for r in steps(read_log(tmp_path / "0.0"))]
    assert max(norms) < 100
    assert losses["100.0"] == losses["0.0"]
    assert losses["0.01"] != losses["0.0"]


def test_float16_clips_and_logs_the_unscaled_grad_norm(tmp_path, data_dir):
    """With a loss scale the grads are unscaled before they are clipped and their norm logged."""
    args = ["--device=cpu", "--dropout=0.0", "--max_iters=1", "--eval_interval=1", "--eval_iters=1"]
    norm = {dtype: steps(run(tmp_path / dtype, data_dir, *args, f"--dtype={dtype}"))[0]["grad_norm"]
            for dtype in ("float32", "float16")}
    assert norm["float16"] == pytest.approx(norm["float32"], rel=0.05)


def test_the_optimizer_takes_the_configs_betas_seed_and_bf16(tmp_path, data_dir):
    """The betas in their order, BF16AdamW's rounding seeded by the run's seed, bf16_adamw training in bf16."""
    for optimizer in ("adamw", "bf16_adamw"):
        run(tmp_path / optimizer, data_dir, "--device=cpu", f"--optimizer={optimizer}", "--beta1=0.8", "--beta2=0.9",
            "--seed=5", "--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--always_save_checkpoint=True")
        saved = checkpoint.load(tmp_path / optimizer, "cpu")
        groups = saved["optimizer"]["param_groups"]
        assert {tuple(g["betas"]) for g in groups} == {(0.8, 0.9)}, optimizer
        if optimizer == "bf16_adamw":
            assert {g["seed"] for g in groups} == {5}
            assert saved["config"]["dtype"] == "bfloat16"  # what the run trained in, not the CPU's float32


def test_only_a_steps_last_micro_step_syncs_grads(tmp_path, data_dir, monkeypatch):
    """DDP/FSDP reduce grads once a step, not once a micro-step."""
    flags = []
    monkeypatch.setattr(train.distributed, "grad_sync", lambda world, model, sync: flags.append(sync))
    run(tmp_path, data_dir, "--device=cpu", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
        "--gradient_accumulation_steps=3")
    assert flags == [False, False, True] * 2


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compile_true_compiles_the_model_in_its_mode(tmp_path, data_dir, monkeypatch, capsys, mode):
    """(The other tests run with compile=False.)"""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: compiled.append((model, k)) or model)
    run(tmp_path, data_dir, "--device=cpu", "--compile=True", "--max_iters=1", "--eval_interval=1",
        "--eval_iters=1", *([f"--compile_mode={mode}"] if mode else []))
    mode = mode or "default"
    assert [(type(m), k) for m, k in compiled if isinstance(m, torch.nn.Module)] == [(GPT, dict(mode=mode))]
    assert f"compiled ({mode} mode)" in capsys.readouterr().out


def test_compile_modes_are_torchs():
    modes = torch._inductor.list_mode_options()
    assert set(COMPILE_MODES) == set(modes)
    assert set(CUDA_GRAPH_MODES) == {mode for mode, options in modes.items() if options.get("triton.cudagraphs")}


@pytest.mark.parametrize("mode", CUDA_GRAPH_MODES)
def test_cuda_graphs_with_micro_steps_are_refused(tmp_path, data_dir, mode, monkeypatch):
    """A replay overwrites the last micro-step's grads, which autograd accumulates into; one
    micro-step, or the mode uncompiled, takes no such replay and goes on; on a CPU the mode takes
    no CUDA graphs, and trains."""
    monkeypatch.setattr(train, "check_device", lambda device: None)  # a GPU, as far as the refusal goes
    gpu = ["--device=cuda", "--dtype=bfloat16", f"--compile_mode={mode}"]
    with pytest.raises(SystemExit, match=f"compile_mode={mode} replays CUDA graphs.*gradient_accumulation_steps=1"):
        run(tmp_path, data_dir, *gpu, "--compile=True", "--gradient_accumulation_steps=2")

    def console(**kwargs):
        raise InterruptedError  # past the refusal (no GPU here to go on with)
    with monkeypatch.context() as m:
        m.setattr(train, "Console", console)
        for taken in (["--compile=True", "--gradient_accumulation_steps=1"],
                      ["--compile=False", "--gradient_accumulation_steps=2"]):
            with pytest.raises(InterruptedError):
                run(tmp_path, data_dir, *gpu, *taken)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # (compiling on a CPU takes minutes)
    log = run(tmp_path, data_dir, "--device=cpu", "--compile=True", f"--compile_mode={mode}",
              "--gradient_accumulation_steps=2", "--max_iters=1")
    assert [r["iter"] for r in log if "loss" in r] == [0]


def test_an_indexed_gpu_is_made_current_first(tmp_path, data_dir, monkeypatch):
    """--device=cuda:1 in one process: the kernels' profile and self-checks ask the current GPU,
    so cuda:1 is made it before them."""
    made = []

    def set_device(device):
        made.append(device)
        raise InterruptedError  # (no GPU here to go on with)
    monkeypatch.setattr(train, "check_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(kernels, "choose", lambda *a, **k: pytest.fail("kernels chosen before cuda:1 was current"))
    with pytest.raises(InterruptedError):
        run(tmp_path, data_dir, "--device=cuda:1", "--dtype=bfloat16")
    assert made == ["cuda:1"]


def test_a_gpu_run_takes_tf32_matmuls_and_gives_the_callers_back(tmp_path, data_dir, monkeypatch):
    """nanoGPT's TF32 matmuls on a GPU (fp32 ones run at a fraction of the tensor cores' speed),
    and once the run ends the caller's settings again (a notebook's fp32 matmuls stayed TF32)."""
    class Stop(Exception):
        pass
    before, seen = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32), []

    def master_first(world, make):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        raise Stop  # (no GPU here to go on with)
    monkeypatch.setattr(train, "check_device", lambda device: None)
    monkeypatch.setattr(train.distributed, "master_first", master_first)
    with pytest.raises(Stop):
        run(tmp_path, data_dir, "--device=cuda", "--dtype=bfloat16")
    assert seen == [(True, True)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.fixture
def clock(monkeypatch):
    """train.py's clock, advanced by the data alone: 1 s a micro-step's batch, 50 s for a run's
    first batch (compile, warm-up), 100 s for each split of an evaluation."""
    now, first = [0.0], [True]
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    draw, scored = Batches.next, Batches.eval_batches

    def next_(self, split="train"):
        now[0] += 50.0 if first[0] else 1.0
        first[0] = False
        return draw(self, split)

    def eval_batches(self, split, count):
        now[0] += 100.0
        yield from scored(self, split, count)
    monkeypatch.setattr(Batches, "next", next_)
    monkeypatch.setattr(Batches, "eval_batches", eval_batches)
    return first


def test_step_time_counts_the_steps_alone(tmp_path, data_dir, clock):
    """step_ms: the time since the last log over the steps since, every log_interval steps, not
    counting evaluations nor the first step (compile); tokens_per_s counts every micro-step's
    tokens; hw_tflops the recomputed blocks; mfu is against the peak_tflops given."""
    args = [*CPU, "--log_interval=2", "--gradient_accumulation_steps=2", "--eval_iters=1",
            "--always_save_checkpoint=True"]
    log = run(tmp_path / "a", data_dir, *args, "--max_iters=8", "--eval_interval=4", "--recompute=1",
              "--peak_tflops=50")
    timed = steps(log)
    assert [r["iter"] for r in timed] == [0, 2, 4, 6] and "step_ms" not in timed[0]
    for r in timed[1:]:
        assert r["step_ms"] == pytest.approx(2000.0), r["iter"]  # 2 micro-steps of 1 s
        assert r["tokens_per_s"] == pytest.approx(2 * 8 * 32 / 2.0), r["iter"]
    config = GPTConfig(**checkpoint.load(tmp_path / "a", "cpu")["model_args"])
    hardware = flops_per_token(config, 32, recomputed=1).hardware
    assert timed[-1]["hw_tflops"] == pytest.approx(timed[-1]["tokens_per_s"] * hardware / 1e12)
    assert timed[-1]["mfu"] == pytest.approx(timed[-1]["tflops"] / 50)
    # A resumed run's first step (3, not logged) compiles: step 4's time is its own.
    run(tmp_path / "b", data_dir, *args, "--max_iters=3", "--eval_interval=3")
    clock[0] = True
    log = run(tmp_path / "b", data_dir, *args, "--max_iters=6", "--eval_interval=3", "--init_from=resume")
    assert [r["iter"] for r in steps(log)] == [0, 2, 4]  # the first run's 0 and 2, then 4
    assert steps(log)[-1]["step_ms"] == pytest.approx(2000.0)


# --- checkpoints and logs --------------------------------------------------------------------

def test_a_resumed_run_keeps_the_checkpoints_best_val_loss(tmp_path, data_dir):
    """best_val_loss comes back with the checkpoint, and a worse evaluation does not replace it."""
    args = [*CPU, "--eval_interval=2", "--eval_iters=1"]
    run(tmp_path, data_dir, *args, "--max_iters=2", "--always_save_checkpoint=True")
    checkpoint.save(dict(checkpoint.load(tmp_path, "cpu"), best_val_loss=0.5), tmp_path)  # a best none reaches here
    run(tmp_path, data_dir, *args, "--max_iters=4", "--init_from=resume", "--always_save_checkpoint=False")
    assert checkpoint.load(tmp_path, "cpu")["iter_num"] == 2  # no evaluation beat 0.5: nothing saved
    run(tmp_path, data_dir, *args, "--max_iters=6", "--init_from=resume", "--always_save_checkpoint=True")
    saved = checkpoint.load(tmp_path, "cpu")
    assert (saved["iter_num"], saved["best_val_loss"]) == (6, 0.5)


def test_the_untrained_model_is_never_saved(tmp_path, data_dir, monkeypatch):
    """Iteration 0's evaluation saves nothing (nanoGPT's iter_num > 0)."""
    lr_at = train.lr_at

    def interrupted(it, c):
        if it == 1:
            raise KeyboardInterrupt
        return lr_at(it, c)
    monkeypatch.setattr(train, "lr_at", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, data_dir, "--device=cpu", "--max_iters=4", "--eval_interval=2", "--eval_iters=1",
            "--always_save_checkpoint=True")
    assert not (tmp_path / checkpoint.FILENAME).exists()


def test_a_checkpoint_the_disk_cannot_take_ends_the_run_saying_so_and_keeps_the_last(tmp_path, data_dir,
                                                                                     monkeypatch):
    """A full disk mid-save (torch's writer reports the short write as a RuntimeError) ends the
    run with a message giving the free space, not a traceback; the last checkpoint stays whole."""
    args = [*CPU, "--eval_interval=2", "--eval_iters=1", "--always_save_checkpoint=True"]
    run(tmp_path, data_dir, *args, "--max_iters=2")

    def short_write(obj, f):
        f.write(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 241536 vs 241424")
    monkeypatch.setattr(checkpoint.torch, "save", short_write)
    with pytest.raises(SystemExit, match=r"^train.py: the checkpoint could not be written \([\d,]+ MiB free in "
                                         r".*\): torch.save could not write it whole \(.*unexpected pos.*\); the "
                                         r"last one there is as it was$"):
        run(tmp_path, data_dir, *args, "--max_iters=4", "--init_from=resume")
    monkeypatch.undo()
    assert checkpoint.load(tmp_path, "cpu")["iter_num"] == 2 and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_log_the_disk_cannot_take_ends_the_run_saying_so(tmp_path, data_dir):
    """A full disk under the log (/dev/full here) ends the run as a checkpoint's does, with the free
    space: it was three chained tracebacks (the write's, then the file's close failing to flush
    the same bytes) naming neither the file nor the disk."""
    run(tmp_path, data_dir, *CPU, "--max_iters=1", "--eval_interval=1", "--eval_iters=1",
        "--always_save_checkpoint=True")
    (tmp_path / "log.jsonl").unlink()
    (tmp_path / "log.jsonl").symlink_to("/dev/full")  # eval_only appends to the log as it is
    with pytest.raises(SystemExit, match=r"^train.py: the log could not be written \([\d,]+ MiB free in .*\): "
                                         r"\[Errno 28\] No space left on device; the last checkpoint there is as "
                                         r"it was$"):
        run(tmp_path, data_dir, *CPU, "--eval_iters=1", "--init_from=resume", "--eval_only=True")


@pytest.mark.parametrize("key", ["out_dir", "data_dir"])
@pytest.mark.parametrize("under", ["", "sub/folder"])
def test_a_folder_it_cannot_make_is_a_message_naming_the_setting(tmp_path, key, under):
    """out_dir or data_dir naming a file, or a folder under one: train.py's message, not a
    traceback (NotADirectoryError naming neither the setting nor the file, once), before the data
    is prepared."""
    taken = tmp_path / "a_file"
    taken.write_text("")
    folders = {"out_dir": tmp_path / "out", "data_dir": tmp_path / "data", key: taken / under}
    with pytest.raises(SystemExit, match=f"^train.py: {key} {folders[key]}: {taken} is a file, not a directory$"):
        train.main([*CPU, *(f"--{k}={v}" for k, v in folders.items()), "--max_iters=1"])
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("log_interval, stop", [(1, "iter 3: training loss nan"),
                                                 (100, "iter 4: train loss nan, val loss nan")])
def test_a_run_whose_loss_is_nan_stops_and_keeps_its_last_good_checkpoint(tmp_path, data_dir, monkeypatch,
                                                                            log_interval, stop):
    """Weights gone NaN (the learning rate NaN from iter 2 on) stop the run at the first logged
    step or evaluation that shows it, before always_save_checkpoint writes them over the
    checkpoint of iter 2; the log holds null for the NaN losses (JSON has no NaN)."""
    lr_at = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda it, c: math.nan if it >= 2 else lr_at(it, c))
    diverged = rf"^train.py: {stop}: the run has diverged .*keeps the last checkpoint saved$"
    with pytest.raises(SystemExit, match=diverged):
        run(tmp_path, data_dir, *CPU, "--max_iters=6", "--eval_interval=2", "--eval_iters=1",
            "--always_save_checkpoint=True", f"--log_interval={log_interval}")
    saved = checkpoint.load(tmp_path, "cpu")
    assert saved["iter_num"] == 2 and all(t.isfinite().all() for t in saved["model"].values())
    with open(tmp_path / "log.jsonl") as f:
        last = json.loads(f.readlines()[-1], parse_constant=lambda name: pytest.fail(f"{name} in the log"))
    assert None in last.values()


def test_a_float16_loss_that_overflows_once_is_skipped_by_the_scaler_not_a_divergence(tmp_path, data_dir,
                                                                                        monkeypatch):
    """Under float16 an overflow is the loss scaler's to handle: it skips that step (the weights
    stay finite) and lowers its scale; the run goes on, the log holding null for that loss."""
    lr_at, forward, now = train.lr_at, GPT.forward, [None]
    monkeypatch.setattr(train, "lr_at", lambda it, c: now.__setitem__(0, it) or lr_at(it, c))  # once an iteration

    def overflowing(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        return logits, loss * math.inf if self.training and now[0] == 1 else loss
    monkeypatch.setattr(GPT, "forward", overflowing)
    log = run(tmp_path, data_dir, "--device=cpu", "--dtype=float16", "--max_iters=3", "--eval_interval=3",
              "--eval_iters=1", "--always_save_checkpoint=True")
    assert [r["loss"] is None for r in steps(log)] == [False, True, False]
    assert all(t.isfinite().all() for t in checkpoint.load(tmp_path, "cpu")["model"].values())


def test_a_run_that_diverges_before_its_first_save_names_no_checkpoint(tmp_path, data_dir, monkeypatch):
    """A new run set the last one's checkpoint aside: out_dir keeps none to speak of."""
    monkeypatch.setattr(train, "lr_at", lambda it, c: math.nan)
    with pytest.raises(SystemExit, match=r"^train.py: iter 1: training loss nan: .*nothing is saved from it$"):
        run(tmp_path, data_dir, *CPU, "--max_iters=6", "--eval_interval=4", "--eval_iters=1", "--log_interval=1")


def test_a_resume_past_max_iters_and_a_run_that_saved_nothing_say_so(tmp_path, data_dir, capsys):
    """Neither ends silently: a resume with no step left to take, and a run whose evaluations
    never beat the best (learning rate 0) with always_save_checkpoint off. An eval_only run takes
    no steps anyway: nothing said of them."""
    args = [*CPU, "--eval_interval=2", "--eval_iters=1"]
    run(tmp_path, data_dir, *args, "--max_iters=2", "--always_save_checkpoint=True")
    capsys.readouterr()
    run(tmp_path, data_dir, *args, "--max_iters=1", "--init_from=resume")
    printed = " ".join(capsys.readouterr().out.split())
    assert "the checkpoint is at iter 2, max_iters=1: no step to take (raise max_iters to train on)" in printed
    run(tmp_path, data_dir, *args, "--max_iters=1", "--init_from=resume", "--eval_only=True")
    assert "no step to take" not in " ".join(capsys.readouterr().out.split())
    run(tmp_path / "flat", data_dir, *args, "--max_iters=4", "--learning_rate=0", "--min_lr=0",
        "--always_save_checkpoint=False")
    printed = " ".join(capsys.readouterr().out.split())
    assert "this run saved no checkpoint: no evaluation beat the best val loss," in printed
    assert not (tmp_path / "flat" / checkpoint.FILENAME).exists()


def test_a_second_run_in_an_out_dir_being_trained_in_is_refused_and_changes_nothing(tmp_path, data_dir):
    """Two runs in one out_dir would set aside, trim and overwrite each other's checkpoint and log:
    the second is refused while the first holds out_dir's lock. An evaluation may run beside it."""
    args = [*CPU, "--eval_interval=2", "--eval_iters=1", "--always_save_checkpoint=True"]
    run(tmp_path, data_dir, *args, "--max_iters=2")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    training = os.open(tmp_path, os.O_RDONLY)  # another process's lock: another open directory's here
    try:
        assert files.try_lock(training)
        with pytest.raises(SystemExit, match=r"^train.py: another run is training in \S+ \(it holds the directory"):
            run(tmp_path, data_dir, *args, "--max_iters=4")
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
        assert run(tmp_path, data_dir, *args, "--init_from=resume", "--eval_only=True")[-1]["eval_only"]
    finally:
        os.close(training)
    run(tmp_path, data_dir, *args, "--max_iters=4", "--init_from=resume")  # the lock went with its holder


def test_eval_only_appends_to_the_whole_log_and_its_record_outlives_a_resume(tmp_path, data_dir):
    """An eval_only resume trims nothing from the log, and a later resume keeps the eval_only record."""
    args = [*CPU, "--eval_interval=2", "--eval_iters=1", "--always_save_checkpoint=True"]
    run(tmp_path, data_dir, *args, "--max_iters=2")
    past = {"iter": 3, "loss": 1.0}  # a step a killed run took past its checkpoint
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write(json.dumps(past) + "\n")
    log = run(tmp_path, data_dir, *args, "--init_from=resume", "--eval_only=True")
    assert past in log and log[-1]["eval_only"] and log[-1]["iter"] == 2
    log = run(tmp_path, data_dir, *args, "--max_iters=4", "--init_from=resume")
    assert past not in log
    assert [r["iter"] for r in evals(log) if r.get("eval_only")] == [2]


def test_a_new_run_starts_its_log_afresh_with_no_checkpoint_to_set_aside(tmp_path, data_dir, capsys):
    """A log left in out_dir by a run with no checkpoint is replaced, not appended to; the file of
    a checkpoint write that was killed is removed, and said (a file of gigabytes gone unexplained)."""
    (tmp_path / "log.jsonl").write_text(json.dumps({"iter": 7, "loss": 1.0}) + "\n")
    torn = aged(tmp_path / temp_name(checkpoint.FILENAME))
    log = run(tmp_path, data_dir, "--device=cpu", "--max_iters=1", "--eval_interval=1", "--eval_iters=1")
    assert "kernels" in log[0] and all(r["iter"] <= 1 for r in log)
    assert not torn.exists()
    assert f"removed {torn}, a checkpoint write that was killed" in " ".join(capsys.readouterr().out.split())


def test_a_resume_off_the_interval_drops_the_steps_a_killed_run_logged_at_its_checkpoint(tmp_path, data_dir):
    """The checkpoint at 3 (a final evaluation off eval_interval 2) keeps its evaluation, but a
    step record at 3 (the killed run past it) gives way to the resumed run's."""
    args = [*CPU, "--eval_interval=2", "--eval_iters=1", "--always_save_checkpoint=True"]
    run(tmp_path, data_dir, *args, "--max_iters=3")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write(json.dumps({"iter": 3, "loss": 99.0}) + "\n")
    log = run(tmp_path, data_dir, *args, "--max_iters=4", "--init_from=resume")
    assert [r["iter"] for r in steps(log)] == [0, 1, 2, 3] and steps(log)[-1]["loss"] != 99.0
    assert [r["iter"] for r in evals(log)] == [0, 2, 3, 4]


def test_gpt2_bpe_data_from_scratch_takes_nanogpts_padded_vocabulary_and_needs_eot(tmp_path, data_dir):
    """Scratch on GPT-2 BPE data (no meta.pkl): nanoGPT's 50304 tokens. A model of 50256 tokens
    lacks <|endoftext|> (id 50256, the data's 50257th token): refused."""
    bpe = [*CPU, "--dataset=shakespeare", "--eval_iters=1", "--batch_size=2"]
    run(tmp_path / "scratch", data_dir, *bpe, "--max_iters=1", "--eval_interval=1", "--always_save_checkpoint=True")
    assert checkpoint.load(tmp_path / "scratch", "cpu")["model_args"]["vocab_size"] == 50304
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50256)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)
    (tmp_path / "short").mkdir()
    checkpoint.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), model_args=vars(config),
                         iter_num=1, best_val_loss=9.0), tmp_path / "short")
    with pytest.raises(SystemExit, match="has a 50256-token vocabulary; dataset shakespeare has 50257 tokens"):
        run(tmp_path / "short", data_dir, *bpe, "--init_from=resume", "--max_iters=2")


# --- several processes, as far as one process can show it --------------------------------------

@pytest.fixture
def fake_world(monkeypatch):
    """distributed.init answering a World of `parallel` with no process group: enough for train.py's
    set-up up to what a test stops it at (no collective runs before the model is sharded)."""
    from gpt import distributed

    def make(parallel, size=1, rank=0):
        world = distributed.World(rank=rank, size=size, parallel=parallel)
        monkeypatch.setattr(train.distributed, "init", lambda parallel, backend, device: (world, device))
        monkeypatch.setattr(train.distributed, "master_first", lambda world, make: make())
        return world
    return make


def test_zero1_refuses_a_sharded_checkpoint_and_fsdp_a_full_one(tmp_path, data_dir, monkeypatch, fake_world):
    for parallel, saved, kind in (("zero1", {"sharded": {}}, "sharded"), ("fsdp", {}, "full")):
        fake_world(parallel, size=2)
        monkeypatch.setattr(train.checkpoint, "locate", lambda out_dir: Path(out_dir) / "ckpt.pt")
        monkeypatch.setattr(train.checkpoint, "load", lambda out_dir, device, resume, saved=saved: saved)
        with pytest.raises(SystemExit, match=f"parallel={parallel} cannot resume the {kind} checkpoint"):
            run(tmp_path, data_dir, "--device=cpu", "--init_from=resume", "--gradient_accumulation_steps=2")


@interpreter_only  # (this rank's self-check runs swiglu's triton backend on CPU tensors)
def test_a_kernel_refused_on_one_rank_is_refused_on_every_rank(tmp_path, data_dir, monkeypatch, fake_world):
    """A backend named in a dict that passes its self-check here but fails it on rank 1: this rank
    stops too, with rank 1's reason (alone, rank 1 would leave the others waiting for it)."""
    fake_world("ddp", size=2)
    theirs = "train.py: kernels={'swiglu': 'triton'}: swiglu: its triton backend, asked for, failed (rank 1)"
    monkeypatch.setattr(train.distributed, "gather", lambda refused: [refused, theirs])
    with pytest.raises(SystemExit, match=re.escape(theirs)):
        run(tmp_path, data_dir, "--device=cpu", "--kernels={'swiglu': 'triton'}", "--mlp=swiglu",
            "--gradient_accumulation_steps=2")


def test_fsdp_gathers_fp32_weights_in_bf16_only_when_training_in_bf16(tmp_path, data_dir, monkeypatch, fake_world):
    class Stop(Exception):
        pass
    seen = []

    def shard(model, device, param_dtype):
        seen.append(param_dtype)
        raise Stop
    fake_world("fsdp")
    monkeypatch.setattr(train.distributed, "shard", shard)
    for dtype, optimizer in (("bfloat16", "adamw"), ("float32", "adamw"), ("bfloat16", "bf16_adamw")):
        with pytest.raises(Stop):
            run(tmp_path, data_dir, "--device=cpu", f"--dtype={dtype}", f"--optimizer={optimizer}", "--kernels=torch")
    assert seen == [torch.bfloat16, None, None]


def test_ddp_counts_every_ranks_tokens_and_draws_each_ranks_own_dropout(tmp_path, data_dir):
    """Two processes under torchrun (about 10-20 s): tokens_per_s counts both ranks' tokens (2 ranks
    x 2 micro-steps x 4 x 32 a step), TFLOPS (and MFU) are per GPU, and each rank seeds its own
    dropout masks."""
    from tests.test_distributed import TWO, torchrun
    log, _ = torchrun(tmp_path, data_dir, *TWO, "--parallel=ddp", "--max_iters=3", "--eval_interval=3",
                      "--dropout=0.1")
    timed = [r for r in log if "step_ms" in r]
    assert timed and all(r["tokens_per_s"] * r["step_ms"] / 1000 == pytest.approx(2 * 2 * 4 * 32) for r in timed)
    palm = flops_per_token(GPTConfig(**checkpoint.load(tmp_path, "cpu")["model_args"]), 32).palm
    assert all(r["tflops"] == pytest.approx(r["tokens_per_s"] / 2 * palm / 1e12) for r in timed)  # per GPU
    rng = checkpoint.load(tmp_path, "cpu")["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


def test_wandb_gets_the_config_with_each_op_s_backend_and_every_record_at_its_step(tmp_path, data_dir, monkeypatch):
    """wandb_log=True (a stand-in wandb module): nanoGPT's project and run name, the config with
    the backend each op ran on, and each step's and evaluation's record at its iteration, the
    losses under nanoGPT's names."""
    inits, logged = [], []
    wandb = ModuleType("wandb")
    wandb.__spec__ = ModuleSpec("wandb", None)  # (some import machinery looks for it)
    wandb.init, wandb.log = lambda **kw: inits.append(kw), lambda record, step: logged.append((step, record))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    log = run(tmp_path, data_dir, "--wandb_log=True", "--wandb_project=p", "--wandb_run_name=r", "--max_iters=4",
              "--eval_interval=2", "--log_interval=1")
    [init] = inits
    assert (init["project"], init["name"], init["config"]["max_iters"]) == ("p", "r", 4)
    assert init["config"]["backends"] == log[0]["kernels"] and "attention" in log[0]["kernels"]
    assert [(r["iter"], {train.WANDB_NAMES.get(k, k): v for k, v in r.items()}) for r in log[1:]] == logged
    assert {"train/loss", "val/loss"} <= set(logged[0][1]) and "loss" in logged[1][1]


def test_only_the_master_starts_a_wandb_run(tmp_path, data_dir, monkeypatch, fake_world):
    """Under torchrun every rank but 0 logs nothing: a wandb run started on each would be as many
    runs in the project, all but one empty."""
    inits = []
    wandb = ModuleType("wandb")
    wandb.__spec__ = ModuleSpec("wandb", None)
    wandb.init = lambda **kw: inits.append(kw)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    fake_world(None, rank=1)  # a rank other than 0, with no collectives

    def progress(*args, **kwargs):
        raise InterruptedError  # the training loop reached: wandb's run started by now, if ever
    monkeypatch.setattr(train, "Progress", progress)
    with pytest.raises(InterruptedError):
        run(tmp_path, data_dir, "--device=cpu", "--wandb_log=True")
    assert inits == []


def test_each_record_logs_the_learning_rate_of_its_iteration(tmp_path, data_dir):
    """A step's record and an evaluation's carry the schedule's lr at their iteration: warm-up
    (it+1)/(warmup_iters+1), cosine, then min_lr."""
    log = run(tmp_path, data_dir, *CPU, "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--warmup_iters=2",
              "--lr_decay_iters=4", "--learning_rate=3e-3", "--min_lr=1e-4")
    want = {0: 1e-3, 1: 2e-3, 2: 3e-3, 3: 1e-4 + 0.5 * (3e-3 - 1e-4), 4: 1e-4}
    assert {r["iter"]: r["lr"] for r in steps(log)} == pytest.approx({it: want[it] for it in range(4)})
    assert {r["iter"]: r["lr"] for r in evals(log)} == pytest.approx({it: want[it] for it in (0, 2, 4)})


def test_the_logged_grad_norm_is_the_norm_of_the_micro_steps_mean_gradient(tmp_path, data_dir):
    """Each micro-step's loss is divided by gradient_accumulation_steps before its backward: the
    grads (and the logged grad_norm) are those of the mean loss over the step's batches."""
    run(tmp_path, data_dir, *CPU, "--dropout=0.0", "--learning_rate=0", "--seed=7", "--gradient_accumulation_steps=3",
        "--grad_clip=0.0", "--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--always_save_checkpoint=True")
    model = checkpoint.build_model(checkpoint.load(tmp_path, "cpu"))
    batches = Batches(Path(data_dir) / "shakespeare_char", 32, 8, "cpu", seed=7)
    torch.stack([model(*batches.next())[1] for _ in range(3)]).mean().backward()
    want = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert steps(read_log(tmp_path))[0]["grad_norm"] == pytest.approx(want.item(), rel=1e-4)


def test_grad_clip_scales_the_grads_to_its_norm(tmp_path, data_dir, monkeypatch):
    """The optimizer steps with grads of norm grad_clip where theirs was larger (test_grad_clip_clips_at_its_value
    cannot tell 0.01 from 0.1: Adam's step hardly changes with a constant scale on its grads)."""
    clip, seen = train.clip_for_step, []

    def clipped(optimizer, params, max_norm, grad_norm):
        params = list(params)
        norm = clip(optimizer, params, max_norm, grad_norm)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        seen.append((norm.item(), after.item()))
        return norm
    monkeypatch.setattr(train, "clip_for_step", clipped)
    run(tmp_path, data_dir, *CPU, "--dropout=0.0", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
        "--grad_clip=0.01")
    assert len(seen) == 2 and all(before > 0.01 and after == pytest.approx(0.01, rel=1e-3) for before, after in seen)


def test_float16_without_clipping_logs_the_unscaled_grad_norm(tmp_path, data_dir):
    """grad_clip=0: the logged grad norm is still of the unscaled grads (the loss scale is 65536)."""
    args = ["--device=cpu", "--dropout=0.0", "--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--grad_clip=0.0"]
    norm = {dtype: steps(run(tmp_path / dtype, data_dir, *args, f"--dtype={dtype}"))[0]["grad_norm"]
            for dtype in ("float32", "float16")}
    assert norm["float16"] == pytest.approx(norm["float32"], rel=0.05)


def test_a_resume_in_float16_keeps_the_checkpoints_loss_scale(tmp_path, data_dir):
    """The checkpoint's GradScaler state comes back: a scale lowered by overflows is not reset to
    65536 (whose overflows would skip the resumed run's first steps)."""
    args = ["--device=cpu", "--dtype=float16", "--eval_interval=1", "--eval_iters=1", "--always_save_checkpoint=True"]
    run(tmp_path, data_dir, *args, "--max_iters=1")
    saved = checkpoint.load(tmp_path, "cpu")
    saved["scaler"]["scale"] = 1024.0
    checkpoint.save(saved, tmp_path)
    run(tmp_path, data_dir, *args, "--max_iters=2", "--init_from=resume")
    assert checkpoint.load(tmp_path, "cpu")["scaler"]["scale"] == 1024.0


def test_a_checkpoint_is_saved_when_the_val_loss_beats_the_best_not_the_train_loss(tmp_path, data_dir):
    """always_save_checkpoint=False saves where val_loss beats best_val_loss; train_loss has no say.
    At lr 0 the resumed run's evaluations (at 2 again, and 4) score as the first run's at 2 did; a
    best between its two losses is beaten by the val loss only if that is the lower."""
    args = [*CPU, "--eval_interval=2", "--eval_iters=1", "--learning_rate=0", "--min_lr=0", "--dropout=0.0"]
    log = run(tmp_path, data_dir, *args, "--max_iters=2", "--always_save_checkpoint=True")
    train_loss, val_loss = evals(log)[-1]["train_loss"], evals(log)[-1]["val_loss"]
    assert train_loss != val_loss
    best = (train_loss + val_loss) / 2
    checkpoint.save(dict(checkpoint.load(tmp_path, "cpu"), best_val_loss=best), tmp_path)
    before = (tmp_path / checkpoint.FILENAME).stat().st_mtime_ns
    log = run(tmp_path, data_dir, *args, "--max_iters=4", "--init_from=resume", "--always_save_checkpoint=False")
    assert (evals(log)[-1]["train_loss"], evals(log)[-1]["val_loss"]) == (train_loss, val_loss)
    beaten = val_loss < best
    assert ((tmp_path / checkpoint.FILENAME).stat().st_mtime_ns != before) == beaten
    assert checkpoint.load(tmp_path, "cpu")["best_val_loss"] == (val_loss if beaten else best)


def test_step_time_leaves_out_the_time_logging_takes(tmp_path, data_dir, clock, monkeypatch):
    """The clock restarts after each log: a log's own time (here 1000 s at each, taken as its
    memory is read) is in no step's step_ms."""
    base, extra, memory_gb = train.time.perf_counter, [0.0], train.memory_gb
    monkeypatch.setattr(train.time, "perf_counter", lambda: base() + extra[0])
    monkeypatch.setattr(train, "memory_gb", lambda device_type: extra.__setitem__(0, extra[0] + 1000.0)
                        or memory_gb(device_type))
    log = run(tmp_path, data_dir, *CPU, "--log_interval=2", "--gradient_accumulation_steps=2", "--eval_iters=1",
              "--max_iters=8", "--eval_interval=8")
    timed = steps(log)
    assert [r["iter"] for r in timed] == [0, 2, 4, 6]
    assert [r["step_ms"] for r in timed[1:]] == pytest.approx([2000.0] * 3)


def test_eval_only_scores_nan_weights_without_calling_it_a_divergence(tmp_path, data_dir):
    """An eval_only run reports what it scored, null for a NaN loss, and ends normally: it trains
    nothing, so there is no run to stop and no checkpoint to keep."""
    args = [*CPU, "--eval_interval=1", "--eval_iters=1", "--always_save_checkpoint=True"]
    run(tmp_path, data_dir, *args, "--max_iters=1")
    saved = checkpoint.load(tmp_path, "cpu")
    next(iter(saved["model"].values())).fill_(math.nan)
    checkpoint.save(saved, tmp_path)
    log = run(tmp_path, data_dir, *args, "--init_from=resume", "--eval_only=True")
    assert log[-1]["eval_only"] and log[-1]["val_loss"] is None
