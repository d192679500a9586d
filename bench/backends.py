"""The backends of an op measured side by side at one bench.cases.Case: each checked against the
torch reference, timed at every pass, and rated against a roofline measured in the same run.
The one measuring path of the kernel profile (bench/kernels.py) and the per-issue benchmarks
(bench/op_*.py), and the command line those share.

Times are medians of the GPU's time (bench.measure.median_ms: CUDA events, calls queued ahead of
the GPU) after one untimed call, which compiles and autotunes. Beside each time, on CUDA, the memory the pass allocates beyond its
inputs at its peak (outputs and gradients included): what a backend costs in memory, which for
some ops (the fused loss) is the point; and the host's time to issue the pass, which near the
GPU's time says the pass is bound by the host (its launches, argument checks), not the kernels.
A backend that fails its check is still timed, and marked unverified; one that cannot run at all
is reported with its error.
"""
import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Iterable

import torch

import kernels
from bench import described, result_file, write_json
from bench.cases import Case, check
from bench.hardware import detect
from bench.measure import TIMING, Row, copy_gbs, error_cell, matmul_tflops, median_ms, print_rows, provenance
from bench.profile import OUTSIDE_GRAPH

ROOFLINE_NAMES = {"GB/s": "copy bandwidth", "TFLOPS": "bf16 matmul"}


def implementations(op: str) -> dict[str, Callable]:
    """The backends to measure for `op`: name -> callable with the op's signature. Every
    registered one (a backend of the user's, registered before bench.kernels runs, is timed and
    checked as triton's is) and torch.compile of torch's."""
    reference = kernels.get(op, "torch")
    impls = {"torch": reference}
    if op not in OUTSIDE_GRAPH:
        impls["compile"] = torch.compile(reference, dynamic=False)  # one graph a shape, as in training
    return impls | {backend: kernels.get(op, backend) for backend in kernels.ops()[op] if backend != "torch"}


def roofline(unit: str, device="cuda", dtype: torch.dtype = torch.bfloat16) -> float:
    """What a rate in `unit` is a fraction of, measured on `device`: the copy bandwidth (GB/s) or
    the matmul rate in `dtype` (TFLOPS)."""
    return copy_gbs(device) if unit == "GB/s" else matmul_tflops(device, dtype)


def peak_mib(fn: Callable, device) -> float | None:
    """MiB that `fn()` allocates beyond what was allocated before it, at its peak, by the caching
    allocator's count; None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def host_ms(fn: Callable, device, calls: int = 5) -> float | None:
    """Median ms the host takes to issue `fn()` (to return from it, the GPU idle before each call):
    where that is near the GPU's time for it, the pass is bound by the host (bench.measure.HOST_BOUND).
    None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    times = []
    for _ in range(calls):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    torch.cuda.synchronize(device)
    return statistics.median(times)


def time_case(c: Case, fn: Callable, device) -> tuple[dict[str, float], ...]:
    """pass -> median ms of `fn` running that pass of `c`, pass -> its peak_mib and pass -> its
    host_ms, all passes on one set of inputs."""
    inputs = c.make()
    calls = {pass_: (lambda pass_=pass_: c.call(fn, inputs, pass_)) for pass_ in c.passes}
    return ({pass_: median_ms(call) for pass_, call in calls.items()},
            {pass_: peak_mib(call, device) for pass_, call in calls.items()},
            {pass_: host_ms(call, device) for pass_, call in calls.items()})


def entry(timed: Case, checked: Case, impls: dict[str, Callable], peak: float, device) -> dict:
    """A profile entry: per backend of `impls` its check on `checked` (the op at shapes whose
    float64 reference fits in memory beside the timed inputs) and its ms, rate and fraction of
    `peak` at every pass of `timed`."""
    # Dynamo compiles a function for at most 8 shapes and runs it eagerly after: each case
    # starts afresh, so that a benchmark over many shapes times what torch.compile makes of each.
    torch._dynamo.reset()
    reference = kernels.get(timed.op, "torch")
    records = {}
    for name, fn in impls.items():
        ok, why = check(checked, fn, reference)
        record = {"verified": ok, "check": why}
        try:
            record["ms"], record["peak_mib"], record["host_ms"] = time_case(timed, fn, device)
        except Exception as e:  # a backend that cannot run here is reported, not fatal
            record["error"] = f"{type(e).__name__}: {e}"
        else:
            record["rate"] = {p: timed.rate(p, ms) for p, ms in record["ms"].items()}
            record["roofline"] = {p: r / peak for p, r in record["rate"].items()}
        records[name] = record
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return {"shape": timed.shape, "training_pass": timed.passes[-1], "unit": timed.unit, "backends": records}


def rows(ops: dict[str, dict]) -> list[Row]:
    """Table rows of op -> entry: one per backend and timed pass."""
    out = []
    for op, e in ops.items():
        for backend, r in e["backends"].items():
            if "error" in r:  # one row for the backend that could not run, saying why
                out.append(Row(op, e["shape"], e["training_pass"], backend, None, None, e["unit"], None,
                               r["verified"], error=r["error"]))
            for pass_, ms in r.get("ms", {}).items():
                out.append(Row(op, e["shape"], pass_, backend, ms, r["rate"][pass_], e["unit"],
                               r["roofline"][pass_], r["verified"], r.get("peak_mib", {}).get(pass_),
                               r.get("host_ms", {}).get(pass_)))
    return out


def add_backward(c: Case, entry: dict, peak: float) -> None:
    """Add the backward alone to each backend of `entry` that ran: a backward needs its forward's
    graph, so it is its fwd+bwd median less its fwd median, credited the work between them (none
    where noise leaves no time between them), and host time likewise, so that a host-bound
    backward is marked too."""
    c = dataclasses.replace(c, work={"bwd": c.work["fwd+bwd"] - c.work["fwd"]})
    for record in entry["backends"].values():
        if "ms" not in record or (ms := record["ms"]["fwd+bwd"] - record["ms"]["fwd"]) <= 0:
            continue
        record["ms"]["bwd"] = ms
        record["rate"]["bwd"] = c.rate("bwd", ms)
        record["roofline"]["bwd"] = record["rate"]["bwd"] / peak
        host = record.get("host_ms") or {}
        if host.get("fwd") is not None and host.get("fwd+bwd") is not None:
            host["bwd"] = host["fwd+bwd"] - host["fwd"]


def measure(timed: Case, impls: dict[str, Callable], device, checked: Case | None = None) -> list[Row]:
    """Rows of every backend of `impls` at `timed`, checked there or at `checked`; with the
    backward alone too where `timed` times a forward and the two (the issues' targets name it)."""
    peak = roofline(timed.unit, device, timed.dtype)
    e = entry(timed, checked or timed, impls, peak, device)
    if {"fwd", "fwd+bwd"} <= set(timed.passes):
        add_backward(timed, e, peak)
    return rows({timed.op: e})


def cli(doc: str, run: Callable[[], Iterable[Row]], title: str, argv: list[str] | None = None) -> int:
    """A per-issue benchmark's command line: run it on the GPU, print its rows, and with --json
    also write them. Each row is printed (and the file rewritten) as it is measured, so a run cut
    short keeps what it measured; the table comes at the end."""
    parser = argparse.ArgumentParser(description=described(doc))
    parser.add_argument("--json", type=result_file, help="also write the rows (as dicts), the device, versions and "
                                                    "roofline to this path (bench.report makes tables of it)")
    args = parser.parse_args(argv)
    device = detect()
    if device is None:
        print(f"{parser.prog}: a benchmark of the GPU it runs on, and this machine has no CUDA GPU", file=sys.stderr)
        return 2
    result = []
    header = dict(title=title, device=device.as_dict(), **provenance(), timing=TIMING)
    for row in run():
        result.append(row)
        measured = (error_cell(row.error) if row.error else f"{row.ms:.3f} ms, {row.value:.0f} {row.unit}")
        print(f"{row.op} {row.shape} {row.pass_} {row.backend}: {measured}", flush=True)
        if args.json:
            measured = dict(roofline=dict(name=ROOFLINE_NAMES[row.unit], unit=row.unit, value=roofline(row.unit)))
            write_json(args.json, header | measured | dict(rows=[r.as_dict() for r in result]))
    unit = result[0].unit
    print_rows(result, f"{title}; {ROOFLINE_NAMES[unit]} {roofline(unit):.0f} {unit}")
    return 0
