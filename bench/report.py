"""Markdown tables of a GPU session's result files, for the README: `python -m bench.report FILE...`

Takes the files of bench.mfu (`--json`), of the per-op benchmarks (bench/op_*.py `--json`), as
`bash bench/gpu_session.sh first` leaves them in $OUT, and kernel profiles (bench.kernels:
profiles/<gpu>.json), and prints per file the device, date, versions and git revision it was
measured with, then its table. The numbers are the files' own, rounded; nothing is recomputed.

Per-op tables: one row per shape and pass, one column per backend (its rate in the file's unit,
then the MiB the pass allocated beyond its inputs at its peak where measured, "unverified" where
it failed its check against the torch reference, "host-bound" where the host took at least
bench.measure.HOST_BOUND of the GPU's time to issue the pass: run alone the GPU would wait for its
launches), then triton's fraction of the roofline measured in the same run and triton against
the fastest verified other backend (for op_adamw's optimizer steps: BF16AdamW on triton, rounding
to nearest, against torch's optimizers).
"""
import argparse
import json
import sys
from pathlib import Path

from bench import breakdown, described, markdown_table, shown
from bench.measure import error_cell, host_bound


def provenance_line(result: dict) -> str:
    device = result["device"]["name"]
    sha = (result.get("git_sha") or "unknown")[:10]
    sha += " (uncommitted changes)" if result.get("git_dirty") else ""
    return (f"{device}, {result['date'][:10]}, torch {result['torch']}, triton {result['triton']}, "
            f"CUDA {result.get('cuda')}, git {sha}")


def _mib(row: dict) -> str:
    mib = row.get("peak_mib")
    return "" if mib is None else f", {mib:,.0f} MiB"


# The row of a case that the others are set against: the triton op, or (op_adamw's whole
# optimizer steps) BF16AdamW on it rounding to nearest, as torch's optimizers do.
_COMPARED = ("triton", "BF16AdamW triton")


def _triton_own(backend: str) -> bool:
    """A row that runs the triton op itself: its variants ("triton sr"), and op_adamw's
    optimizer on it ("BF16AdamW triton sr"); not a baseline made of other parts
    ("linear + triton cross_entropy")."""
    return backend.startswith(("triton", "BF16AdamW"))


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
        ran = {b: r for b, r in by_backend.items() if not r.get("error")}
        for b in backends:
            r = by_backend.get(b)
            if r is not None and r.get("error"):
                cells.append(error_cell(r["error"], 60))
                continue
            unverified = r is not None and r["verified"] is False
            marks = _mib(r) + " unverified" * unverified + " host-bound" * host_bound(r["ms"], r.get("host_ms")) \
                if r is not None else ""
            cells.append("" if r is None else f"{r['value']:,.0f}" + marks)
        triton = next((ran[b] for b in _COMPARED if b in ran), None)
        others = [r["value"] for b, r in ran.items() if not _triton_own(b) and r["verified"] is not False]
        cells.append(f"{100 * triton['roofline']:.0f}%" if triton else "")
        cells.append(f"{triton['value'] / max(others):.2f}x" if triton and others and max(others) > 0 else "")
        lines.append(cells)
    header = ["op"] * several_ops + ["shape", "pass", *(f"{b} ({unit})" for b in backends),
                                     f"triton of {roofline['name']}", "triton / fastest other"]
    return (f"{result['title']}; {roofline['name']} measured {roofline['value']:,.0f} {unit}\n\n"
            + markdown_table(header, lines))


def mfu_table(result: dict) -> str:
    lines = []
    for r in result["rows"]:
        if "error" in r:
            lines.append([r["variant"], error_cell(r["error"]), *[""] * 6])
            continue
        mfu = shown(r["mfu"], ".1%")
        host = "" if r.get("host_ms") is None else f"{r['host_ms']:.1f}"
        lines.append([r["variant"], f"{r['tokens_per_s']:,.0f}", f"{r['ms_median']:.1f}", host, f"{r['tflops']:.0f}",
                      mfu, f"{r['hw_tflops']:.0f}", f"{r['peak_memory_gib']:.1f}"])
    peak = result["peak"]["tflops"]
    title = (f"bench.mfu {result['preset']}: B={result['batch_size']} x T={result['seq_len']}, {result['dtype']}, "
             f"{result['optimizer']}; median of {result['steps']} steps after {result['warmup']}; MFU against "
             + (f"{peak:g} TFLOPS" if peak else "no peak (a GPU not in bench/hardware.py)")
             + f" ({result['convention']})")
    if result.get("planned_peak_gib"):
        title += f"; planned peak with the triton ops (bench/plan.py) {result['planned_peak_gib']:.1f} GiB"
    header = ["variant", "tokens/s", "step ms", "host ms", "TFLOPS", "MFU", "HW TFLOPS", "peak GiB"]
    return title + "\n\n" + markdown_table(header, lines) + breakdown_table(result)


def breakdown_table(result: dict) -> str:
    """The device ms a step by kind of work of the rows that have them (bench.mfu's profiled
    steps), after a blank line; "" when none has."""
    rows = [r for r in result["rows"] if "ms" in r.get("breakdown", {})]
    if not rows:
        return ""
    lines = [[r["variant"], *breakdown.cells(r["breakdown"])] for r in rows]
    # Files from before bench.mfu kept every kernel's time hold the kinds as sorted then.
    then = "; kinds as bench/breakdown.py sorted them when measured" if any(
        "kernels" not in r["breakdown"] for r in rows) else ""
    return (f"\n\nDevice ms a step by kind of work ({rows[0]['breakdown']['steps']} steps under torch.profiler; "
            f"busy: their sum over the median step{then})\n\n" + markdown_table(["variant", *breakdown.COLUMNS], lines))


def profile_table(result: dict) -> str:
    """One workload of a kernel profile: per op its training pass's time per backend, triton's rate and fraction
    of the roofline, and the backend train.py --kernels=auto takes from it, eager and compiled."""
    lines = []
    for op, e in result["ops"].items():
        pass_, measured = e["training_pass"], e["backends"]

        def ms(backend: str) -> str:
            r = measured.get(backend)
            if r is None or "error" in r:
                return "" if r is None else "error"
            return (f"{r['ms'][pass_]:.3f}" + ("" if r["verified"] else " unverified")
                    + " host-bound" * host_bound(r["ms"][pass_], r.get("host_ms", {}).get(pass_)))

        triton = measured.get("triton", {})
        rate = f"{triton['rate'][pass_]:,.0f} {e['unit']} ({100 * triton['roofline'][pass_]:.0f}%)" \
            if "rate" in triton else ""
        lines.append([op, e["shape"], pass_, ms("torch"), ms("compile"), ms("triton"), rate,
                      e["chosen"]["eager"] or "none", e["chosen"]["compiled"] or "none"])
    w, r = result["workload"], result["rooflines"]
    title = (f"bench.kernels {w['preset']}: {w['shapes']}; rooflines measured: copy {r['copy_gbs']:,.0f} GB/s, "
             f"{w['dtype']} matmul {r['matmul_tflops']:,.0f} TFLOPS")
    header = ["op", "shape", "pass", "torch ms", "compile ms", "triton ms", "triton rate (of roofline)",
              "chosen eager", "chosen compiled"]
    return title + "\n\n" + markdown_table(header, lines)


def timing(result: dict) -> str:
    """How a per-op or profile file's times were taken, where it predates saying so."""
    if result.get("timing"):
        return ""
    return ("\n\nTimed by triton.testing.do_bench: a pass marked host-bound was timed at the host's pace, its rate a "
            "lower bound of its kernels'.")


def report(path: Path) -> str:
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:  # a benchmark stopped while it rewrote its file
        return f"{path.name}: not read ({e}): cut short while it was written?\n"
    except UnicodeDecodeError:
        return f"{path.name}: not read: not a text file, no benchmark's result\n"
    try:
        if "workloads" in result:  # a kernel profile: a table per workload measured
            return "\n".join(f"{path.name}: {provenance_line(w)}\n\n{profile_table(w)}{timing(w)}\n"
                             for w in result["workloads"])
        table = mfu_table(result) if "preset" in result else op_table(result) + timing(result)
        return f"{path.name}: {provenance_line(result)}\n\n{table}\n"
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # one odd file must not cost the others' tables
        return f"{path.name}: not reported ({type(e).__name__}: {e})\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=described(__doc__))
    parser.add_argument("files", nargs="+", type=Path, help="bench.mfu, bench/op_*.py and bench.kernels result files")
    args = parser.parse_args(argv)
    if missing := [str(path) for path in args.files if not path.is_file()]:
        parser.error(f"no such file: {', '.join(missing)}")
    print("\n".join(report(path) for path in args.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
