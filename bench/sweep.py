"""Sweep the launch heuristics of the memory-bound Triton kernels on the GPU at hand: which values
of a kernel module's constants are fastest, verified, at its benchmark's shapes.

    python -m bench.sweep [--sweeps norm,layer_norm,swiglu,cross_entropy,rope,adamw] [--json PATH] [--budget-s S]

The launch code of these kernels reads module constants (kernels/norm.py's _TILE, _BWD_TILE,
_ELEMS_PER_THREAD, _BWD_WARPS_PER_SM and _BWD_STAGES; kernels/runtime.py's _TILE and _NUM_WARPS for the
elementwise tiles SwiGLU runs on; ...). For each setting of a sweep's constants (every
combination of the values listed: the committed setting first, then each constant changed alone,
then the combination of those changes that won, then the rest) the constants are set, and the
op's triton backend is checked against the torch reference and timed at each shape of its
benchmark (bench/op_<op>.py; op_norm.py for both norms) through bench.backends.measure, the
path every benchmark takes (times: the GPU's, bench.measure.median_ms). One setting serves every width (the launch code
derives tiles and warps from it), so the setting to commit is the one with the least geometric
mean of the training pass's time (fwd+bwd; AdamW's step) over the shapes, verified at every
shape: each shape weighs the same, so the narrow widths small models train at count as much as
the widest (a sum of ms would be decided by the widest shape, ten times the narrowest's time);
each shape's own fastest is printed too, to show what one setting leaves on the table. A setting that
fails (a launch out of resources) is reported, not fatal. --json writes every measurement.
--budget-s bounds the run: each sweep takes its share of the time left (the earlier sweeps' unused
time goes to the later ones) and starts no setting past it, then reports what it measured (the
norms' grids are hundreds of settings, a GPU session's share of them tens).
"""
import argparse
import contextlib
import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import kernels
from bench import (backends, described, listed, op_adamw, op_cross_entropy, op_norm, op_rope, op_swiglu,
                   positive, result_file, write_json)
from bench.cases import Shapes, case
from bench.hardware import detect
from bench.measure import one_line, provenance
from kernels import adamw, cross_entropy, norm, rope, runtime


@dataclass(frozen=True)
class Sweep:
    module: object  # the kernel module whose constants the launch code reads
    values: dict[str, tuple]  # constant -> the values to try, the committed one among them
    op: str
    shapes: tuple[Shapes, ...]
    reset: Callable[[], None] = lambda: None  # forgets what the module derived from the old values
    residual: bool = False  # the norms: with the residual add, as the model calls them


# _TILE 1024 with 32 elements a thread: one warp a row up to 1024 wide (warp-local row sums)
NORM_VALUES = {"_TILE": (1024, 2048, 4096, 8192, 16384), "_BWD_TILE": (1024, 2048, 4096, 8192),
               "_ELEMS_PER_THREAD": (8, 16, 32), "_BWD_WARPS_PER_SM": (16, 32, 64), "_BWD_STAGES": (1, 2, 3)}
SWEEPS = {
    # As the model calls them: every pre-norm block's norms add the residual (one more tensor
    # read and one written, and the backward's registers with it)
    "norm": Sweep(norm, NORM_VALUES, "rms_norm", op_norm.SHAPES, residual=True),
    # GPT-2's own: LayerNorm with bias and the residual add at 768 (its backward holds more registers)
    "layer_norm": Sweep(norm, NORM_VALUES, "layer_norm", op_norm.SHAPES[:1], residual=True),
    # runtime's elementwise tiles, which the cross-entropy backward launches on too: what a pick
    # does there is bench.op_cross_entropy's to confirm
    "swiglu": Sweep(runtime, {"_TILE": (2048, 4096, 8192), "_NUM_WARPS": (4, 8, 16)}, "swiglu", op_swiglu.SHAPES),
    # the forward's row walk (its backward: runtime's tiles, above)
    "cross_entropy": Sweep(cross_entropy, {"_TILE": (4096, 2048, 8192, 16384), "_NUM_WARPS": (8, 4, 16)},
                           "cross_entropy", op_cross_entropy.SHAPES),
    "rope": Sweep(rope, {"_TILE": (2048, 4096, 8192), "_NUM_WARPS": (4, 8, 16)}, "rope", op_rope.SHAPES),
    # The launch plans are cached per parameter list, their blocks sized by BLOCK.
    "adamw": Sweep(adamw, {"BLOCK": (1024, 2048, 4096, 8192), "NUM_WARPS": (4, 8)}, "adamw", op_adamw.SHAPES,
                   adamw._plan.cache_clear),
}


def _changes(setting: dict, committed: dict) -> int:
    return sum(setting[name] != committed[name] for name in setting)


def settings(sweep: Sweep) -> list[dict]:
    """Every combination of the sweep's values: the committed one first, then those that change
    one constant of it, then two, ...: a run cut short has measured each constant alone (and then,
    in `run`, the combination of their winners)."""
    committed = {name: getattr(sweep.module, name) for name in sweep.values}
    others = [dict(zip(sweep.values, combo)) for combo in itertools.product(*sweep.values.values())]
    return sorted(others, key=lambda s: _changes(s, committed))


def winners(records: list[dict]) -> dict:
    """Each constant at its best value measured alone: the value of the fastest setting, verified
    at every shape, among the committed one (records[0]) and those that change only that constant.
    The settings measured so far must include every one-change setting."""
    committed = records[0]["setting"]
    combined = {}
    for name in committed:
        alone = [r for r in records if all(r["setting"][k] == committed[k] for k in committed if k != name)]
        fastest = best(alone)
        combined[name] = fastest["setting"][name] if fastest else committed[name]
    return combined


@contextlib.contextmanager
def constants(sweep: Sweep, setting: dict):
    """The sweep's module with `setting`'s values, restored after."""
    old = {name: getattr(sweep.module, name) for name in setting}
    try:
        for name, value in setting.items():
            setattr(sweep.module, name, value)
        sweep.reset()
        yield
    finally:
        for name, value in old.items():
            setattr(sweep.module, name, value)
        sweep.reset()


def measure(sweep: Sweep, setting: dict, device) -> dict:
    """shape -> the triton backend's check and its training pass's ms, rate and roofline with
    `setting` (or the error that kept it from running), at each of the sweep's shapes."""
    results = {}
    with constants(sweep, setting):
        for s in sweep.shapes:
            # other ops than the norms ignore the residual
            full = case(sweep.op, s, device, residual=sweep.residual)
            timed = dataclasses.replace(full, passes=full.passes[-1:])  # the training pass alone
            checked = case(sweep.op, s, device, quick=True, residual=sweep.residual)  # every pass
            e = backends.entry(timed, checked, {"triton": kernels.get(sweep.op, "triton")},
                               backends.roofline(timed.unit, device, timed.dtype), device)
            r, pass_ = e["backends"]["triton"], timed.passes[0]
            results[timed.shape] = (dict(error=r["error"]) if "error" in r else
                                    dict(ms=r["ms"][pass_], rate=r["rate"][pass_], unit=timed.unit,
                                         roofline=r["roofline"][pass_], verified=r["verified"],
                                         check=r["check"]))
    return results


def _mean_ms(record: dict) -> float:
    """The geometric mean over the shapes of the training pass's ms (nan where one did not run or
    timed no time at all)."""
    times = [m.get("ms", float("nan")) for m in record["shapes"].values()]
    if not times or not all(t > 0 for t in times):
        return float("nan")
    return math.exp(sum(map(math.log, times)) / len(times))


def best(records: list[dict]) -> dict | None:
    """The record whose setting verified and ran at every shape in the least geometric-mean time."""
    whole = [r for r in records if all(m.get("verified") for m in r["shapes"].values()) and _mean_ms(r) > 0]
    return min(whole, key=_mean_ms, default=None)


def _named(setting: dict) -> str:
    return " ".join(f"{name}={value}" for name, value in setting.items())


def report(name: str, sweep: Sweep, records: list[dict], unmeasured: int = 0) -> str:
    """The sweep's table (the training pass's rate per shape, x where unverified), its pick, and
    each shape's own fastest; `unmeasured`: settings its share of the budget left out."""
    shapes = list(records[0]["shapes"])
    unit = next((m["unit"] for r in records for m in r["shapes"].values() if "unit" in m), "")
    lines = [f"\n{name}: {sweep.op}'s training pass, {unit} (x: not verified), the geometric mean of its ms",
             " | ".join(["setting", *shapes, "mean ms"])]
    for r in records:
        cells = [one_line(m["error"]) if "error" in m else f"{m['rate']:,.0f}{'' if m['verified'] else ' x'}"
                 for m in r["shapes"].values()]
        mark = "  committed" if r is records[0] else ""
        lines.append(" | ".join([_named(r["setting"]), *cells, f"{_mean_ms(r):.3f}"]) + mark)
    if unmeasured:
        lines.append(f"cut at its share of the budget: {len(records)} settings measured, at least {unmeasured} not")
    pick = best(records)
    if pick is None:
        lines.append("no setting verified at every shape")
        return "\n".join(lines)
    assignments = ", ".join(f"{k} = {v}" for k, v in pick["setting"].items())
    committed = _mean_ms(records[0])  # nan where it failed at a shape
    versus = f"{committed / _mean_ms(pick):.2f}x the committed" if committed > 0 else "the committed failed at a shape"
    lines.append(f"pick for {sweep.module.__name__}: {assignments}  ({versus})")
    for shape in shapes:
        ran = [r for r in records if r["shapes"][shape].get("verified") and r["shapes"][shape]["ms"] > 0]
        if ran:
            fastest = min(ran, key=lambda r: r["shapes"][shape]["ms"])
            lines.append(f"  {shape}: fastest {_named(fastest['setting'])} "
                         f"({pick['shapes'][shape]['ms'] / fastest['shapes'][shape]['ms']:.2f}x the pick)")
    return "\n".join(lines)


def run(names: list[str], device, json_path: Path | None, sweeps: dict[str, Sweep] = SWEEPS,
        budget_s: float | None = None) -> dict:
    """Each named sweep measured and reported; the JSON file rewritten after every setting, so a
    run cut short keeps what it measured. With `budget_s`, each sweep stops starting settings at
    its share of the time left (the committed setting is always measured)."""
    result = dict(provenance(), device=str(device), sweeps={})
    end = None if budget_s is None else time.monotonic() + budget_s
    for i, name in enumerate(names):
        sweep = sweeps[name]
        records, queue = [], settings(sweep)
        share_end = None if end is None else time.monotonic() + (end - time.monotonic()) / (len(names) - i)
        while queue and not (records and share_end is not None and time.monotonic() >= share_end):
            setting = queue.pop(0)
            records.append(dict(setting=setting, shapes=measure(sweep, setting, device)))
            committed = records[0]["setting"]
            if queue and _changes(setting, committed) <= 1 < _changes(queue[0], committed):
                # Each constant measured alone: their winners together come next, the likeliest
                # best of the combinations (a run cut short may reach no other).
                combined = winners(records)
                if _changes(combined, committed) > 1 and combined in queue:  # not measured yet
                    queue.remove(combined)
                    queue.insert(0, combined)
            pick = best(records)
            result["sweeps"][name] = dict(module=sweep.module.__name__, op=sweep.op, records=records,
                                          pick=pick["setting"] if pick else None, unmeasured=len(queue))
            if json_path:
                write_json(json_path, result)
        print(report(name, sweep, records, len(queue)), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=described(__doc__))
    parser.add_argument("--sweeps", type=listed, default=",".join(SWEEPS), help=f"some of {', '.join(SWEEPS)}")
    parser.add_argument("--json", type=result_file, help="write every measurement to this file")
    parser.add_argument("--budget-s", type=positive(float), help="seconds for the whole run, shared among the sweeps")
    args = parser.parse_args(argv)
    names = args.sweeps
    if unknown := [n for n in names if n not in SWEEPS]:
        parser.error(f"unknown sweep {', '.join(unknown)}: the sweeps are {', '.join(SWEEPS)}")
    if detect() is None:
        print(f"{parser.prog}: a sweep of the GPU it runs on, and this machine has no CUDA GPU", file=sys.stderr)
        return 2
    run(names, "cuda", args.json, budget_s=args.budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
