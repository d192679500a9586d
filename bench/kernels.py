"""Kernel profile of this GPU: every op, forward and forward+backward (the optimizer: its step),
each backend (torch eager, torch.compile of the torch backend, triton), at the shapes a preset's
training runs it at. Per case: the median time (bench.measure.median_ms, CUDA events), GB/s or
TFLOPS, the fraction of the roofline measured in the same run (copy bandwidth, the matmul
rate in the run's dtype), and whether the backend passed the check against the torch reference
at those shapes.
Adds this workload's record to profiles/<gpu-slug>.json (replacing an earlier record of the same
workload; others are kept), which `train.py --kernels=auto` chooses backends from.

    python -m bench.kernels --gpu auto [--preset gpt2] [--batch-size 16] [--seq-len 1024] [--dtype D]
    python -m bench.kernels --gpu auto --preset config/train_shakespeare_char.py  # a train.py config's

The dtype is train.py's on this GPU unless given (bf16, or fp16 where the GPU has no bf16; a
config file's own, if it sets one): a run takes each op from a record of its own dtype where
the profile has one, and the record nearest its shapes (a config file's record: its own model).
"""
import argparse
import sys
from pathlib import Path

import torch

import kernels
from bench import described, fill_unset, listed, positive, profile, result_file, write_json
from bench import plan as planning
from bench.backends import entry, implementations, roofline, rows
from bench.cases import Shapes, case
from bench.hardware import Device, detect, find
from bench.measure import TIMING, print_rows, provenance
from gpt.config import DTYPES, gpu_dtype


def measure_op(op: str, shapes: Shapes, rooflines: dict, device="cuda") -> dict:
    """One op's profile entry: per backend its check and its timings at every pass, and the
    backend `kernels.choose` would take from it, eagerly and in a compiled model."""
    timed = case(op, shapes, device)
    # The check covers every parameter shape with one tensor each: the whole model in float64
    # would not fit beside it on most GPUs.
    checked = case(op, shapes, device, quick=True)
    peak = rooflines["copy_gbs"] if timed.unit == "GB/s" else rooflines["matmul_tflops"]
    result = entry(timed, checked, implementations(op), peak, device)
    registered = kernels.ops()[op]
    result["chosen"] = {mode: profile.fastest_verified(result, registered, profile.launched_compiled(op, compiled))[0]
                        for mode, compiled in (("eager", False), ("compiled", True))}
    return result


def run(device: Device, shapes: Shapes, preset_name: str, ops=kernels.OPS, partial: Path | None = None) -> dict:
    """Measure `ops` at `shapes` on `device` and return the profile's record of this workload,
    printing each op's rows as they come and writing the record so far to `partial` after each op
    (a run cut short keeps what it measured; the profile itself takes only a whole record)."""
    torch.cuda.set_device(device.index)
    rooflines = {"copy_gbs": roofline("GB/s"), "matmul_tflops": roofline("TFLOPS", dtype=shapes.dtype)}
    record = {"workload": profile.workload(preset_name, shapes), "device": device.as_dict(), **provenance(),
              "timing": TIMING, "kernels_source": profile.kernels_source(), "rooflines": rooflines, "ops": {}}
    for op in ops:
        record["ops"][op] = measure_op(op, shapes, rooflines)
        print_rows(rows({op: record["ops"][op]}), f"{device.name}, {preset_name} {shapes.describe()}: {op}")
        if partial is not None:
            write_json(partial, {"format": profile.FORMAT, "workloads": [record]})
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=described(__doc__))
    parser.add_argument("--gpu", default="auto", help="auto, or the name of the GPU here (a check)")
    parser.add_argument("--preset", default="gpt2", help="model whose training shapes to measure at: a preset, or "
                                                        "a train.py config file (its model, batch_size and dtype)")
    parser.add_argument("--batch-size", type=positive(int),
                        help="sequences per micro-batch (default: a config file's batch_size, else 16)")
    parser.add_argument("--seq-len", type=positive(int), help="tokens per sequence (default: the preset's block_size)")
    parser.add_argument("--dtype", choices=DTYPES, help="the ops' dtype (default: train.py's on this GPU)")
    parser.add_argument("--ops", type=listed, default=",".join(kernels.OPS), help="comma-separated ops")
    parser.add_argument("--out", type=result_file, help="profile path (default: profiles/<gpu-slug>.json)")
    args = parser.parse_args(argv)
    ops = args.ops
    try:  # on any machine, before a GPU is looked for: a GPU session's call fails at once, and a CPU's dry run
        args.preset = planning.record_name(args.preset)
        config, settings, source = planning.model(args.preset)
        if source:
            print(source)
        fill_unset(args, settings)  # a config file's batch_size and dtype (None: this GPU's default)
        for op in ops:
            kernels.get(op, "torch")  # a ValueError naming the op if it is unknown
        if args.gpu != "auto" and find(args.gpu) is None:
            raise ValueError(f"--gpu {args.gpu}: no such GPU in the peak table (python -m bench.mfu --gpu list)")
    except (ValueError, OSError) as e:
        parser.error(str(e))
    args.batch_size = args.batch_size or 16

    device = detect()
    if device is None:
        print("bench.kernels measures the GPU it runs on, and this machine has no CUDA GPU.\n"
              "On a GPU machine run:  python -m bench.kernels --gpu auto --preset gpt2")
        return 0
    if args.gpu != "auto" and find(args.gpu) is not device.gpu:
        print(f"bench.kernels: asked for {args.gpu!r} but this machine has {device.name!r}; "
              f"profiles are measured, so run it on that GPU (or pass --gpu auto)", file=sys.stderr)
        return 2
    if set(ops) != set(kernels.OPS) and args.out is None:
        print(f"bench.kernels: --ops {','.join(ops)} would replace this workload's record in "
              f"{profile.path_for(device.slug)}, which train.py --kernels=auto reads, by one of those ops "
              f"alone; pass --out", file=sys.stderr)
        return 2
    out = args.out or profile.path_for(device.slug)
    shapes = Shapes(config, args.batch_size, args.seq_len,
                    getattr(torch, args.dtype or gpu_dtype(device.capability)))
    try:  # before measuring: a file that cannot take the result is known now
        profile.load_own(out, device.slug)
    except ValueError as e:
        print(f"bench.kernels: {e}", file=sys.stderr)
        return 2
    partial = out.with_name(f"{out.stem}.{Path(args.preset).stem}.partial.json")
    record = run(device, shapes, args.preset, ops, partial)
    data = profile.merged(out, record)
    write_json(out, data)
    partial.unlink(missing_ok=True)
    print(f"rooflines: copy {record['rooflines']['copy_gbs']:.0f} GB/s, {record['workload']['dtype']} matmul "
          f"{record['rooflines']['matmul_tflops']:.0f} TFLOPS")
    for op, measured in record["ops"].items():
        print(f"{op}: chosen eager={measured['chosen']['eager']}, compiled={measured['chosen']['compiled']}")
    measured = "; ".join(f"{w['workload']['preset']} {w['workload']['shapes']}" for w in data["workloads"])
    print(f"wrote {out}, which holds {len(data['workloads'])} workloads: {measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
