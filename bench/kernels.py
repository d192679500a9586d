"""Kernel profile of this GPU: every op, forward and forward+backward (the optimizer: its step),
each backend (torch eager, torch.compile of the torch backend, triton), at the shapes a preset's
training runs it at. Per case: the median time (triton.testing.do_bench, CUDA events), GB/s or
TFLOPS, the fraction of the roofline measured in the same run (copy bandwidth, bf16 matmul
rate), and whether the backend passed the check against the torch reference at those shapes.
Writes profiles/<gpu-slug>.json, which `train.py --kernels=auto` chooses backends from.

    python -m bench.kernels --gpu auto [--preset gpt2] [--batch-size 16] [--seq-len 1024]
"""
import argparse
import sys
from pathlib import Path

import torch

import kernels
from bench import profile
from bench.cases import Case, Shapes, case, check
from bench.hardware import Device, detect, find
from bench.measure import Row, copy_gbs, matmul_tflops, median_ms, print_rows, provenance
from gpt.model import GPTConfig, preset

# The optimizer step runs outside the compiled model in train.py: no torch.compile variant.
OUTSIDE_GRAPH = {"adamw"}


def implementations(op: str) -> dict:
    """The backends to measure for `op`: name -> callable with the op's signature."""
    reference = kernels.get(op, "torch")
    impls = {"torch": reference}
    if op not in OUTSIDE_GRAPH:
        impls["compile"] = torch.compile(reference, dynamic=False)
    if "triton" in kernels.ops()[op]:
        impls["triton"] = kernels.get(op, "triton")
    return impls


def _time(c: Case, fn) -> dict[str, float]:
    inputs = c.make()
    times = {}
    for pass_ in c.passes:
        def run(pass_=pass_):
            return c.call(fn, inputs, pass_)

        run()  # compiles and autotunes outside the timing
        times[pass_] = median_ms(run)
    return times


def measure_op(op: str, shapes: Shapes, rooflines: dict, device="cuda") -> dict:
    """One op's profile entry: per backend its check and its timings at every pass."""
    timed = case(op, shapes, device)
    # The check covers every parameter shape with one tensor each: the whole model in float64
    # would not fit beside it on most GPUs.
    checked = case(op, shapes, device, quick=True)
    roofline = rooflines["copy_gbs"] if timed.unit == "GB/s" else rooflines["matmul_tflops"]
    entry = {"shape": timed.shape, "training_pass": timed.passes[-1], "unit": timed.unit, "backends": {}}
    for name, fn in implementations(op).items():
        ok, why = check(checked, fn, kernels.get(op, "torch"))
        record = {"verified": ok, "check": why}
        try:
            record["ms"] = _time(timed, fn)
        except Exception as e:  # a backend that cannot run here is reported, not fatal
            record["error"] = f"{type(e).__name__}: {e}"
        else:
            record["rate"] = {p: timed.rate(p, ms) for p, ms in record["ms"].items()}
            record["roofline"] = {p: r / roofline for p, r in record["rate"].items()}
        entry["backends"][name] = record
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    registered = kernels.ops()[op]
    entry["chosen"] = {mode: profile.fastest_verified(entry, registered, compiled)[0]
                       for mode, compiled in (("eager", False), ("compiled", True))}
    return entry


def rows(ops: dict) -> list[Row]:
    out = []
    for op, entry in ops.items():
        for backend, r in entry["backends"].items():
            for pass_, ms in r.get("ms", {}).items():
                out.append(Row(op, entry["shape"], pass_, backend, ms, r["rate"][pass_], entry["unit"],
                               r["roofline"][pass_], r["verified"]))
    return out


def run(device: Device, shapes: Shapes, preset_name: str, ops=kernels.OPS) -> dict:
    """Measure `ops` at `shapes` on `device` and return the profile."""
    torch.cuda.set_device(device.index)
    rooflines = {"copy_gbs": copy_gbs(), "matmul_tflops": matmul_tflops()}
    return {"format": profile.FORMAT, "device": device.as_dict(), **provenance(),
            "workload": {"preset": preset_name, "batch_size": shapes.batch_size, "seq_len": shapes.T,
                         "dtype": str(shapes.dtype).removeprefix("torch."), "shapes": shapes.describe()},
            "rooflines": rooflines,
            "ops": {op: measure_op(op, shapes, rooflines) for op in ops}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="auto", help="auto, or the name of the GPU here (a check)")
    parser.add_argument("--preset", default="gpt2", help="model whose training shapes to measure at")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's block_size)")
    parser.add_argument("--ops", default=",".join(kernels.OPS), help="comma-separated ops")
    parser.add_argument("--out", type=Path, help="profile path (default: profiles/<gpu-slug>.json)")
    args = parser.parse_args(argv)

    device = detect()
    if device is None:
        print("bench.kernels measures the GPU it runs on, and this machine has no CUDA GPU.\n"
              "On a GPU machine run:  python -m bench.kernels --gpu auto --preset gpt2")
        return 0
    if args.gpu != "auto" and find(args.gpu) is not device.gpu:
        print(f"bench.kernels: asked for {args.gpu!r} but this machine has {device.name!r}; "
              f"profiles are measured, so run it on that GPU (or pass --gpu auto)", file=sys.stderr)
        return 2
    ops = args.ops.split(",")
    for op in ops:
        kernels.get(op, "torch")  # a ValueError naming the op if it is unknown
    shapes = Shapes(GPTConfig(**preset(args.preset)), args.batch_size, args.seq_len)
    data = run(device, shapes, args.preset, ops)
    out = args.out or profile.path_for(device.slug)
    profile.write(data, out)
    print_rows(rows(data["ops"]), f"{device.name}, {args.preset} {shapes.describe()}: copy "
               f"{data['rooflines']['copy_gbs']:.0f} GB/s, bf16 matmul {data['rooflines']['matmul_tflops']:.0f} TFLOPS")
    for op, entry in data["ops"].items():
        print(f"{op}: chosen eager={entry['chosen']['eager']}, compiled={entry['chosen']['compiled']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
