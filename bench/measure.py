"""Timing and roofline helpers shared by every benchmark (CUDA), and the provenance recorded
with every result file.

Times are medians of many runs after warm-up, taken with CUDA events by
`triton.testing.do_bench`. Rooflines are measured on the GPU at hand, in the same run:
device-to-device copy bandwidth (bytes read + bytes written) and the bf16 matmul rate.
"""
import datetime
import functools
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


def median_ms(fn, warmup_ms: int = 100, rep_ms: int = 500) -> float:
    """Median milliseconds of `fn()` on the current CUDA device."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


@functools.cache
def copy_gbs(device: str = "cuda") -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device).uniform_()  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


@functools.cache
def matmul_tflops(device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul rate in TFLOPS (8192³, random inputs)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


# A pass whose host time is at least this fraction of its measured time is bound by the host:
# the GPU waited for its launches, and its rate understates the kernels' (tables mark it).
HOST_BOUND = 0.8


def host_bound(ms: float, host_ms: float | None) -> bool:
    return host_ms is not None and host_ms >= HOST_BOUND * ms


@dataclass
class Row:
    """One measured case: `value` in `unit` (GB/s or TFLOPS) and its fraction of the roofline."""

    op: str
    shape: str
    pass_: str  # "fwd", "bwd" or "fwd+bwd"
    backend: str  # "torch", "compile" or "triton"
    ms: float
    value: float
    unit: str
    roofline: float
    verified: bool | None = None
    peak_mib: float | None = None  # what the pass allocates beyond its inputs, at its peak (CUDA)
    host_ms: float | None = None  # the host's time to issue the pass (CUDA)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


def print_rows(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    numbers = ("ms", "host ms", "rate", "of roofline", "peak MiB")
    for col in ("op", "shape", "pass", "backend", *numbers, "verified"):
        table.add_column(col, justify="right" if col in numbers else "left")
    for r in rows:
        verified = "" if r.verified is None else ("yes" if r.verified else "NO")
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
