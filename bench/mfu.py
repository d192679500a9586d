"""Training throughput and MFU of each kernel backend on this GPU, or a plan for a GPU you don't
have.

    python -m bench.mfu --gpu auto [--preset gpt2] [--batch-size 16] [--seq-len 1024]
                        [--kernels torch,compile,triton,triton+compile] [--steps 50] [--warmup 10]
                        [--optimizer adamw|bf16_adamw] [--dtype D] [--recompute [BLOCKS]] [--profile-steps 3]
                        [--budget-s S]  # no variant started S seconds after the first
    python -m bench.mfu --gpu h100 [--preset gpt2,giga-175b] [--world-size 64]   # planning table
    python -m bench.mfu --gpu auto --preset config/train_shakespeare_char.py     # a train.py config's model
    python -m bench.mfu --gpu list                                                # the peak table

Variants: a kernel mode (torch | triton | auto, as train.py's --kernels) run eagerly, or with
"+compile" under torch.compile; "compile" is torch+compile. torch vs triton and compile vs
triton+compile are the like-for-like pairs: the Triton ops are custom ops, so Inductor still
fuses the rest of the graph around them. A compiled variant may name torch.compile's mode after a
colon, as train.py's compile_mode: "compile:reduce-overhead" and "triton+compile:reduce-overhead"
replay the step's graphs as CUDA graphs, which takes the host's launches out of the step.

Per variant: the model is built, warm-up steps run (compilation and autotuning happen there and
are not timed), then each timed training step (forward, backward, grad clipping, optimizer step,
as train.py runs them, on a fixed random batch: no data loading) is bracketed by CUDA events.
Reported: tokens/s from the median step, step ms (median, p10, p90), model TFLOPS and MFU on the
PaLM convention (see bench/flops.py), hardware TFLOPS beside them, peak memory, and the SM clock
NVML saw during the timed steps with the peak that clock implies. Then --profile-steps more steps
run under torch.profiler (bench/breakdown.py): the GPU time a step spends on each kind of work
(matmuls, attention, norms, loss, optimizer, ...), how much of the step the GPU was busy, and the
rates the matmuls and attention ran at (the model's matmul FLOPs and attention's hardware FLOPs
over their kernels' time). A JSON file records it all.
"""
import argparse
import contextlib
import dataclasses
import gc
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import kernels
from bench import (backends, breakdown, described, fill_unset, listed, not_negative, positive, result_file,
                   shown, write_json)
from bench import plan as planning
from bench import profile
from bench.cases import Shapes
from bench.flops import CONVENTION, Flops, flops_per_token
from bench.hardware import GPU, GPUS, ClockSampler, ClockStats, Device, Peak, detect, find, peak_for
from bench.measure import one_line, provenance
from gpt.config import COMPILE_MODES, DTYPES, OPTIMIZERS, gpu_dtype, optimizer_dtype
from gpt.model import GPT, GPTConfig, model_ops, recompute_count
from gpt.optim import BF16AdamW, clip_for_step, optimizer_ops
from kernels import adamw as adamw_kernels
from kernels.checks import dtype_name

DEFAULT_VARIANTS = "torch,compile,triton,triton+compile"
# Steps after the timed ones whose issue the host's clock times, each started on an idle GPU: the
# host's ms a step. Near the step's own time the GPU waits for the host (or, for a GPU-bound step,
# the host for CUDA's full launch queue); well under it, the host is ahead.
HOST_STEPS = 3
# train.py's optimizer settings.
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 6e-4, (0.9, 0.95), 0.1, 1.0


def parse_variant(variant: str) -> tuple[str, str | None]:
    """(kernel mode, torch.compile's mode, None when eager) of "torch", "compile", "triton",
    "triton+compile", "compile:reduce-overhead", ..."""
    name, colon, compile_mode = variant.partition(":")
    mode, plus, rest = ("torch+compile" if name == "compile" else name).partition("+")
    if (mode not in kernels.MODES or (plus and rest != "compile") or (colon and not plus)
            or (colon and compile_mode not in COMPILE_MODES)):
        raise ValueError(f"unknown variant {variant!r}: use compile or a mode in {kernels.MODES}, optionally "
                         f"with +compile, then optionally a compile mode after a colon (one of {COMPILE_MODES})")
    return mode, (compile_mode or "default") if plus else None


def like_for_like(variants) -> list[tuple[str, str]]:
    """(variant, its baseline) pairs to compare: the Triton ops against torch's, eager and under
    each compile mode; each compile mode against the default one (with CUDA graphs: what the host's
    launches cost the step); then the issue's headline, eager Triton against torch.compile."""
    modes = sorted({"".join(v.partition(":")[1:]) for v in variants})  # "", ":reduce-overhead", ...
    return [("triton", "torch"), *((f"{kind}+compile{m}", f"compile{m}") for m in modes for kind in ("triton", "auto")),
            *((f"{kind}{m}", kind) for m in modes if m for kind in ("compile", "triton+compile")),
            ("triton", "compile")]


class MFUMeter:
    """MFU of a training loop, for train.py's log lines.

        meter = MFUMeter(model_config, seq_len, "bfloat16", "cuda:0", world_size)
        meter.describe()               # the convention and where the peak comes from
        meter.record(tokens_per_s)     # at each log: tflops, mfu, hw_tflops, sm_mhz, mfu_at_clock

    tokens_per_s is for all processes together; MFU is per GPU. The SM clock is sampled on a
    background thread between records."""

    def __init__(self, config: GPTConfig, seq_len: int, dtype, device="cuda", world_size: int = 1,
                 peak_tflops: float | None = None, recomputed: int = 0):
        self.flops = flops_per_token(config, seq_len, recomputed)
        self.world_size = world_size
        dev = torch.device(device)
        found = None
        if dev.type == "cuda":
            found = detect(dev.index if dev.index is not None else torch.cuda.current_device())
        if found is None and peak_tflops is None:
            self.peak = Peak(None, "no GPU: no tensor peak, MFU n/a")
        else:
            self.peak = peak_for(found.name if found else str(dev), dtype, peak_tflops, found.sms if found else None)
        self.clocks = ClockSampler(found.index).start() if found else None

    def describe(self) -> str:
        return f"{CONVENTION}. Peak: {self.peak.source}"

    def record(self, tokens_per_s: float) -> dict:
        per_gpu = tokens_per_s / self.world_size
        out = _rates(self.flops, per_gpu, self.peak)
        stats = self.clocks.stats(clear=True) if self.clocks else None
        out.update(_clock_rates(out["tflops"], self.peak, stats))
        return out

    def close(self) -> None:
        if self.clocks:
            self.clocks.stop()


def _rates(flops: Flops, tokens_per_s: float, peak: Peak) -> dict:
    tflops = tokens_per_s * flops.palm / 1e12
    return dict(tflops=tflops, mfu=tflops / peak.tflops if peak.tflops else None,
                hw_tflops=tokens_per_s * flops.hardware / 1e12)


def _clock_rates(tflops: float, peak: Peak, stats: ClockStats | None) -> dict:
    """The mean SM clock, the peak at that clock and MFU against it (None without NVML)."""
    at_clock = peak.at_clock(stats.sm_mhz) if stats else None
    return dict(sm_mhz=stats.sm_mhz if stats else None, clock_peak_tflops=at_clock,
                mfu_at_clock=tflops / at_clock if at_clock else None)


# --- measuring ------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """What bench.mfu measures: one model, batch and optimizer on one GPU."""

    config: GPTConfig
    batch_size: int
    seq_len: int
    optimizer: str  # adamw | bf16_adamw
    dtype: torch.dtype
    warmup: int
    steps: int
    device: str = "cuda"
    recompute: int = 0  # blocks recomputed in backward, the first ones (train.py's recompute)
    profile_steps: int = 3  # steps run under torch.profiler after the timed ones (0: none)

    @property
    def ops(self) -> set[str]:
        """The registry ops a step of this run calls."""
        return model_ops(self.config) | optimizer_ops(self.optimizer)


def _train_step(run: Run, backends: dict[str, str], compile_mode: str | None):
    """A closure running one training step as train.py does."""
    device_type = torch.device(run.device).type
    model = GPT(run.config, backends).to(run.device)
    model.recompute_blocks(run.recompute)
    groups = model.param_groups(WEIGHT_DECAY)
    if run.optimizer == "bf16_adamw":
        model.to(torch.bfloat16)
        optimizer = BF16AdamW(groups, lr=LR, betas=BETAS, backend=backends["adamw"])
        autocast = contextlib.nullcontext()
    elif run.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True)
        autocast = (contextlib.nullcontext() if run.dtype == torch.float32
                    else torch.autocast(device_type, dtype=run.dtype))
    else:
        raise ValueError(f"optimizer must be adamw or bf16_adamw, got {run.optimizer!r}")
    scaler = torch.amp.GradScaler(device_type, enabled=run.dtype == torch.float16)
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model
    tokens = torch.randint(run.config.vocab_size, (run.batch_size, run.seq_len + 1), device=run.device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # the model views targets flat
    params = list(model.parameters())
    grad_norm = kernels.get("grad_norm", backends["grad_norm"])

    def step():
        with autocast:
            _, loss = forward(x, y, return_logits=False)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        clip_for_step(optimizer, params, GRAD_CLIP, grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def measure(run: Run, variant: str, device: Device) -> dict:
    """Time `run` with the backends of `variant`; a row of the results (or its error)."""
    mode, compile_mode = parse_variant(variant)
    shapes = Shapes(run.config, run.batch_size, run.seq_len, run.dtype)
    choices = kernels.choose(mode, torch.device(run.device).type, shapes=shapes, compiled=compile_mode is not None,
                             used=run.ops)
    row = dict(variant=variant, kernels={op: dataclasses.asdict(c) for op, c in choices.items()})
    try:
        step = _train_step(run, {op: c.backend for op, c in choices.items()}, compile_mode)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(run.warmup):
            step()
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(run.steps)]
        tables = adamw_kernels.tables_made()
        with ClockSampler(device.index) as clocks:
            for start, end in events:
                start.record()
                loss = step()
                end.record()
            torch.cuda.synchronize()
        ms = [start.elapsed_time(end) for start, end in events]
        row.update(step_ms=ms, loss=loss.item(), peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
                   clocks=clocks.stats(), pointer_tables_made=adamw_kernels.tables_made() - tables)
        row["host_ms"] = _host_ms(step, run)
        if run.profile_steps:
            row["breakdown"] = _breakdown(step, run)
    except torch.cuda.OutOfMemoryError:
        fits = planning.max_micro_batch(device.memory_gib * planning.GiB, run.config, run.optimizer, "ddp", 1,
                                        run.seq_len, run.recompute, choices["linear_cross_entropy"].backend == "triton")
        row["error"] = (f"out of memory at batch size {run.batch_size} x {run.seq_len}; bench/plan.py fits {fits} "
                        f"sequences of this variant on this GPU's {device.memory_gib:.0f} GiB (--batch-size)")
    except Exception as e:  # a variant that fails (say, to compile) is reported; the others still run
        row["error"] = f"{type(e).__name__}: {e}"
    finally:  # the compiled graphs first, so that what only they held is freed before the next variant
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    return row


def _host_ms(step, run: Run) -> float | None:
    """The host's ms a step (HOST_STEPS more steps); None where they fail: the timed figures stand."""
    try:
        return backends.host_ms(step, run.device, calls=HOST_STEPS)
    except Exception:
        return None


def _breakdown(step, run: Run) -> dict:
    """Device ms a step by kind of work and the kernels that took most, from run.profile_steps
    profiled steps; the error instead when the profiler fails (the timed figures stand)."""
    try:
        times = breakdown.profile_steps(step, run.profile_steps, torch.device(run.device))
    except Exception as e:
        return dict(error=f"{type(e).__name__}: {e}")
    return dict(steps=run.profile_steps, ms=breakdown.by_kind(times, run.profile_steps),
                top=breakdown.top(times, run.profile_steps),
                kernels=breakdown.per_kernel(times, run.profile_steps))


def _work_rates(profiled: dict, run: Run, flops: Flops, median_ms: float) -> dict:
    """The share of the step the device was busy, and the TFLOPS of the matmul and attention
    kernels (their hardware FLOPs: recomputed blocks' second forward included)."""
    tokens = run.batch_size * run.seq_len

    def rate(step_flops: float, ms: float) -> float | None:
        return step_flops / (ms / 1e3) / 1e12 if ms > 0 else None
    return dict(busy=sum(profiled["ms"].values()) / median_ms,
                matmul_tflops=rate(flops.hardware_matmul * tokens, profiled["ms"]["matmul"]),
                attention_tflops=rate((flops.hardware - flops.hardware_matmul) * tokens, profiled["ms"]["attention"]))


def summarize(row: dict, run: Run, flops: Flops, peak: Peak) -> dict:
    """The derived figures of one measured row (median, p10, p90, tokens/s, TFLOPS, MFU)."""
    if "error" in row:
        return row
    ms = row["step_ms"]
    deciles = statistics.quantiles(ms, n=10)
    median = statistics.median(ms)
    tokens_per_s = run.batch_size * run.seq_len / (median / 1e3)
    out = dict(row, ms_median=median, ms_p10=deciles[0], ms_p90=deciles[-1], tokens_per_s=tokens_per_s,
               **_rates(flops, tokens_per_s, peak))
    out.update(_clock_rates(out["tflops"], peak, row["clocks"]))
    out["clocks"] = dataclasses.asdict(row["clocks"]) if row["clocks"] else None
    if "ms" in row.get("breakdown", {}):
        out["breakdown"] = dict(row["breakdown"], **_work_rates(row["breakdown"], run, flops, median))
    return out


def _clock(sm_mhz: float | None, peak_tflops: float | None) -> str:
    """The SM clock NVML saw, and the peak it implies where the table gives one."""
    if not sm_mhz:
        return "n/a"
    return f"{sm_mhz:.0f}" + (f" ({peak_tflops:.0f})" if peak_tflops else "")


def print_results(rows: list[dict], run: Run, device: Device, peak: Peak, flops: Flops,
                  console: Console) -> None:
    recompute = (f", {run.recompute} of {run.config.n_layer} blocks recomputed (in HW TFLOPS, not in MFU)"
                 if run.recompute else "")
    table = Table(title=f"{device.name}: B={run.batch_size} x T={run.seq_len}, {run.optimizer}, "
                        f"{dtype_name(run.dtype)}{recompute}; {run.steps} timed steps "
                        f"after {run.warmup}")
    for col in ("variant", "tokens/s", "step ms", "p10", "p90", "host ms", "TFLOPS", "MFU", "HW TFLOPS",
                "peak GiB", "SM MHz (its peak TFLOPS)", "MFU at clock", "loss"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["variant"], f"[red]{one_line(r['error'])}[/red]", *[""] * 11)
            continue
        table.add_row(r["variant"], f"{r['tokens_per_s']:,.0f}", f"{r['ms_median']:.2f}", f"{r['ms_p10']:.2f}",
                      f"{r['ms_p90']:.2f}", shown(r.get("host_ms"), ".2f"), f"{r['tflops']:.1f}",
                      shown(r["mfu"], ".1%"), f"{r['hw_tflops']:.1f}", f"{r['peak_memory_gib']:.1f}",
                      _clock(r["sm_mhz"], r["clock_peak_tflops"]), shown(r["mfu_at_clock"], ".1%"), f"{r['loss']:.3f}")
    console.print(table)
    console.print(f"FLOPs per token: {flops.palm / 1e6:,.1f}M model (PaLM), {flops.hardware / 1e6:,.1f}M "
                  f"hardware. {CONVENTION}.\nPeak: {peak.source}. MFU at clock: against the peak "
                  f"at the mean SM clock NVML reported during the timed steps. Host ms: the host's time "
                  f"to issue a step begun on an idle GPU (median of {HOST_STEPS}; near step ms, the GPU "
                  f"waited for the host, or the host for CUDA's full launch queue: the busy share below "
                  f"tells which).\nPeak GiB: torch's "
                  f"max_memory_allocated; bench/plan.py plans {planned_peak_gib(run):.1f} GiB with the triton ops.")
    ok = {r["variant"]: r for r in rows if "error" not in r}
    for fast, base in like_for_like(ok):
        if fast in ok and base in ok:
            console.print(f"{fast} / {base}: {ok[fast]['tokens_per_s'] / ok[base]['tokens_per_s']:.2f}x tokens/s")
    for r in ok.values():
        if r.get("pointer_tables_made"):  # the triton grad_norm's and adamw's: see kernels/adamw.py
            console.print(f"{r['variant']}: {r['pointer_tables_made']} optimizer pointer tables made in "
                          f"the timed steps (grads at new addresses: host time and an upload each)")
    print_breakdown(rows, console)
    kt = Table(title="op -> backend per variant, for the ops the run calls (why: in the JSON file)")
    kt.add_column("op")
    for r in rows:
        kt.add_column(r["variant"])
    for op in kernels.OPS:
        if op in run.ops:
            kt.add_row(op, *(r["kernels"][op]["backend"] for r in rows))
    console.print(kt)


def print_breakdown(rows: list[dict], console: Console) -> None:
    """Where each variant's step time went (its profiled steps), or why that is missing."""
    profiled = [r for r in rows if "ms" in r.get("breakdown", {})]
    for r in rows:
        if "error" in r.get("breakdown", {}):
            console.print(f"{r['variant']}: no breakdown ({r['breakdown']['error']})")
    if not profiled:
        return
    table = Table(title=f"device ms a step by kind of work (torch.profiler, {profiled[0]['breakdown']['steps']} "
                        f"steps); busy: their sum over the timed step's median")
    for col in ("variant", *breakdown.COLUMNS):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in profiled:
        table.add_row(r["variant"], *breakdown.cells(r["breakdown"]))
    console.print(table)


def measure_all(args, config: GPTConfig, device: Device, console: Console, out: Path) -> None:
    """Every variant of args.kernels measured in turn on the model `config`, the result file `out`
    rewritten after each, so that a run cut short keeps what it measured; then the table."""
    seq_len = args.seq_len or config.block_size
    if seq_len > config.block_size:
        config = dataclasses.replace(config, block_size=seq_len)
    dtype = getattr(torch, args.dtype)
    run = Run(config, args.batch_size, seq_len, args.optimizer, dtype, args.warmup, args.steps,
              f"cuda:{device.index}", args.recompute, args.profile_steps)
    peak = peak_for(device.name, dtype, args.peak_tflops, device.sms)
    flops = flops_per_token(config, seq_len, run.recompute)
    torch.cuda.set_device(device.index)
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py: float32's matmuls on TF32, its peak's
    rows, not_started, start = [], [], time.monotonic()
    for variant in args.kernels:
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            not_started.append(variant)
            continue
        console.print(f"measuring {variant} ...")
        rows.append(summarize(measure(run, variant, device), run, flops, peak))
        r = rows[-1]  # as it comes, for a run cut short
        console.print(f"  {variant}: " + (r["error"] if "error" in r else
                      f"{r['tokens_per_s']:,.0f} tokens/s, {r['ms_median']:.2f} ms a step, "
                      f"MFU {shown(r['mfu'], '.1%')}"))
        write_json(out, record(run, args.preset, device, peak, flops, rows))
    if not_started:
        console.print(f"not started, --budget-s {args.budget_s:g} spent: {', '.join(not_started)}")
    print_results(rows, run, device, peak, flops, console)


def record(run: Run, preset: str, device: Device, peak: Peak, flops: Flops, rows: list[dict]) -> dict:
    """bench.mfu's result file: the measured rows with the device, versions, peak, conventions
    and workload they belong to (bench.report makes the README's table of it)."""
    return {"device": device.as_dict(), **provenance(), "convention": CONVENTION,
            "peak": {"tflops": peak.tflops, "source": peak.source},
            "preset": preset, "config": dataclasses.asdict(run.config), "batch_size": run.batch_size,
            "seq_len": run.seq_len, "dtype": dtype_name(run.dtype), "optimizer": run.optimizer,
            "warmup": run.warmup, "steps": run.steps, "recompute": run.recompute,
            "profile_steps": run.profile_steps,
            "flops_per_token": {"palm": flops.palm, "causal": flops.causal, "hardware": flops.hardware},
            "planned_peak_gib": planned_peak_gib(run), "rows": rows}


def planned_peak_gib(run: Run) -> float:
    """bench/plan.py's peak memory for this run with the triton ops, to set beside the measured."""
    return planning.peak_bytes(run.config, run.optimizer, run.batch_size, run.seq_len, run.recompute) / 2**30


# --- the command ----------------------------------------------------------------------------

def print_peak_table(console: Console) -> None:
    table = Table(title="Dense peak TFLOPS (fp32 accumulation) per GPU: bench/hardware.py")
    for col in ("key", "reported names", "SMs", "bf16", "fp16", "tf32", "fp8", "fp32", "GB", "TB/s", "source"):
        table.add_column(col, overflow="fold")
    fmt = lambda x: "-" if x is None else f"{x:g}"  # noqa: E731
    for g in GPUS:
        table.add_row(g.key, "\n".join(g.names), fmt(g.sms), fmt(g.bf16), fmt(g.fp16), fmt(g.tf32), fmt(g.fp8),
                      fmt(g.fp32), fmt(g.memory_gb), fmt(g.bandwidth_tbs), g.source)
    console.print(table)


def plan_tables(args, gpu: GPU, models: dict[str, GPTConfig], planning_note: bool, parser, console: Console) -> None:
    """The planning tables of `models` on `gpu`, a GPU not here."""
    dtype = "bfloat16" if gpu.bf16 else "float16"
    peak = args.peak_tflops if args.peak_tflops is not None else gpu.tflops(dtype)
    for name, config in models.items():
        try:
            recompute_count(args.recompute, config.n_layer)
        except ValueError as e:
            parser.error(f"{name}: {e}")
    if planning_note:
        console.print("--optimizer, --dtype and --recompute are not used in planning: the tables show both "
                      "optimizers in the GPU's 16-bit dtype, with no block, every block and the fewest blocks "
                      "recomputed.")
    planning.print_plan(planning.Plan(gpu, dtype, peak, args.world_size, args.seq_len, args.batch_size,
                                      peak_given=args.peak_tflops is not None), models, console)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=described(__doc__))
    parser.add_argument("--gpu", default="auto",
                        help="auto (measure the GPU here), a GPU name or key to plan for, or list")
    parser.add_argument("--preset", type=listed,
                        help="model preset, or a train.py config file (its model, batch_size, optimizer, dtype and "
                             "recompute); default gpt2; planning: comma-separated, "
                             f"default {','.join(planning.DEFAULT_PLAN)}")
    parser.add_argument("--batch-size", type=positive(int),
                        help="sequences per micro-batch (default: a config file's batch_size, else 16)")
    parser.add_argument("--seq-len", type=positive(int), help="tokens per sequence (default: the preset's block_size)")
    parser.add_argument("--kernels", type=listed, default=DEFAULT_VARIANTS,
                        help="comma-separated variants: torch, triton or auto (train.py's --kernels) run eagerly, "
                             "or with +compile under torch.compile (compile is torch+compile), a compiled one "
                             "optionally with :<compile_mode>, e.g. triton+compile:reduce-overhead")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    parser.add_argument("--budget-s", type=positive(float),
                        help="start no variant this many seconds after the first began (none is cut midway)")
    parser.add_argument("--warmup", type=positive(int), default=10,
                        help="untimed steps first (compilation happens here)")
    parser.add_argument("--profile-steps", type=not_negative, default=3,
                        help="steps run under torch.profiler after the timed ones, for the breakdown (0: none)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help="default adamw; planning shows both")
    parser.add_argument("--dtype", choices=DTYPES, help="the training dtype (default: train.py's on this GPU, bf16 or "
                                                        "fp16 where it has none; bf16_adamw's is bf16)")
    parser.add_argument("--recompute", nargs="?", type=int, const=True, metavar="BLOCKS",
                        help="recompute every block in backward (activation checkpointing), or the first BLOCKS, "
                             "as train.py's recompute")
    parser.add_argument("--peak-tflops", type=positive(float), help="dense peak to divide by (an unknown GPU needs it)")
    parser.add_argument("--world-size", type=positive(int), default=1, help="planning: GPUs sharing the model")
    parser.add_argument("--json", type=result_file, help="result file (default: profiles/<gpu>-mfu-<preset>.json)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (for the percentiles)")
    # Wide tables stay readable when piped to a file (rich assumes 80 columns there).
    console = Console(width=shutil.get_terminal_size((160, 24)).columns)
    try:  # a bad variant, preset or config file fails before any GPU work, and on a CPU too
        for variant in args.kernels:
            parse_variant(variant)
        names = list(dict.fromkeys(map(planning.record_name, args.preset or ())))  # ./x.py and x.py: one
        args.preset = ",".join(names) or None
        resolved = {name: planning.model(name) for name in names}
    except (ValueError, OSError) as e:
        parser.error(str(e))
    models = {name: config for name, (config, _, _) in resolved.items()}
    for _, _, source in resolved.values():
        if source:
            console.print(source)
    planning_note = any(v is not None for v in (args.optimizer, args.dtype, args.recompute))  # unused in a plan
    if len(names) == 1:  # a config file's batch_size, optimizer, dtype and recompute where the command line sets none
        fill_unset(args, resolved[names[0]][1])
    args.batch_size = args.batch_size or 16
    args.recompute = False if args.recompute is None else args.recompute

    if args.gpu == "list":
        print_peak_table(console)
        return 0
    device = detect()
    if args.gpu != "auto":
        gpu = find(args.gpu)
        if gpu is None:
            near = [g.key for g in GPUS if args.gpu.lower() in g.key] or [g.key for g in GPUS]
            console.print(f"bench.mfu: no GPU {args.gpu!r} in the peak table; did you mean one of: "
                          f"{', '.join(near)}? (python -m bench.mfu --gpu list)")
            return 2
        if device is None or device.gpu is not gpu:
            plan_tables(args, gpu, models or {name: planning.config_for(name) for name in planning.DEFAULT_PLAN},
                        planning_note, parser, console)
            return 0
    if len(names) > 1:  # not planned: measured here
        parser.error(f"--preset {args.preset}: --gpu {args.gpu} measures this machine's GPU, one model at a time")
    # The settings of the one model measured here: refused now, on a CPU too.
    args.preset, args.optimizer = args.preset or "gpt2", args.optimizer or "adamw"
    config = models.get(args.preset) or planning.config_for(args.preset)
    try:  # (a GPU without bf16: fp16, which bf16_adamw refuses)
        args.dtype = optimizer_dtype(args.optimizer, args.dtype or (gpu_dtype(device.capability) if device else None))
        args.recompute = recompute_count(args.recompute, config.n_layer)
    except ValueError as e:
        parser.error(str(e))
    if device is None:
        console.print("bench.mfu --gpu auto measures the GPU it runs on, and this machine has no CUDA GPU.\n"
                      "  On a GPU machine:    python -m bench.mfu --gpu auto --preset gpt2\n"
                      "  To plan for a GPU:   python -m bench.mfu --gpu h100 [--world-size 8]\n"
                      "  The peak table:      python -m bench.mfu --gpu list")
        return 0
    out = args.json or profile.PROFILES / f"{device.slug}-mfu-{Path(args.preset).stem}.json"
    measure_all(args, config, device, console, out)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
