"""Timing and roofline helpers shared by every benchmark (CUDA), and the provenance recorded
with every result file.

Times are medians of many runs after warm-up, taken with CUDA events, the L2 cache flushed
before each run, and the runs queued ahead of the GPU (median_ms): the GPU's time, not the
host's pace. Rooflines are measured on the GPU at hand, in the same run:
device-to-device copy bandwidth (bytes read + bytes written) and the matmul rate (the cases' dtype).
"""
import datetime
import functools
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


# Calls queued behind one GPU sleep: CUDA's launch queue holds about a thousand entries, and a
# call is an L2 flush, two events and the pass's own launches.
BATCH = 20
MAX_SLEEP_MS = 1000.0  # the longest sleep a batch waits behind: passes slow to issue get smaller batches
L2_FLUSH_BYTES = 256 << 20  # as triton.testing.do_bench: more than any GPU's L2 (an H100's or H200's is 50 MB)
MAX_CALLS = 200  # a median of this many is steady; the host's time per call bounds the rest
WARMUP_BATCHES = 5
# Batches the GPU may reach before the host has queued them (the sleep too short, or the launch
# queue full, the host blocked behind it), each followed by one of half the calls asleep twice as
# long; after that the pass is timed unslept (one that waits for the GPU inside never gets ahead).
TRIES = 3


def calls_for(estimate_ms: float, budget_ms: float) -> int:
    """Timed calls of a pass taking `estimate_ms` within `budget_ms` of GPU time: at least one batch."""
    return max(BATCH, min(MAX_CALLS, int(budget_ms / max(estimate_ms, 1e-3))))


def _sleep_cycles_per_ms() -> float:
    """torch.cuda._sleep's spin cycles per millisecond on the current device, measured: its SM
    clock now (an idle GPU clocks down, an H200 to 345 MHz, so each timing measures it afresh)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(10**7)
    end.record()
    end.synchronize()
    return 1e7 / start.elapsed_time(end)


def flush_l2(buffer: torch.Tensor) -> None:
    """Evict the L2 cache by reading `buffer` (L2_FLUSH_BYTES): the last call's outputs are written
    back now, outside the timing, and the lines left behind are clean. triton.testing.do_bench
    zeroes its buffer instead, which leaves the L2 full of dirty lines (up to 50-60 MiB on a
    Hopper) whose write-back the timed kernel pays as it evicts them: as much again as a kernel
    moving that little moves itself. The read has the opposite doubt: a call writing less than
    the L2 holds may end with its outputs not yet written back, so its rate counts bytes that
    reach DRAM after its end event (the same for every backend). (Not yet measured on a GPU: the
    size of either effect.)"""
    buffer.view(torch.int64).sum()


def median_ms(fn, warmup_ms: int = 100, rep_ms: int = 500) -> float:
    """Median milliseconds of the GPU's work of `fn()` on the current CUDA device: CUDA events
    around each call, the L2 cache flushed before it.

    Calls are queued in batches behind a GPU sleep twice as long as the host takes to queue the
    batch, so the GPU runs them back to back: a pass whose launches take the host longer than its
    kernels take the GPU (small kernels, many launches, argument checks) is timed by its kernels,
    where triton.testing.do_bench would time the host's pace. The host's own time per call is
    measured apart (bench.backends.host_ms). A pass that waits for the GPU inside (an .item()), or
    whose launches overfill CUDA's queue, never gets ahead: after TRIES batches it is timed unslept,
    at the host's pace, and its host time then marks it host-bound (HOST_BOUND)."""
    device = torch.cuda.current_device()
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)

    def batch(n: int, sleep_ms: float) -> tuple[list[float], float, bool]:
        """n calls behind a sleep: (their ms, the host's ms per call, whether the GPU had not
        reached them when the host had queued them all)."""
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        torch.cuda._sleep(int(sleep_ms * cycles_per_ms))
        t0 = time.perf_counter()
        for start, end in events:
            flush_l2(flush)
            start.record()
            fn()
            end.record()
        host_ms = 1e3 * (time.perf_counter() - t0) / n
        ahead = not events[0][0].query()
        events[-1][1].synchronize()
        return [start.elapsed_time(end) for start, end in events], host_ms, ahead

    fn()  # compiles and autotunes, outside the timing
    torch.cuda.synchronize(device)
    cycles_per_ms = _sleep_cycles_per_ms()
    times, host_ms, _ = batch(3, 0.0)  # a first estimate of the GPU's and the host's time a call
    n = max(1, min(BATCH, int(MAX_SLEEP_MS / (2 * max(host_ms, 1e-3)))))
    sleep_ms = 2 * n * host_ms
    warmup = max(1, min(WARMUP_BATCHES, round(warmup_ms / max(statistics.median(times) * n, 1e-3))))
    timed, tries = [], TRIES
    while len(timed) < calls_for(statistics.median(times), rep_ms):
        times, host_ms, ahead = batch(n, sleep_ms)
        if not ahead and tries:  # the GPU reached the batch before the host had queued it
            tries -= 1
            n, sleep_ms = max(1, n // 2), (2 * sleep_ms if tries else 0.0)
            continue
        if warmup:
            warmup -= 1
        else:
            timed += times
    return statistics.median(timed)


@functools.cache
def copy_gbs(device: str = "cuda") -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device).uniform_()  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def matmul_tflops(device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul rate in `dtype` in TFLOPS (8192³, random inputs; float32 as torch's
    matmul settings run it): a kernel's rate in TFLOPS is a fraction of its own dtype's."""
    # float32's rate is TF32's or not as the setting is now: measured again when it changes.
    precision = torch.get_float32_matmul_precision() if dtype == torch.float32 else None
    return _matmul_tflops(device, dtype, precision)


@functools.cache
def _matmul_tflops(device: str, dtype: torch.dtype, _precision: str | None) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


# A pass whose host time is at least this fraction of its GPU time is bound by the host: run alone,
# one call after another, the GPU would wait for its launches (tables mark it). Its kernels' rate
# stands (median_ms queues the calls ahead of the GPU); in training the GPU idles unless work
# queued before it (the matmuls) covers the host's time.
HOST_BOUND = 0.8


# What the per-op result files (bench.op_*, bench.kernels) say of their times; files without it
# were timed by triton.testing.do_bench, which times a host-bound pass at the host's pace, the L2
# flushed by zeroing (flush_l2's doubt).
TIMING = "median of CUDA events around the GPU's work alone, the L2 flushed by a read (bench/measure.py)"


def host_bound(ms: float, host_ms: float | None) -> bool:
    return host_ms is not None and host_ms >= HOST_BOUND * ms


@dataclass
class Row:
    """One measured case: `value` in `unit` (GB/s or TFLOPS) and its fraction of the roofline."""

    op: str
    shape: str
    pass_: str  # the case's pass: "fwd", "bwd", "fwd+bwd", "step", ...
    backend: str  # the implementation's name in the table: "torch", "compile", "triton sr", ...
    ms: float
    value: float
    unit: str
    roofline: float
    verified: bool | None = None
    peak_mib: float | None = None  # what the pass allocates beyond its inputs, at its peak (CUDA)
    host_ms: float | None = None  # the host's time to issue the pass (CUDA)
    error: str | None = None  # why the backend could not run (then ms, value and roofline are None)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


def error_cell(error: str, width: int | None = None) -> str:
    """A failed measurement as a table cell or a printed line: "error: " and its one_line."""
    return f"error: {one_line(error)[:width]}"


def one_line(error: str) -> str:
    """An error in one line (a table cell, a record): its first line, and the last line naming an
    exception when that differs (a compile worker's error carries its cause's whole traceback)."""
    lines = [line.strip() for line in error.splitlines() if line.strip()] or [""]
    named = [line for line in lines if re.search(r"\w(Error|Exception)\b", line)]
    return lines[0] if not named or named[-1] == lines[0] else f"{lines[0]} ... {named[-1]}"


def print_rows(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    numbers = ("ms", "host ms", "rate", "of roofline", "peak MiB")
    for col in ("op", "shape", "pass", "backend", *numbers, "verified"):
        table.add_column(col, justify="right" if col in numbers else "left")
    for r in rows:
        verified = "" if r.verified is None else ("yes" if r.verified else "NO")
        if r.error:
            table.add_row(r.op, r.shape, r.pass_, r.backend, error_cell(r.error), *[""] * 4, verified)
            continue
        mib = "" if r.peak_mib is None else f"{r.peak_mib:,.0f}"
        host = "" if r.host_ms is None else f"{r.host_ms:.3f}" + " host-bound" * host_bound(r.ms, r.host_ms)
        table.add_row(r.op, r.shape, r.pass_, r.backend, f"{r.ms:.3f}", host, f"{r.value:.0f} {r.unit}",
                      f"{100 * r.roofline:.0f}%", mib, verified)
    Console().print(table)


def provenance() -> dict:
    """Versions, git revision and date: what a result file needs to be reproduced."""
    import triton

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_sha=git("rev-parse", "HEAD"), git_dirty=bool(status) if status is not None else None,
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version())
