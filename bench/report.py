"""Markdown tables of a GPU session's result files, for the README: `python -m bench.report FILE...`

Takes the files of bench.mfu (`--json`), of the per-op benchmarks (bench/op_*.py `--json`), as
`bash bench/gpu_session.sh first` leaves them in $OUT, and kernel profiles (bench.kernels:
profiles/<gpu>.json), and prints per file the device, date, versions and git revision it was
measured with, then its table. The numbers are the files' own, rounded; nothing is recomputed.

Per-op tables: one row per shape and pass, one column per backend (its rate in the file's unit,
"unverified" where it failed its check against the torch reference), then triton's fraction of
the roofline measured in the same run and triton against the fastest verified other backend.
"""
import argparse
import json
import sys
from pathlib import Path

from bench import breakdown


def provenance(result: dict) -> str:
    device = result["device"]["name"]
    sha = (result.get("git_sha") or "unknown")[:10]
    sha += " (uncommitted changes)" if result.get("git_dirty") else ""
    return (f"{device}, {result['date'][:10]}, torch {result['torch']}, triton {result['triton']}, "
            f"CUDA {result.get('cuda')}, git {sha}")


def _md(header: list[str], lines: list[list[str]]) -> str:
    rule = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *lines])


def op_table(result: dict) -> str:
    rows, roofline = result["rows"], result["roofline"]
    unit = roofline["unit"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    several_ops = len({r["op"] for r in rows}) > 1  # the norms' file holds rms_norm and layer_norm
    cases: dict[tuple[str, str, str], dict[str, dict]] = {}
    for r in rows:
        cases.setdefault((r["op"], r["shape"], r["pass"]), {})[r["backend"]] = r
    lines = []
    for (op, shape, pass_), by_backend in cases.items():
        cells = [op] * several_ops + [shape, pass_]
        for b in backends:
            r = by_backend.get(b)
            cells.append("" if r is None else f"{r['value']:,.0f}" + (" unverified" if r["verified"] is False else ""))
        triton = by_backend.get("triton")
        others = [r["value"] for b, r in by_backend.items() if not b.startswith("triton") and r["verified"] is not False]
        cells.append(f"{100 * triton['roofline']:.0f}%" if triton else "")
        cells.append(f"{triton['value'] / max(others):.2f}x" if triton and others else "")
        lines.append(cells)
    header = ["op"] * several_ops + ["shape", "pass", *(f"{b} ({unit})" for b in backends),
                                     f"triton of {roofline['name']}", "triton / fastest other"]
    return (f"{result['title']}; {roofline['name']} measured {roofline['value']:,.0f} {unit}\n\n"
            + _md(header, lines))


def mfu_table(result: dict) -> str:
    lines = []
    for r in result["rows"]:
        if "error" in r:
            lines.append([r["variant"], f"error: {r['error']}", *[""] * 5])
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append([r["variant"], f"{r['tokens_per_s']:,.0f}", f"{r['ms_median']:.1f}", f"{r['tflops']:.0f}", mfu,
                      f"{r['hw_tflops']:.0f}", f"{r['peak_memory_gib']:.1f}"])
    title = (f"bench.mfu {result['preset']}: B={result['batch_size']} x T={result['seq_len']}, {result['dtype']}, "
             f"{result['optimizer']}; median of {result['steps']} steps after {result['warmup']}; MFU against "
             f"{result['peak']['tflops']:g} TFLOPS ({result['convention']})")
    header = ["variant", "tokens/s", "step ms", "TFLOPS", "MFU", "HW TFLOPS", "peak GiB"]
    return title + "\n\n" + _md(header, lines) + breakdown_table(result)


def breakdown_table(result: dict) -> str:
    """The device ms a step by kind of work of the rows that have them (bench.mfu's profiled
    steps), after a blank line; "" when none has."""
    rows = [r for r in result["rows"] if "ms" in r.get("breakdown", {})]
    if not rows:
        return ""
    lines = [[r["variant"], *breakdown.cells(r["breakdown"])] for r in rows]
    return (f"\n\nDevice ms a step by kind of work ({rows[0]['breakdown']['steps']} steps under torch.profiler; "
            f"busy: their sum over the median step)\n\n" + _md(["variant", *breakdown.COLUMNS], lines))


def report(path: Path) -> str:
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:  # a benchmark stopped while it rewrote its file
        return f"{path.name}: not read ({e}): cut short while it was written?\n"
    if "ops" in result:
        table = profile_table(result)
    else:
        table = mfu_table(result) if "preset" in result else op_table(result)
    return f"{path.name}: {provenance(result)}\n\n{table}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="bench.mfu, bench/op_*.py and bench.kernels result files")
    args = parser.parse_args(argv)
    print("\n".join(report(path) for path in args.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
