"""Train a GPT with nanoGPT's interface: python train.py [config.py] [--key=value ...]

With no config file it trains the shakespeare-char baby GPT (config/train_shakespeare_char.py on a
GPU, nanoGPT's small CPU recipe in config/train_shakespeare_char_cpu.py on a CPU). nanoGPT config
files run unchanged. Several GPUs: torchrun --standalone --nproc_per_node=8 train.py config.py,
with --parallel=ddp (the default), zero1 or fsdp (see gpt/distributed.py).
"""
import functools
import gc
import importlib.util
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import kernels
from gpt import checkpoint, distributed, pretrained
from gpt.config import (COMPILE_MODES, CUDA_GRAPH_MODES, DTYPES, OPTIMIZERS, RUN_KEYS, ConfigError, check_device,
                        check_seed, make_current, optimizer_dtype, parse_args, printed_help, reported as reported_by,
                        training_dtype)
from gpt.data import Batches, DataError, is_built, load_meta, prepare
from gpt.files import blocking_file, log_record, try_lock, unwritten, write_atomic
from gpt.preemption import Preemption
from gpt.tokenizer import EOT
from bench import plan, shown
from bench.cases import Shapes
from bench.mfu import MFUMeter
from gpt.model import ARCH_KEYS, GPT, GPTConfig, model_ops, preset_architecture, recompute_count
from gpt.optim import BF16AdamW, clip_for_step, derived_seed, global_grad_norm, optimizer_ops

# nanoGPT's keys and defaults (GPT-2 124M on OpenWebText), then tritongpt's own.
DEFAULTS = dict(
    # I/O
    out_dir="out", eval_interval=2000, log_interval=1, eval_iters=200, eval_only=False,
    always_save_checkpoint=True, init_from="scratch",  # scratch | resume | gpt2* | a Hugging Face GPT-2 directory
    # wandb logging
    wandb_log=False, wandb_project="owt", wandb_run_name="gpt2",
    # data
    dataset="openwebtext", gradient_accumulation_steps=5 * 8, batch_size=12, block_size=1024,
    # model
    n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=False,
    # AdamW and its learning-rate schedule (linear warm-up, cosine decay to min_lr)
    learning_rate=6e-4, max_iters=600000, weight_decay=1e-1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    decay_lr=True, warmup_iters=2000, lr_decay_iters=600000, min_lr=6e-5,
    # system: device and dtype None choose CUDA and bf16 (fp16 on older GPUs) when present, else
    # CPU and fp32
    backend="nccl", device=None, dtype=None, compile=True,
    compile_mode="default",  # torch.compile's mode (gpt.config.COMPILE_MODES): reduce-overhead takes CUDA graphs
    parallel="ddp",  # under torchrun: ddp | zero1 | fsdp (gpt/distributed.py); one process ignores it
    peak_tflops=None,  # the GPU's dense peak for MFU, for a GPU bench.hardware does not know
    # tritongpt
    kernels="auto",  # torch | triton | auto, or {op: backend}: which backend runs each op (see kernels.choose)
    optimizer="adamw",  # adamw: torch AdamW, fp32 weights | bf16_adamw: bf16 weights and moments
    recompute=False,  # activation checkpointing: True every block, or the first n (less memory, ~1/4 more FLOPs each)
    stochastic_rounding=True,  # bf16_adamw: round bf16 stores stochastically (False: to nearest)
    kahan_summation=False,  # bf16_adamw: keep each param's rounding error (2 B/param), not rounding it at random
    preset=None,  # an architecture from gpt.model.PRESETS: its keys, where it stands (keys set after it win)
    n_kv_head=None, norm="layernorm", norm_position="pre", norm_eps=1e-5, pos_encoding="learned",
    rope_theta=10000.0, mlp="gelu", activation="gelu", mlp_hidden=None, tie_weights=True,
    data_dir="data", seed=1337,
)
# Keys that take a second type besides their default's; for a None default, the type it takes.
ALSO = {"recompute": int, **RUN_KEYS, "peak_tflops": float, "preset": str, "n_kv_head": int, "mlp_hidden": int}
# wandb charts under nanoGPT's names where it logs the same value.
WANDB_NAMES = {"train_loss": "train/loss", "val_loss": "val/loss"}
# Counts that must be at least 1, and amounts that must not be negative (0 grad_clip: no clipping).
COUNTS = ("batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval", "eval_iters")
AMOUNTS = ("max_iters", "warmup_iters", "lr_decay_iters", "learning_rate", "min_lr", "weight_decay", "grad_clip")
reported = functools.partial(reported_by, "train.py")  # a user's mistake: its message, not a traceback
CONFIG_DIR = Path(__file__).resolve().parent / "config"  # found from any working directory
DEFAULT_CONFIG = str(CONFIG_DIR / "train_shakespeare_char.py")
DEFAULT_CPU_CONFIG = str(CONFIG_DIR / "train_shakespeare_char_cpu.py")


def parse_config(argv: list[str]) -> dict:
    """The defaults, then the config files and --key=value arguments in order (a preset setting
    every architecture key where it stands), each value in its key's range; device and dtype as
    set, None for this machine's (read_config's), which a plan for another machine leaves."""
    config = dict(DEFAULTS)
    config.update(parse_args(argv, DEFAULTS, ALSO, implied=preset_architecture))
    check_ranges(config)
    return config


def read_config(argv: list[str]) -> tuple[dict, list[str]]:
    """(config, argv): parse_config's, its device and dtype this machine's where not set, the
    device one it has. With no config file in argv, the shakespeare-char config for this
    machine is put first."""
    if not any(arg.endswith(".py") and not arg.startswith("--") for arg in argv):
        argv = [DEFAULT_CONFIG if torch.cuda.is_available() else DEFAULT_CPU_CONFIG, *argv]
    config = parse_config(argv)
    if config["device"] is None:
        config["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(config["device"])
    config["dtype"] = config["dtype"] or training_dtype(config["device"])
    return config, argv


def check_ranges(config: dict) -> None:
    """A value out of its key's range is refused before any set-up (it ended in a division by
    zero, an empty batch or NaN losses minutes later)."""
    for key in COUNTS:
        if config[key] < 1:
            raise ConfigError(f"{key} must be at least 1, got {config[key]}")
    for key in AMOUNTS:  # (an infinite one trains NaNs, or never ends)
        if not (math.isfinite(config[key]) and config[key] >= 0):
            raise ConfigError(f"{key} must be finite and not negative, got {config[key]}")
    for key in ("beta1", "beta2"):
        if not 0 <= config[key] < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {config[key]}")
    if config["init_from"] not in ("scratch", "resume") and not pretrained.is_pretrained(config["init_from"]):
        raise ConfigError(f"init_from must be scratch, resume, {pretrained.CHOICES}; got {config['init_from']!r}")
    if config["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {config['optimizer']!r}")
    # (used under torchrun on GPUs alone: a typo would wait for that); one, or device:backend pairs
    backends = [b for b in torch.distributed.Backend.backend_list if b not in ("undefined", "fake")]
    if any(part.rpartition(":")[2] not in backends for part in config["backend"].split(",")):
        raise ConfigError(f"backend must be one of {backends}, or device:backend pairs (cpu:gloo,cuda:nccl), "
                          f"got {config['backend']!r}")
    if config["compile_mode"] not in COMPILE_MODES:
        raise ConfigError(f"compile_mode must be one of {COMPILE_MODES}, got {config['compile_mode']!r}")
    if config["peak_tflops"] is not None and not (math.isfinite(config["peak_tflops"]) and config["peak_tflops"] > 0):
        raise ConfigError(f"peak_tflops must be finite and above 0, got {config['peak_tflops']}")
    if not config["out_dir"]:
        raise ConfigError("out_dir must name a directory, got ''")
    check_seed(config["seed"])
    if config["dtype"] is not None and config["dtype"] not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {config['dtype']!r}")
    kernels.check_request(config["kernels"])
    if config["init_from"] == "scratch":  # the architecture (a checkpoint's own is checked as it loads)
        recompute_count(config["recompute"], scratch_model(config, None).n_layer)


def scratch_model(c: dict, meta: dict | None) -> GPTConfig:
    """The model config `c` trains from scratch: its architecture keys, and its data's vocabulary
    (a character dataset's meta.pkl, else GPT-2's 50257 tokens padded to 50304)."""
    return GPTConfig(vocab_size=meta["vocab_size"] if meta else 50304, dropout=c["dropout"],
                     **{k: c[k] for k in ARCH_KEYS})


def take_architecture(c: dict, model_args: dict, console) -> None:
    """A resumed or pretrained checkpoint's architecture wins over the config's (as in nanoGPT),
    and the run says which keys the config set otherwise it passed over (not its defaults)."""
    passed_over = [f"{key} {c[key]!r} (it has {model_args[key]!r})" for key in ARCH_KEYS
                   if c[key] != model_args[key] and c[key] != DEFAULTS[key]]
    if passed_over:
        console.print(f"[yellow]init_from={c['init_from']}: the checkpoint's architecture, not the config's "
                      f"{', '.join(passed_over)}[/yellow]")
    c.update((key, model_args[key]) for key in ARCH_KEYS)


def trim_log(path: Path, iter_num: int, evaluates: bool) -> None:
    """A resumed run's log as of its checkpoint at iter_num: the records of the steps before it,
    evaluations made with eval_only, and the evaluation at iter_num unless the resumed run
    `evaluates` there again (a final evaluation off the eval_interval: the resumed run's next
    comes later). What the earlier run logged past that (the steps it took past its last
    checkpoint) the resumed run logs again; a line torn by a killed write is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        if (record := log_record(line)) is None:
            continue
        at = record.get("iter", -1)
        if record.get("eval_only") or at < iter_num or (at == iter_num and "val_loss" in record and not evaluates):
            kept.append(line + "\n")
    write_atomic(path, lambda f: f.write("".join(kept).encode()))


def same_tokens(trained_on: dict | None, meta: dict | None) -> bool:
    """Whether a model trained on data whose meta.pkl is `trained_on` reads this data's ids as the
    same tokens (None: GPT-2's BPE, no meta.pkl)."""
    if trained_on is None or meta is None:
        return trained_on is meta
    return trained_on.get("stoi") == meta.get("stoi")


def vocabulary_name(meta: dict | None) -> str:
    return "GPT-2's BPE tokens" if meta is None else f"the {meta['vocab_size']} tokens of a meta.pkl"


def evaluates_at(it: int, c: dict) -> bool:
    """Whether a training run evaluates (and may save) before step `it`: every eval_interval, and at the end."""
    return it % c["eval_interval"] == 0 or it == c["max_iters"]


def lr_at(it: int, c: dict) -> float:
    if not c["decay_lr"]:
        return c["learning_rate"]
    if it < c["warmup_iters"]:
        return c["learning_rate"] * (it + 1) / (c["warmup_iters"] + 1)
    if it >= c["lr_decay_iters"]:  # also when the decay has no length (lr_decay_iters == warmup_iters)
        return c["min_lr"]
    ratio = (it - c["warmup_iters"]) / (c["lr_decay_iters"] - c["warmup_iters"])
    return c["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c["learning_rate"] - c["min_lr"])


def memory_gb(device_type: str) -> tuple[float, float, float]:
    """(allocated, peak allocated, reserved) GB on the GPU; on CPU the process's peak RSS thrice."""
    if device_type == "cuda":
        return (torch.cuda.memory_allocated() / 1e9, torch.cuda.max_memory_allocated() / 1e9,
                torch.cuda.memory_reserved() / 1e9)
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    return rss, rss, rss


def memory_plan(c: dict, model: GPT, world, loss_backend: str) -> str:
    """bench/plan.py's peak for this run on its GPU (an estimate, with the triton ops, but the lm
    head's loss on `loss_backend`) and, where that does not fit, the fewest blocks to recompute
    that would."""
    total = torch.cuda.get_device_properties(c["device"]).total_memory
    sharding = world.parallel or "ddp"
    kahan = c["optimizer"] == "bf16_adamw" and c["kahan_summation"]
    fused = loss_backend == "triton"
    planned = plan.peak_bytes(model.config, c["optimizer"], c["batch_size"], c["block_size"], model.recomputed,
                              sharding, world.size, kahan, fused_loss=fused)
    loss = "" if fused else (f"; the {loss_backend} linear_cross_entropy's logits, {plan.UNFUSED_LOSS_BYTES} bytes a "
                             f"class a token")
    text = (f"planned peak {planned / 1e9:.1f} GB of the GPU's {total / 1e9:.1f} (bench/plan.py, with the triton "
            f"ops{loss})")
    if planned > plan.USABLE * total:
        n = plan.blocks_to_recompute(total, model.config, c["optimizer"], sharding, world.size, c["block_size"],
                                     c["batch_size"], kahan, fused_loss=fused)
        text += f"; may not fit: {'a smaller batch_size' if n is None else f'recompute={n}'} would"
    return text


@contextmanager
def out_of_memory_explained(c: dict, model: GPT, world, loss_backend: str):
    """A GPU out of memory ends the run with what it asked of the GPU, the plan's view of it and
    what lowers the peak, not with the allocator's traceback."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        if not c["device"].startswith("cuda"):  # the plan is a CUDA GPU's
            raise
        raise SystemExit(
            f"train.py: the GPU ran out of memory at batch_size {c['batch_size']} x block_size {c['block_size']} "
            f"with {model.recomputed} blocks recomputed: {memory_plan(c, model, world, loss_backend)}. A smaller "
            f"batch_size (more gradient_accumulation_steps keep the tokens per step) or recompute=True lowers "
            f"the peak. torch: {str(e).splitlines()[0]}") from None


@contextmanager
def compile_failure_explained(compiled: bool, choices: dict):
    """torch.compile failing on a graph with triton ops (their kernels inside Inductor's code: not
    yet run on a GPU) keeps its traceback, led by the two ways around it."""
    triton_ops = sorted(op for op, choice in choices.items() if choice.backend == "triton")
    try:
        yield
    except Exception as e:
        if compiled and triton_ops and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            print(f"train.py: torch.compile failed on the model with the triton kernels of {', '.join(triton_ops)}: "
                  f"--compile=False runs them without it, --kernels=torch compiles torch's ops; the error follows",
                  file=sys.stderr)
        raise


def divergence(iter_num: int, out_dir: str, **losses: float) -> str | None:
    """Why the run must end, if a loss is no longer finite (the same on every rank: the losses
    are the ranks' mean): weights gone NaN stay so, and saving them would replace the last good
    checkpoint, as nanoGPT's always_save_checkpoint does."""
    lost = [f"{name} loss {value}" for name, value in losses.items() if not math.isfinite(value)]
    if not lost:
        return None
    kept = f", {out_dir} keeps the last checkpoint saved" if checkpoint.exists(out_dir) else ""
    return (f"train.py: iter {iter_num}: {', '.join(lost)}: the run has diverged (a lower learning_rate or grad_clip "
            f"may help); nothing is saved from it{kept}")


def _compiled(c: dict) -> str:
    return f"compiled ({c['compile_mode']} mode)" if c["compile"] else "not compiled"


def summary(console, c, model, choices, tokens_per_iter, world, config_files):
    mc = model.config
    table = Table(title="tritongpt", show_header=False, box=None)
    table.add_row("config", f"{', '.join(config_files) or '(defaults)'}, init_from {c['init_from']}")
    table.add_row("data", f"{c['dataset']} (in {c['data_dir']}), checkpoints and log in {c['out_dir']}")
    total, positions = model.num_params(), model.wpe.weight.numel() if model.wpe is not None else 0
    table.add_row("parameters", f"{total:,} total ({total - positions:,} without position embeddings: nanoGPT's "
                                f"count), {model.num_params(non_embedding=True):,} non-embedding")
    table.add_row("model", f"{mc.n_layer} layers, {mc.n_head} heads ({mc.n_kv_head} kv), {mc.n_embd} wide, "
                           f"block {mc.block_size}, vocab {mc.vocab_size}; {mc.norm_position}-{mc.norm}, "
                           f"{mc.pos_encoding} positions, {mc.mlp if mc.mlp == 'swiglu' else mc.activation} MLP "
                           f"({mc.mlp_hidden} hidden), bias {mc.bias}, tied {mc.tie_weights}")
    table.add_row("batch", f"{c['batch_size']} x {c['block_size']} tokens x {c['gradient_accumulation_steps']} "
                           f"accumulation x {world.size} processes ({world.parallel or 'no process group'}) = "
                           f"{tokens_per_iter:,} tokens per step")
    table.add_row("device", f"{c['device']}, {c['dtype']}, {_compiled(c)}, optimizer {c['optimizer']}"
                            + (f", {model.recomputed} of {mc.n_layer} blocks recomputed in backward"
                               if model.recomputed else ""))
    if c["device"].startswith("cuda"):
        table.add_row("memory", memory_plan(c, model, world, choices["linear_cross_entropy"].backend))
    console.print(table)
    ktable = Table(title=f"kernels={c['kernels']}")
    for col in ("op", "backend", "why"):
        ktable.add_column(col)
    for op, choice in choices.items():
        ktable.add_row(op, choice.backend, choice.reason)
    console.print(ktable)


def make_optimizer(c: dict, model: GPT, world, device_type: str, adamw_backend: str, console) -> torch.optim.Optimizer:
    """The run's optimizer over `model`'s param groups (distributed.optimizer: ZeRO-1's shards it)."""
    if c["optimizer"] == "adamw":
        optimizer_class, optimizer_args = torch.optim.AdamW, dict(fused=device_type == "cuda")
        unused = [f"{key}={c[key]}" for key in ("stochastic_rounding", "kahan_summation") if c[key] != DEFAULTS[key]]
        if unused:
            console.print(f"[yellow]{' and '.join(unused)}: bf16_adamw's rounding of bf16 weights; adamw's are "
                          f"fp32, and {'they are' if len(unused) > 1 else 'it is'} not used[/yellow]")
    else:
        optimizer_class, optimizer_args = BF16AdamW, dict(backend=adamw_backend, seed=c["seed"],
                                                          stochastic_rounding=c["stochastic_rounding"],
                                                          kahan_summation=c["kahan_summation"])
    return distributed.optimizer(world, model.param_groups(c["weight_decay"]), optimizer_class,
                                 lr=c["learning_rate"], betas=(c["beta1"], c["beta2"]), **optimizer_args)


def restore_random_state(rng: list[dict] | None, batches: Batches, world, device_type: str, console, seed: int,
                         iter_num: int) -> None:
    """A checkpoint's random state (one entry per rank of the run that saved it; none in nanoGPT's)
    back in the data sampler and, on as many ranks as saved it, in torch's generators. Those it
    cannot restore are seeded from the run's seed and the step resumed at: left as set up, they
    would draw again the windows and dropout masks the saved run began with."""
    if rng is not None and len(rng) == world.size:
        torch.set_rng_state(rng[world.rank]["torch"])
        if device_type == "cuda" and rng[world.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rng[world.rank]["cuda"])
    else:
        torch.manual_seed(derived_seed(seed, "dropout", world.rank, iter_num))
    if rng is None:
        batches.generator.manual_seed(derived_seed(seed, "data", iter_num))  # the same on every rank
        console.print("the checkpoint holds no random state (nanoGPT's): batches and dropout masks are "
                      "drawn afresh")
        return
    batches.load_state_dict(rng[0]["data"])  # every rank draws the same windows
    if len(rng) != world.size:
        console.print(f"resuming on {world.size} processes a run saved by {len(rng)}: the data sampler "
                      f"continues, dropout masks are drawn afresh")


def open_out_dir(c: dict, iter_num: int, console, cleanup: ExitStack):
    """The master's log file in out_dir, opened for appending. A new training run starts its log
    afresh, the last run's checkpoint and log set aside; a resumed one keeps what came before its
    checkpoint and appends, and so does an evaluation (eval_only, which saves nothing) to the
    whole log."""
    fresh = c["init_from"] != "resume" and not c["eval_only"]
    log_path = Path(c["out_dir"]) / "log.jsonl"
    with reported():  # an out_dir on a read-only or full disk
        os.makedirs(c["out_dir"], exist_ok=True)
        # One training run an out_dir (it locks the directory): two would set aside, trim and
        # overwrite each other's checkpoint and log. eval_only may score a checkpoint meanwhile.
        if not c["eval_only"]:
            held = os.open(c["out_dir"], os.O_RDONLY)
            cleanup.callback(os.close, held)
            if not try_lock(held):
                raise SystemExit(f"train.py: another run is training in {c['out_dir']} (it holds the "
                                 f"directory's lock): give this one an out_dir of its own")
        for torn in checkpoint.remove_torn(c["out_dir"]):
            console.print(f"removed {torn}, a checkpoint write that was killed")
        if c["init_from"] == "resume" and not c["eval_only"]:
            trim_log(log_path, iter_num, evaluates=evaluates_at(iter_num, c))
        earlier = checkpoint.set_aside(c["out_dir"], log_path) if fresh else None
        # Appending (O_APPEND) even when fresh: an eval_only run beside it appends to the same log.
        # Unbuffered: each record one write (see append).
        log_file = cleanup.enter_context(open(log_path, "ab", buffering=0))
        if fresh:
            log_file.truncate(0)
    if earlier:
        console.print(f"[yellow]{c['out_dir']} held an earlier run's checkpoint: moved with its log to "
                      f"{earlier}[/yellow]")
    return log_file


@contextmanager
def torch_settings():
    """A run's process-wide torch settings, the caller's back after it (a notebook's, a sweep's):
    float32 as the default dtype, whatever a script set (a model built under float64 trained in
    it on torch's ops, and failed at its first step on triton's), and TF32 matmuls on a GPU
    (nanoGPT's)."""
    dtype = torch.get_default_dtype()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def append(log_file, record: dict, out_dir: str) -> None:
    """`record` as a line of the log, in one write of the unbuffered file: a run appending beside
    this one (eval_only) never splits it, and a write that failed (a full disk) leaves no buffer
    to fail again as the file closes."""
    # JSON has no NaN or infinity (a float16 step's skipped gradient norm is inf): null for them.
    line = json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()})
    rest = memoryview((line + "\n").encode())
    try:
        while rest:
            rest = rest[log_file.write(rest):]
    except OSError as e:
        raise SystemExit(f"train.py: {unwritten('the log', out_dir, e)}; the last checkpoint there is as it was"
                         ) from None


# One run at a time in a process: torch's default dtype, TF32 switches and random generators are
# the process's, and two runs in threads would each set them under the other.
_running = threading.Lock()


def main(argv: list[str]) -> None:
    if not _running.acquire(blocking=False):
        raise SystemExit("train.py: another run is training in this process (torch's settings and random "
                         "generators are the process's): run each in a process of its own")
    # However the run ends (an error, an interrupt, a guard's stop), the clock sampler's thread
    # stops, the log closes and torch's settings are the caller's again: called again in one
    # process (a notebook, a sweep), nothing piles up.
    try:
        with ExitStack() as cleanup:
            cleanup.enter_context(torch_settings())
            run(argv, cleanup)
    finally:
        _running.release()


def run(argv: list[str], cleanup: ExitStack) -> None:
    if printed_help(argv, __doc__, DEFAULTS):
        return
    with reported():
        c, argv = read_config(argv)
    if c["wandb_log"] and importlib.util.find_spec("wandb") is None:  # before minutes of set-up, not after
        raise SystemExit("train.py: wandb_log=True needs the wandb package (pip install wandb)")
    config_files = [a for a in argv if a.endswith(".py") and not a.startswith("--")]

    # Before the processes join and the data is prepared: a refused combination says so at once.
    pure_bf16 = c["optimizer"] == "bf16_adamw"
    with reported():
        c["dtype"] = optimizer_dtype(c["optimizer"], c["dtype"])
    if c["parallel"] == "fsdp" and distributed.launched() and c["dtype"] == "float16":
        raise SystemExit("train.py: parallel=fsdp trains in bfloat16 or float32 (a float16 loss scale is not "
                         "kept in step across the ranks' shards)")
    with reported(f"init_from={c['init_from']}: "):  # (a hub model's is downloaded later, on one rank)
        if c["init_from"] == "resume":
            checkpoint.locate(c["out_dir"])
        elif c["init_from"] != "scratch" and c["init_from"] not in pretrained.HUB_MODELS:
            pretrained.locate(c["init_from"])
    with reported():  # (refused where neither built nor buildable here)
        is_built(c["dataset"], c["data_dir"])
    with reported():  # (a folder above it this user may not read)
        for key in ("out_dir", "data_dir"):
            if (file := blocking_file(c[key])) is not None:
                raise SystemExit(f"train.py: {key} {c[key]}: {file} is a file, not a directory")

    # --- processes: one, or one per GPU under torchrun -------------------------------------
    with reported():
        world, c["device"] = distributed.init(c["parallel"], c["backend"], c["device"])
    rank, world_size, master = world.rank, world.size, world.master
    if world.parallel:
        if c["gradient_accumulation_steps"] % world_size:
            raise SystemExit(f"train.py: gradient_accumulation_steps {c['gradient_accumulation_steps']} is "
                             f"not a multiple of the {world_size} processes")
        c["gradient_accumulation_steps"] //= world_size
    cuda_graphs = c["compile"] and c["compile_mode"] in CUDA_GRAPH_MODES and torch.device(c["device"]).type == "cuda"
    if cuda_graphs and c["gradient_accumulation_steps"] > 1:
        raise SystemExit(f"train.py: compile_mode={c['compile_mode']} replays CUDA graphs, and each micro-step's "
                         f"replay overwrites the last one's grads (pytorch/pytorch#169545): it takes one micro-step "
                         f"a process (gradient_accumulation_steps={world_size}, batch_size larger for as many "
                         f"tokens), or compile_mode=default or max-autotune-no-cudagraphs")
    console = Console(quiet=not master, soft_wrap=True)
    device_type = torch.device(c["device"]).type  # autocast's and the kernels' (mps's own, not the CPU's)
    make_current(c["device"])  # cuda:N in one process too
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # --- data ---------------------------------------------------------------------------------
    with reported():
        data_path = distributed.master_first(world, lambda: prepare(c["dataset"], c["data_dir"]))
        meta = load_meta(data_path)

    # --- model, optimizer ---------------------------------------------------------------------
    iter_num, best_val_loss, resumed, weights_dir = 0, 1e9, None, None
    if c["init_from"] == "resume":
        with reported("init_from=resume: "):
            resumed = checkpoint.load(c["out_dir"], "cpu", resume=True)  # copied into the model's device below
        sharded = "sharded" in resumed
        if (world.parallel == "fsdp" and not sharded) or (world.parallel == "zero1" and sharded):
            raise SystemExit(f"train.py: parallel={world.parallel} cannot resume the {'sharded' if sharded else 'full'} "
                             f"checkpoint in {c['out_dir']}: fsdp resumes sharded checkpoints, zero1 full ones; "
                             f"ddp and one process resume both")
        model_args = dict(resumed["model_args"], dropout=c["dropout"])
        take_architecture(c, model_args, console)
        iter_num, best_val_loss = resumed["iter_num"], resumed["best_val_loss"]
    elif c["init_from"] == "scratch":
        with reported():
            model_args = asdict(scratch_model(c, meta))
    else:  # GPT-2's weights (check_ranges)
        with reported(f"init_from={c['init_from']}: "):  # a hub model downloads on rank 0
            weights_dir = distributed.master_first(world, lambda: pretrained.locate(c["init_from"]))
            model_args = asdict(pretrained.gpt_config(weights_dir, c["block_size"], c["dropout"]))
        take_architecture(c, model_args, console)
    data_vocab = meta["vocab_size"] if meta else EOT + 1  # GPT-2 BPE
    if data_vocab > model_args["vocab_size"]:  # a resumed or pretrained model's: ids past it index nothing
        raise SystemExit(f"train.py: init_from={c['init_from']} has a {model_args['vocab_size']}-token vocabulary; "
                         f"dataset {c['dataset']} has {data_vocab} tokens")
    # What the ids meant to the model: a pretrained GPT-2's are BPE tokens; a checkpoint of ours keeps
    # its data's meta (nanoGPT's own checkpoints keep none: taken as this data's).
    trained_on = None if weights_dir else resumed.get("meta", meta) if resumed else meta
    if not same_tokens(trained_on, meta):
        differ = " (another vocabulary: their stoi differ)" if trained_on and meta else ""
        raise SystemExit(f"train.py: init_from={c['init_from']} was trained on {vocabulary_name(trained_on)}; "
                         f"dataset {c['dataset']} holds {vocabulary_name(meta)}{differ}")
    # Batches at the architecture's block_size: a resumed or pretrained model's own.
    with reported():
        batches = Batches(data_path, c["block_size"], c["batch_size"], c["device"], seed=c["seed"], rank=rank,
                          world_size=world_size, vocab_size=model_args["vocab_size"])
    tokens_per_iter = c["gradient_accumulation_steps"] * world_size * c["batch_size"] * c["block_size"]
    # Per op the backend to run, checked at this run's own shapes (the ops the run calls).
    shapes = Shapes(GPTConfig(**model_args), batch_size=c["batch_size"], seq_len=c["block_size"],
                    dtype=getattr(torch, c["dtype"]))
    used = model_ops(shapes.config) | optimizer_ops(c["optimizer"])
    try:  # a profile that cannot be read, a backend named in a dict that fails its self-check here
        choices, refused = kernels.choose(c["kernels"], device_type, shapes=shapes, compiled=c["compile"],
                                          used=used), None
    except ValueError as e:
        choices, refused = None, f"train.py: kernels={c['kernels']}: {e}"
    if world.parallel:  # every rank refuses, or none: one refusing alone would leave the others waiting
        refused = next(filter(None, distributed.gather(refused)), None)
    if refused:
        raise SystemExit(refused)
    if world.parallel:
        choices = kernels.agreed(choices, distributed.gather({op: ch.backend for op, ch in choices.items()}))
    backends = {op: choice.backend for op, choice in choices.items()}
    # The same initial weights on every rank (FSDP does not broadcast them) and whichever kernels
    # were chosen (their self-checks draw random inputs).
    torch.manual_seed(c["seed"])
    model = GPT(GPTConfig(**model_args), backends)
    if weights_dir:
        pretrained.load_weights(model, weights_dir)
    torch.manual_seed(c["seed"] + rank)  # from here on each rank draws its own dropout masks
    with reported():
        model.recompute_blocks(c["recompute"])
    if pure_bf16:
        model.to(torch.bfloat16)
    if world.parallel == "fsdp":  # fp32 weights gathered in bf16 when training in bf16
        distributed.shard(model, c["device"], torch.bfloat16 if c["dtype"] == "bfloat16" and not pure_bf16 else None)
    else:
        model.to(c["device"])

    grad_norm_op = kernels.get("grad_norm", backends["grad_norm"])
    optimizer = make_optimizer(c, model, world, device_type, backends["adamw"], console)
    if resumed:
        # The checkpoint's optimizer state with this run's settings: load_state_dict brings back
        # the saved groups' settings (rounding, Kahan, betas, weight decay, fused), and the config,
        # not the checkpoint, sets everything but the architecture.
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        with reported("init_from=resume: "):
            checkpoint.restore(model, optimizer, resumed)
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
        checkpoint.steps_on_param_devices(optimizer)

    # Autocast only for fp32 weights; pure-bf16 weights already run every matmul in bf16.
    ptdtype = getattr(torch, c["dtype"])
    autocast = (nullcontext() if pure_bf16 or ptdtype == torch.float32
                else torch.autocast(device_type=device_type, dtype=ptdtype))
    scaler = torch.amp.GradScaler(device_type, enabled=c["dtype"] == "float16")
    if resumed:
        if resumed.get("scaler"):  # empty when saved by a run without a loss scale (bf16, fp32)
            scaler.load_state_dict(resumed["scaler"])
        restore_random_state(resumed.get("rng"), batches, world, device_type, console, c["seed"], iter_num)
        del resumed  # free the checkpoint's copy of the weights

    raw_model = model
    params = list(raw_model.parameters())  # for the clipping: walking the module tree each step costs host time
    if c["compile"]:
        model = torch.compile(model, mode=c["compile_mode"])
    model = distributed.replicate(model, world, c["device"])

    meter = MFUMeter(raw_model.config, c["block_size"], c["dtype"], c["device"], world_size,
                     peak_tflops=c["peak_tflops"], recomputed=raw_model.recomputed)
    cleanup.callback(meter.close)
    if master:
        summary(console, c, raw_model, choices, tokens_per_iter, world, config_files)
        console.print(f"MFU: {meter.describe()}")
        log_file = open_out_dir(c, iter_num, console, cleanup)
        # The backend that ran each op (kernels=auto chooses per GPU) heads what this run logs.
        marks = {"eval_only": True} if c["eval_only"] else {}
        append(log_file, dict(iter=iter_num, kernels=backends, **marks), c["out_dir"])
    if c["wandb_log"] and master:
        import wandb

        wandb.init(project=c["wandb_project"], name=c["wandb_run_name"], config=c | {"backends": backends})

    def log(record: dict) -> None:
        if not master:
            return
        append(log_file, record, c["out_dir"])
        if c["wandb_log"]:  # an iteration's eval and step records are one wandb step
            wandb.log({WANDB_NAMES.get(k, k): v for k, v in record.items()}, step=record["iter"])

    @torch.no_grad()
    def estimate_loss() -> dict | None:
        """The mean losses, or None where a SIGTERM came during the evaluation: every rank asks
        after each batch (all score as many), and the run stops there rather than finish an
        evaluation the scheduler's grace time may not cover."""
        model.eval()
        try:
            out = {}
            for split in ("train", "val"):
                losses = torch.zeros(c["eval_iters"], device=c["device"])
                for k, (x, y) in enumerate(batches.eval_batches(split, c["eval_iters"])):
                    with autocast:
                        _, loss = model(x, y, return_logits=False)
                    losses[k] = loss
                    if preemption and preemption.requested():
                        return None
                out[split] = distributed.mean(losses.mean()).item()  # each rank scored its slice of the windows
            return out
        finally:
            model.train()

    def save_checkpoint() -> None:
        """A collective: every rank calls it, and notes it in `saved`."""
        saved.append(iter_num)
        rng = distributed.gather(dict(torch=torch.get_rng_state(), data=batches.state_dict(),
                                      cuda=torch.cuda.get_rng_state() if device_type == "cuda" else None))
        state = dict(model_args=model_args, iter_num=iter_num, best_val_loss=best_val_loss, config=c, meta=meta,
                     scaler=scaler.state_dict(), rng=rng)
        try:
            if world.parallel == "fsdp":
                path = checkpoint.save_sharded(raw_model, optimizer, state, c["out_dir"])
            else:
                optimizer_state = distributed.optimizer_state(optimizer)
                if not master:
                    return
                path = checkpoint.save(dict(state, model=raw_model.state_dict(), optimizer=optimizer_state),
                                       c["out_dir"])
        except OSError as e:
            raise SystemExit(f"train.py: {unwritten('the checkpoint', c['out_dir'], e)}; "
                             f"the last one there is as it was") from None
        console.print(f"saved checkpoint to {path}")

    # --- the loop -----------------------------------------------------------------------------
    first_iter, saved = iter_num, []  # saved: the iterations this run saved at
    if master and c["init_from"] == "resume" and not c["eval_only"] and iter_num >= c["max_iters"]:
        console.print(f"[yellow]the checkpoint is at iter {iter_num}, max_iters={c['max_iters']}: no step to take "
                      f"(raise max_iters to train on)[/yellow]")
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                        console=console, disable=not master, transient=True,
                        refresh_per_second=2)  # each redraw holds the GIL ~1 ms, which a host-bound step waits for
    task = progress.add_task("train", total=c["max_iters"], completed=iter_num, status="")
    t_last, iters_since_log = time.perf_counter(), 0
    warmed_up = False  # this process's first step compiles and warms up: its time is not a step's
    diverged = None  # why the loop stopped early, if a loss is no longer finite
    preempted = False  # whether a SIGTERM stopped it (gpt/preemption.py); eval_only saves nothing, so stops at once
    preemption = None if c["eval_only"] else cleanup.enter_context(Preemption(world.parallel is not None))
    with (progress, reported(errors=(DataError,)),  # only the data's: a kernel's ValueError keeps its traceback
          out_of_memory_explained(c, raw_model, world, choices["linear_cross_entropy"].backend),
          compile_failure_explained(c["compile"], choices)):
        while True:
            lr = lr_at(iter_num, c)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # On every rank. eval_only scores the model where it stands (a resumed iter_num need not
            # fall on an eval step) and saves nothing.
            losses = None
            preempted = bool(preemption) and preemption.requested()
            if not preempted and (evaluates_at(iter_num, c) or c["eval_only"]):
                losses = estimate_loss()
                preempted = losses is None
            # A SIGTERM: the run saves where it stands (unless it took no step, or keeps its best
            # evaluation's checkpoint) and stops, before an evaluation or amid one, which might not
            # end before SIGKILL (the resumed run makes it).
            if preempted:
                if iter_num > first_iter and (c["always_save_checkpoint"] or not checkpoint.exists(c["out_dir"])):
                    save_checkpoint()
                break
            if losses:
                console.print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                # An eval_only run's record says what it scored: it may sit in another run's log.
                scored = dict(eval_only=True, init_from=c["init_from"]) if c["eval_only"] else {}
                log(dict(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"], lr=lr, **scored))
                diverged = None if c["eval_only"] else divergence(iter_num, c["out_dir"], **losses)
                if diverged:
                    break
                if not c["eval_only"] and (losses["val"] < best_val_loss or c["always_save_checkpoint"]):
                    best_val_loss = min(best_val_loss, losses["val"])
                    if iter_num > 0:
                        save_checkpoint()
                t_last, iters_since_log = time.perf_counter(), 0  # evaluation time is not step time
            if c["eval_only"] or iter_num >= c["max_iters"]:
                break

            loss_sum = torch.zeros((), device=c["device"])
            for micro_step in range(c["gradient_accumulation_steps"]):
                distributed.grad_sync(world, model, micro_step == c["gradient_accumulation_steps"] - 1)
                x, y = batches.next("train")
                with autocast:
                    _, loss = model(x, y, return_logits=False)
                    loss = loss / c["gradient_accumulation_steps"]
                loss_sum += loss.detach()
                scaler.scale(loss).backward()
            logging_now = iter_num % c["log_interval"] == 0  # on every rank: the loss and norm are collectives
            grad_norm = None
            if c["grad_clip"] != 0.0:
                scaler.unscale_(optimizer)
                grad_norm = clip_for_step(distributed.local_optimizer(optimizer), params,
                                          c["grad_clip"], grad_norm_op)
            elif logging_now:
                scaler.unscale_(optimizer)
                grad_norm = global_grad_norm(params, grad_norm_op)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iters_since_log += 1
            progress.advance(task)

            if logging_now:
                loss_value = distributed.mean(loss_sum).item()  # the one host sync per log interval
                dt = (time.perf_counter() - t_last) / iters_since_log
                allocated, peak, reserved = memory_gb(device_type)
                record = dict(iter=iter_num, loss=loss_value, lr=lr, grad_norm=grad_norm.item(),
                              mem_allocated_gb=allocated, mem_peak_gb=peak, mem_reserved_gb=reserved)
                if warmed_up:
                    record.update(step_ms=1000 * dt, tokens_per_s=tokens_per_iter / dt)
                    record.update(meter.record(record["tokens_per_s"]))
                    timing = (f"{record['step_ms']:.1f} ms, {record['tokens_per_s']:,.0f} tok/s, "
                              f"MFU {shown(record['mfu'], '.1%')}")
                else:
                    timing = "first step (compile, warm-up): not timed"
                console.print(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, grad norm "
                              f"{record['grad_norm']:.3f}, {timing}, mem {allocated:.2f}/{peak:.2f}/{reserved:.2f} GB")
                progress.update(task, status=f"loss {loss_value:.4f}")
                log(record)
                # Under float16 the loss scaler skips a step that overflowed; its weights stay finite.
                diverged = divergence(iter_num, c["out_dir"], training=loss_value) if not scaler.is_enabled() else None
                if diverged:
                    break
                t_last, iters_since_log = time.perf_counter(), 0  # after logging: its time is no step's
            if not warmed_up:
                warmed_up = True
                if device_type == "cuda":
                    torch.cuda.synchronize()  # the first step's kernels done before timing starts
                t_last, iters_since_log = time.perf_counter(), 0
            iter_num += 1

    if master and not c["eval_only"] and not (diverged or preempted) and iter_num > first_iter and not saved:
        console.print(f"[yellow]this run saved no checkpoint: no evaluation beat the best val loss, "
                      f"{best_val_loss:.4f} (always_save_checkpoint=False)[/yellow]")
    if world.parallel:
        # DDP's reducer holds the process group from C++: dropped last, at return, it would destroy
        # it holding the GIL while joining gloo's thread, which may need the GIL to free a finished
        # collective (a deadlock). Dropped here, the group is destroyed by destroy_process_group.
        del model
        torch.distributed.destroy_process_group()
    if diverged:  # after the process group's teardown: raised inside the loop, it aborted a rank now and then
        raise SystemExit(diverged if master else 1)
    if preempted:
        if master:
            if saved[-1:] == [iter_num]:
                outcome = f"its checkpoint is in {c['out_dir']} (init_from=resume continues)"
            elif iter_num == first_iter:
                outcome = "no step since the run started, nothing saved"
            else:
                outcome = "always_save_checkpoint=False: the checkpoint stays the best evaluation's"
            print(f"train.py: stopped by SIGTERM at iter {iter_num}: {outcome}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM)  # a shell's status for a process SIGTERM ended


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
        status = 0
    except SystemExit as stop:  # a message or status: the traceback holding main's frames goes with `stop`
        status = stop.code
    # What main's closures kept in reference cycles (the sharded model's DTensors, their mesh and
    # its gloo group) is freed now, while the interpreter is whole: left to its teardown, freeing
    # them aborted a rank now and then after a finished run ("terminate called without an active
    # exception"; cf. pytorch/pytorch#179291).
    gc.collect()
    sys.exit(status)
