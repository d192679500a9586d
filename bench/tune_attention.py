"""Measure the flash-attention kernel's launch configurations and print the table to paste into
kernels/attention.py's _GPU_CONFIGS (or, tuned at T <= attention.SHORT_T, _SHORT_T_CONFIGS).

    python -m bench.tune_attention [--json PATH] [--d 64,128] [--t 4096] [--smoke]

For each head dim D at the tuning length T: causal bf16 attention with B*T = 16k tokens and
H*D = 2048 (bench/op_attention.py's shapes), q, k and v views of one qkv projection as in the
model. Each of the kernel's three passes (fwd, and the backward's dkdv and dq) is swept over a
bounded list of candidate configurations while the other passes keep the current one
(kernels.attention._config), through the op's own launch functions. A candidate that fails to
compile or launch (shared memory, registers) is reported as skipped; on an A100 a winner may take
more shared memory than the 99 KB a block of the other cards _GPU_CONFIGS[8] serves (sm86, sm89,
sm120): `python -m tests.sm_compile --arch 8` checks that limit, and fails such a table. Where
the GPU has the tensor copy engine (sm90+), each pass then times the TMA twins (the same tiles
loaded through tensor descriptors, the fifth field of a configuration) of its TMA_TWINS fastest
verified candidates.

Verification, against the current configuration (the one tests/test_attention.py checks): on two
sampled heads (the first and the last) each output must meet the project's accuracy rule
(kernels/accuracy.py) against float64 attention of the same bf16 inputs: o, dq, dk and dv with
torch SDPA in bf16 as the baseline, the fp32 log-sum-exp with the current configuration's as the
baseline (torch exposes none). Over the whole tensors, where no float64 reference fits, every
(batch, head) of each output must lie within twice that bound of the current configuration's:
two results each within the bound of the truth are within twice of each other, and per head a
wrong tile is not diluted by the rest. An unverified candidate is timed and reported, never
chosen.

Timing: bench.measure.median_ms (CUDA events, warm-up, median) of each pass alone, the backward
passes on the current forward's lse and the preprocess's delta. A candidate replaces the current
configuration only when at least MARGIN faster. FLOPs credited are those a pass executes, so its
rate measures the kernel: fwd 4*B*H*T^2*D/2 (QK^T and PV, causal half); dkdv 2x that (it
recomputes K Q^T and V dO^T, then P^T dO and dS^T Q); dq 1.5x (recomputes Q K^T and dO V^T, then
dS K). Together they execute 7 matmuls where the useful backward has 5: in the final comparison
the whole backward (preprocess, dkdv and dq) is credited the useful 2.5x of bench/cases.py, so
its rate compares with bench.op_attention's.

The winners are printed as entries of _GPU_CONFIGS[attention._generation(<the GPU's major>)]
(_SHORT_T_CONFIGS when T <= attention.SHORT_T: the table short sequences take first), with
each pass's speedup, then timed against the current configuration at T = 1024 and 16384 too
(verified there the same way): whether one table per D holds across T or a T bucket is needed. --json writes
everything: device, versions, date, every candidate, the winners and the comparison.

About 70 candidates per D (63 at D = 128) and 24 TMA twins on sm90, each compiled once: compiling
would be most of the run, so --compile-jobs worker processes (min(8, CPUs) on a GPU) compile them
ahead of each sweep, in parallel (see compile_ahead). A call too short for both D can run `--d 64`
and `--d 128` apart; the JSON is rewritten after every pass, so a run cut short keeps what it
measured.

--smoke runs the same path at tiny shapes with two candidates and one TMA twin per pass (on CPU in
Triton's interpreter, timed by the wall clock, not a speed figure): the test suite checks the
tuner with it.
"""
import argparse
import concurrent.futures
import contextlib
import itertools
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import described, positive, result_file, write_json
from bench.flops import causal_attention_fwd_flops
from bench.measure import median_ms, one_line, provenance
from bench.op_attention import TOKENS, WIDTH
from kernels import attention, runtime
from kernels.accuracy import bound, rel_err
from kernels.attention import _Config
from kernels.checks import dtype_name

PASSES = ("fwd", "dkdv", "dq")
# Executed matmuls of T x T x D per pass, and the useful ones of the whole backward, in forwards.
FLOPS_PER_FWD = {"fwd": 1.0, "dkdv": 2.0, "dq": 1.5, "bwd": 2.5}
DTYPE = torch.bfloat16
COMPARE_T = (1024, 16384)
# The factor by which a candidate must beat the current configuration to replace it: a gain
# inside the timing noise would only churn the table.
MARGIN = 1.02
# The first and the last (batch, head): where an indexing slip shows.
SAMPLES = ((0, 0), (-1, -1))
# Candidates: the tiles each pass owns and streams, warps, pipeline depths, pruned to what can
# win on a GPU (see gpu_candidates): every candidate costs a compile.
BLOCKS = (32, 64, 128)
WARPS = (4, 8)
STAGES = (2, 3, 4)  # 1 overlaps no streamed load with compute; a default of 1 is still timed
# Where the GPU has the tensor copy engine (sm90+), the TMA twins of this many of the fastest
# verified pointer-load candidates are timed too: TMA frees the registers the pointer tiles'
# addresses take, which can move the best tile, so more than the winner alone gets a twin.
TMA_TWINS = 8
# Three heads, so that one is checked only by the whole-tensor comparison.
SMOKE = dict(D=32, T=40, B=1, H=3, compare_t=(64,))
INTERPRETER_BLOCKS = (16, 32)

def _tiles(which: str, owned: int, streamed: int) -> tuple[int, int]:
    """(block_m, block_n) of a pass that owns `owned` rows and streams `streamed` past them:
    fwd and dq own query rows (block_m), dkdv owns keys (block_n)."""
    return (streamed, owned) if which == "dkdv" else (owned, streamed)


def gpu_candidates(which: str, D: int) -> list[_Config]:
    """The GPU sweep of pass `which` at head dim D.

    The streamed tile divides the owned one (the kernels' rule: the causal diagonal starts a
    step). The owned tile has at least 64 rows: a Hopper warpgroup's MMA is 64 rows tall, and the
    owned tile is what reuses each streamed one. Each thread holds 32 to 64 elements of the owned
    tile's (rows x D) fp32 accumulator: fewer leaves warps idle, more spills registers."""
    out = []
    for owned, streamed in itertools.product(BLOCKS, BLOCKS):
        if owned < 64 or owned % streamed:
            continue
        for warps in WARPS:
            if not 32 <= owned * D // (32 * warps) <= 64:
                continue
            out += [_Config(*_tiles(which, owned, streamed), warps, s) for s in STAGES]
    return out


def interpreter_candidates(which: str) -> list[_Config]:
    """Small tiles within the kernels' divisibility rule: the interpreter's smoke run."""
    return [_Config(*_tiles(which, owned, streamed), 4, 1)
            for owned, streamed in itertools.product(INTERPRETER_BLOCKS, INTERPRETER_BLOCKS)
            if owned % streamed == 0]


def candidates(which: str, D: int, default: _Config, device: torch.device, smoke: bool) -> list[_Config]:
    """The current configuration first, then the sweep; two in all for a smoke run."""
    pool = gpu_candidates(which, D) if device.type == "cuda" else interpreter_candidates(which)
    ordered = [default, *(c for c in pool if c != default)]
    return ordered[:2] if smoke else ordered


def tma_twins(records: list[dict], p: "Problem", smoke: bool) -> list[_Config]:
    """The TMA twins of the fastest verified candidates that loaded through pointers, where the
    copy engine takes p's tensors (one twin in a smoke run)."""
    timed = sorted((r for r in records if r.get("verified")), key=lambda r: r["ms"])
    tried = {tuple(r["config"]) for r in records}
    twins = []
    for r in timed:
        cfg = _Config(*r["config"])
        twin = cfg._replace(tma=True)
        if not cfg.tma and tuple(twin) not in tried and attention._use_tma(twin, p.q, p.k, p.v, p.do):
            twins.append(twin)
    return twins[:1 if smoke else TMA_TWINS]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Problem:
    """One shape's inputs, the current configuration's results, and per sampled head the float64
    references and the bound of each output."""

    B: int
    H: int
    T: int
    D: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    defaults: dict[str, _Config]
    base: dict[str, torch.Tensor]  # o, lse, delta; and problem()'s dk, dv, dq
    refs: list[dict[str, torch.Tensor]]
    bounds: list[dict[str, float]]

    def shape(self) -> str:
        return f"B={self.B} H={self.H} T={self.T} D={self.D}"


def launch(which: str, p: Problem, cfg: _Config) -> dict[str, torch.Tensor]:
    """Pass `which` of `p` with `cfg`: the backward passes on the current forward's lse and delta."""
    if which == "fwd":
        o, lse = attention._launch_fwd(p.q, p.k, p.v, True, 0.0, None, cfg)
        return {"o": o, "lse": lse}
    grads = attention._empty_grads(p.q, p.k)
    dq, dk, dv = attention._split_qkv(grads, p.H)
    inputs = (p.q, p.k, p.v, p.do, p.base["lse"], p.base["delta"])
    after = (True, 0.0, None, cfg)
    if which == "dkdv":
        attention._launch_dkdv(*inputs, grads, *after)
        return {"dk": dk, "dv": dv}
    attention._launch_dq(*inputs, grads, *after)
    return {"dq": dq}


def launch_bwd(p: Problem, cfgs: dict[str, _Config]) -> dict[str, torch.Tensor]:
    """The whole backward (preprocess, dkdv, dq) with the configurations `cfgs`."""
    grads = attention._launch_bwd(p.do, p.q, p.k, p.v, p.base["o"], p.base["lse"], True, 0.0, None,
                                  cfgs["fwd"], cfgs["dkdv"], cfgs["dq"])
    dq, dk, dv = attention._split_qkv(grads, p.H)
    return {"dq": dq, "dk": dk, "dv": dv}


def _head(t: torch.Tensor, sample: tuple[int, int]) -> torch.Tensor:
    b, h = sample
    return t[b, h]


def _references(q, k, v, do, lse, sample) -> tuple[dict, dict]:
    """Float64 o, lse2 (base 2, as the kernel saves it), dq, dk, dv of one sampled head, and the
    bound of each: torch SDPA in the working dtype is the baseline, and for lse2 the current
    configuration's `lse`."""
    b, h = sample
    # q, k and v have the same heads (the benchmark's shapes): head h's dk and dv are its own.
    heads = [t[b, h][None, None].detach() for t in (q, k, v)]
    dy = do[b, h][None, None]
    result, errors = {}, {}
    for dtype in (torch.float64, DTYPE):
        leaves = [t.to(dtype).requires_grad_() for t in heads]
        o = attention.attention_torch(*leaves, causal=True)
        grads = torch.autograd.grad(o, leaves, dy.to(dtype))
        outs = dict(zip(("o", "dq", "dk", "dv"), (o, *grads)))
        if dtype == torch.float64:
            result = {name: t[0, 0].detach() for name, t in outs.items()}
        else:
            errors = {name: rel_err(t[0, 0], result[name]) for name, t in outs.items()}
    q64, k64 = (t[0, 0].double() for t in heads[:2])
    T, D = q64.shape
    s = (q64 @ k64.T / math.sqrt(D)).masked_fill(
        torch.ones(T, T, dtype=torch.bool, device=q64.device).triu(1), float("-inf"))
    result["lse"] = torch.logsumexp(s, -1) * math.log2(math.e)
    del s
    bounds = {name: bound(err, DTYPE) for name, err in errors.items()}
    bounds["lse"] = bound(rel_err(_head(lse, sample), result["lse"]), torch.float32)
    return result, bounds


def inputs(B: int, H: int, T: int, D: int, device: torch.device) -> Problem:
    """The inputs of one shape and the current configuration's forward (o, lse) and delta: what
    every pass launches on (a compiling worker holds no more: at the tuning shape 0.3 GB)."""
    qkv = torch.randn(B, T, 3 * H * D, device=device, dtype=DTYPE)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    defaults = {which: attention._config(q, which) for which in PASSES}
    o, lse = attention._launch_fwd(q, k, v, True, 0.0, None, defaults["fwd"])
    do = torch.randn_like(o)  # laid out as o, as the output projection's gradient comes
    delta = attention._launch_delta(o, do, defaults["fwd"])
    base = {"o": o, "lse": lse, "delta": delta}
    return Problem(B, H, T, D, q, k, v, do, defaults, base, [], [])


def problem(B: int, H: int, T: int, D: int, device: torch.device) -> Problem:
    """inputs(), with the current configuration's gradients (copies: as views they would keep
    whole (B, T, 3H, D) buffers) and the float64 references and bounds of the sampled heads."""
    p = inputs(B, H, T, D, device)
    for which in ("dkdv", "dq"):
        p.base.update({name: t.clone() for name, t in launch(which, p, p.defaults[which]).items()})
    for sample in SAMPLES:
        ref, limits = _references(p.q, p.k, p.v, p.do, p.base["lse"], sample)
        p.refs.append(ref)
        p.bounds.append(limits)
    return p


# --- Compiling ahead, in parallel ---------------------------------------------------------------
# One process compiles on one core, and compiling is most of a sweep. Worker processes launch each
# candidate once at the sweep's own shapes first, so Triton's disk cache holds every kernel (the
# same source, constexprs and argument specializations give the same cache key) and the sweep then
# loads them. Nothing a worker does is timed or trusted: a candidate that fails there is left for
# the sweep to fail and report, and a pool that breaks only costs the time it saved.

_worker_problem: dict[tuple, Problem] = {}


def _compile_one(shape: tuple[int, int, int, int, str], which: str, cfg: tuple) -> str:
    """In a worker: pass `which` launched once with `cfg` at `shape` (B, H, T, D, device);
    "ok" or why it failed."""
    try:
        with runtime.direct_launches():
            if shape not in _worker_problem:
                _worker_problem.clear()
                *dims, device = shape
                _worker_problem[shape] = inputs(*dims, torch.device(device))
            p = _worker_problem[shape]
            launch(which, p, _Config(*cfg))
            _sync(p.q.device)
    except Exception as e:
        return _reason(e)
    return "ok"


def compile_ahead(pool, p: Problem, work: list[tuple[str, _Config]]) -> None:
    """Each (pass, candidate) of `work` launched once in `pool`'s workers; nothing without a pool."""
    if pool is None or not work:
        return
    start, shape = time.perf_counter(), (p.B, p.H, p.T, p.D, str(p.q.device))
    try:
        outcomes = list(pool.map(_compile_one, [shape] * len(work), [w for w, _ in work],
                                 [tuple(c) for _, c in work]))
    except Exception as e:  # a worker died (its launch broke the process): the sweep compiles the rest
        print(f"compiling ahead stopped ({_reason(e)}): the sweeps compile what is left")
        return
    failed = sum(o != "ok" for o in outcomes)
    print(f"compiled ahead: {len(work)} candidates in {time.perf_counter() - start:.0f} s "
          f"({failed} failed there; the sweeps report why)")


def compile_pool(jobs: int):
    """A pool of `jobs` worker processes (spawned: CUDA does not survive a fork), or None."""
    if jobs < 2:
        return None
    return concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


def _worst_head_rel_err(out: torch.Tensor, base: torch.Tensor) -> float:
    """The largest rel_err of one (batch, head) of `out` against `base`, computed on their device:
    the whole tensors are too large to copy to the host for every candidate."""
    out, base = out.double().flatten(2), base.double().flatten(2)
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - base).norm(dim=-1) / base.norm(dim=-1).clamp_min(1e-30)).max().item()


def verify(p: Problem, outs: dict[str, torch.Tensor]) -> tuple[bool, str]:
    """Whether `outs` pass the module's verification, and the worst margin or the failure."""
    worst = 0.0
    for name, out in outs.items():
        for sample, ref, limits in zip(SAMPLES, p.refs, p.bounds):
            err, limit = rel_err(_head(out, sample), ref[name]), limits[name]
            if not err <= limit:
                return False, f"{name} head {sample}: error {err:.2e} > bound {limit:.2e}"
            worst = max(worst, err / limit)
        diff, limit = _worst_head_rel_err(out, p.base[name]), 2 * max(b[name] for b in p.bounds)
        if not diff <= limit:
            return False, f"{name}: a head {diff:.2e} from the current configuration's > {limit:.2e}"
    return True, f"error at most {worst:.0%} of the bound"


def _timer(device: torch.device, warmup_ms: int, rep_ms: int):
    if device.type == "cuda":
        return lambda fn: median_ms(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)

    def wall_ms(fn):
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    return wall_ms


def _reason(e: Exception) -> str:
    """A failure as a record's one line: the exception's type and bench.measure's one_line."""
    return f"{type(e).__name__}: {one_line(str(e))}"[:300]


def _require_working_device(device: torch.device, after: str) -> None:
    """Raise when a failed candidate left the device unusable (an illegal address, say): every
    later result would be a failure too."""
    try:
        torch.ones(1, device=device).add_(1).item()
    except Exception as e:
        raise RuntimeError(f"the device failed after {after}: {_reason(e)}") from e


def sweep(which: str, p: Problem, cfgs: list[_Config], timer, rates: bool) -> list[dict]:
    """One record per candidate: its verification, ms and (on a GPU) TFLOPS, or why it was skipped."""
    device = p.q.device
    flops = FLOPS_PER_FWD[which] * causal_attention_fwd_flops(p.B, p.H, p.T, p.D)
    records = []
    for cfg in cfgs:
        record = {"config": list(cfg), "default": cfg == p.defaults[which]}
        try:
            outs = launch(which, p, cfg)  # compiles
            _sync(device)
            record["verified"], record["check"] = verify(p, outs)
            del outs
            record["ms"] = timer(lambda cfg=cfg: launch(which, p, cfg))
        except Exception as e:  # out of shared memory or registers, a compiler error
            record = {"config": record["config"], "default": record["default"], "skipped": _reason(e)}
            _require_working_device(device, f"{which} {tuple(cfg)}")
        else:
            record["tflops"] = flops / record["ms"] / 1e9 if rates else None
        records.append(record)
    return records


def winner(records: list[dict]) -> dict | None:
    """The fastest verified record, unless the current one (verified) is within MARGIN of it."""
    verified = [r for r in records if r.get("verified")]
    if not verified:
        return None
    best = min(verified, key=lambda r: r["ms"])
    current = next((r for r in verified if r["default"]), None)
    return current if current and current["ms"] <= MARGIN * best["ms"] else best


def _fmt_cfg(cfg) -> str:
    return "(" + ", ".join(str(x) for x in cfg) + ")"


def print_sweep(which: str, p: Problem, records: list[dict], best: dict | None, seconds: float,
                unit: str) -> None:
    print(f"\n{which}  {p.shape()}  {len(records)} candidates, {seconds:.0f} s  ({unit})")
    print(f"  {'(block_m, block_n, warps, stages, tma)':40} {'ms':>8} {'TFLOPS':>7}  check")
    for r in records:
        marks = " ".join(m for m, on in (("current", r["default"]), ("BEST", r is best)) if on)
        if "skipped" in r:
            print(f"  {_fmt_cfg(r['config']):40} {'':>8} {'':>7}  skipped: {r['skipped']}  {marks}")
            continue
        rate = f"{r['tflops']:7.1f}" if r["tflops"] is not None else f"{'-':>7}"
        check = ("ok, " if r["verified"] else "FAILED, ") + r["check"]
        print(f"  {_fmt_cfg(r['config']):40} {r['ms']:8.3f} {rate}  {check}  {marks}")


def print_compare(c: dict, unit: str) -> None:
    if "error" in c:
        print(f"T={c['T']}: not compared: {c['error']}")
        return
    print(f"{c['shape']}, current -> winner: " + "; ".join(
        f"{name} {c[name]['current_ms']:.3f} -> {c[name]['winner_ms']:.3f} ms ({c[name]['speedup']:.2f}x, "
        f"{'verified' if c[name]['verified'] else 'FAILED: ' + c[name]['check']})"
        for name in ("fwd", "bwd")) + f"  [{unit}]")


def compare(p: Problem, winners: dict[str, _Config], timer, rates: bool) -> dict:
    """The winners against the current configurations at p's T: the forward alone and the whole
    backward, each verified."""
    flops = causal_attention_fwd_flops(p.B, p.H, p.T, p.D)
    runs = {"fwd": lambda cfgs: launch("fwd", p, cfgs["fwd"]), "bwd": lambda cfgs: launch_bwd(p, cfgs)}
    result = {"T": p.T, "shape": p.shape()}
    for name, run in runs.items():
        ok, why = verify(p, run(winners))
        current_ms = timer(lambda: run(p.defaults))
        winner_ms = timer(lambda: run(winners))
        result[name] = dict(current_ms=current_ms, winner_ms=winner_ms, speedup=current_ms / winner_ms,
                            verified=ok, check=why)
        if rates:
            result[name]["winner_tflops"] = FLOPS_PER_FWD[name] * flops / winner_ms / 1e9
    return result


def table(major: int | None, T: int, tuned: dict[int, dict], header: str) -> str:
    """The winners as entries of the table sequences of length T take (_SHORT_T_CONFIGS up to
    attention.SHORT_T, else _GPU_CONFIGS), with each pass's speedup over the current entry."""
    key = attention._generation(major) if major is not None else "<none: interpreter smoke run, not for pasting>"
    name = "_SHORT_T_CONFIGS" if T <= attention.SHORT_T else "_GPU_CONFIGS"
    lines = [f"# {name}[{key}] entries, {header}"]
    for D, entry in tuned.items():
        passes = entry["passes"]
        if any(passes[w]["winner"] is None for w in PASSES):
            lines.append(f"#   {D}: no verified candidate for every pass; keep the current entry")
            continue
        speedups = ", ".join(f"{w} " + (f"{passes[w]['speedup']:.2f}x" if passes[w]["speedup"] else "n/a")
                             for w in PASSES)
        cfgs = ", ".join(_fmt_cfg(passes[w]["winner"]) for w in PASSES)
        lines.append(f"    {D}: _pass_configs({cfgs}),  # over the current: {speedups}")
    return "\n".join(lines)


def _write(path: Path | None, result: dict) -> None:
    if path:
        write_json(path, result)


def tune(head_dims: list[int], T: int, smoke: bool, json_path: Path | None, pool=None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    rates = gpu and not smoke
    major = torch.cuda.get_device_capability(device)[0] if gpu else None
    name = torch.cuda.get_device_name(device) if gpu else "CPU (Triton interpreter)"
    unit = "CUDA-event median" if gpu else "interpreter wall clock"
    if smoke:
        unit += ", smoke shapes, not a speed figure"
    sweep_timer = _timer(device, warmup_ms=25, rep_ms=100)
    compare_timer = _timer(device, warmup_ms=100, rep_ms=500)
    result = dict(provenance=provenance(), device=name, capability=major, smoke=smoke, timing=unit,
                  dtype=dtype_name(DTYPE), causal=True, tune_t=T, margin=MARGIN,
                  head_dims={})
    for D in head_dims:
        B, H = (SMOKE["B"], SMOKE["H"]) if smoke else (max(1, TOKENS // T), WIDTH // D)
        p = problem(B, H, T, D, device)
        entry = result["head_dims"][str(D)] = {"shape": p.shape(), "passes": {}, "compare": []}
        winners = {}
        sweeps = {which: candidates(which, D, p.defaults[which], device, smoke) for which in PASSES}
        compile_ahead(pool, p, [(which, c) for which, cfgs in sweeps.items() for c in cfgs])
        for which in PASSES:
            start = time.perf_counter()
            records = sweep(which, p, sweeps[which], sweep_timer, rates)
            twins = tma_twins(records, p, smoke)
            compile_ahead(pool, p, [(which, c) for c in twins])
            records += sweep(which, p, twins, sweep_timer, rates)
            best = winner(records)
            print_sweep(which, p, records, best, time.perf_counter() - start, unit)
            current = next(r for r in records if r["default"])
            entry["passes"][which] = dict(
                flops=FLOPS_PER_FWD[which] * causal_attention_fwd_flops(B, H, T, D), current=list(p.defaults[which]),
                winner=best and best["config"],
                speedup=best and current.get("ms") and current["ms"] / best["ms"],
                candidates=records)
            winners[which] = _Config(*best["config"]) if best else p.defaults[which]
            _write(json_path, result)
        # The winners at once: a run cut in the comparisons below (or at the next D) keeps them.
        print("\n" + table(major, T, {D: entry}, f"D={D}, T={T}, before the comparisons across T"))
        compare_ts = SMOKE["compare_t"] if smoke else COMPARE_T
        for t in (T, *sorted(set(compare_ts) - {T})):
            try:
                if p is None or p.T != t:
                    p = None  # frees the last shape's tensors before the next one's
                    _empty_cache(device)
                    p = problem(max(1, B * T // t), H, t, D, device)
                c = compare(p, winners, compare_timer, rates)
            except Exception as e:  # e.g. out of memory at the longest T: the sweeps stand
                c = {"T": t, "error": _reason(e)}
                _require_working_device(device, f"the comparison at T={t}")
            entry["compare"].append(c)
            print_compare(c, unit)
            _write(json_path, result)
        p = None
        _empty_cache(device)
    prov = result["provenance"]
    header = (f"T={T} causal {result['dtype']}, {name}, {prov['date']}, torch {prov['torch']}, "
              f"triton {prov['triton']}")
    result["table"] = table(major, T, {int(D): e for D, e in result["head_dims"].items()}, header)
    print("\n" + result["table"])
    _write(json_path, result)
    if json_path:
        print(f"wrote {json_path}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=described(__doc__))
    parser.add_argument("--json", type=result_file, help="write every result to this path")
    parser.add_argument("--d", default="64,128",
                        help="head dims to tune, comma-separated, of 32, 64, 128 (96 runs with 128's configurations)")
    parser.add_argument("--t", type=positive(int), default=4096, help="the tuning sequence length")
    parser.add_argument("--compile-jobs", type=positive(int), default=None,
                        help="processes that compile the candidates ahead of the sweeps (default: "
                             "min(8, CPUs) on a GPU, none in the interpreter or a smoke run)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes (D=32; --d and --t ignored), two candidates a pass: "
                             "checks the code path, on CPU too")
    args = parser.parse_args(argv)
    try:
        head_dims = list(dict.fromkeys(int(d) for d in args.d.split(",")))
    except ValueError:
        head_dims = []
    if not head_dims or any(d not in (32, 64, 128) for d in head_dims):
        parser.error(f"--d: head dims 32, 64, 128 (96 runs with 128's configurations), got {args.d}")
    if args.smoke:
        head_dims, T = [SMOKE["D"]], SMOKE["T"]
    else:
        T = args.t
        if not torch.cuda.is_available():
            print("bench.tune_attention measures on a CUDA GPU and none is here: nothing tuned.\n"
                  "On a GPU machine run\n"
                  "    python -m bench.tune_attention --json tune_attention.json\n"
                  "(or `bash bench/gpu_session.sh tune`), then paste the printed entries into\n"
                  "kernels/attention.py's _GPU_CONFIGS (_SHORT_T_CONFIGS with --t 1024).\n"
                  "`--smoke` checks the code path here.")
            return 0
    jobs = args.compile_jobs
    if jobs is None:
        jobs = min(8, os.cpu_count() or 1) if torch.cuda.is_available() and not args.smoke else 0
    with runtime.direct_launches(), compile_pool(jobs) or contextlib.nullcontext() as pool:
        tune(head_dims, T, args.smoke, args.json, pool)
    return 0


if __name__ == "__main__":
    sys.exit(main())
