"""Loss curves of the shakespeare-char baby GPT under four AdamW variants, with the seed's settings.

    python -m bench.adamw_curves run --out DIR [--scale gpu|cpu] [--max-iters N]
                                     [--variants adamw,bf16_sr,...] [--eval-iters N]
                                     [--set key=value ...] [--jobs N]
    python -m bench.adamw_curves plot --out DIR [--png PATH] [--md PATH]
    python -m bench.adamw_curves tidy --out DIR

Variants, all with dtype=bfloat16:
    adamw         torch.optim.AdamW over fp32 master weights, bf16 autocast (optimizer=adamw)
    bf16_nearest  BF16AdamW: bf16 weights and moments, bf16 stores rounded to nearest
                  (optimizer=bf16_adamw stochastic_rounding=False kahan_summation=False)
    bf16_sr       BF16AdamW with stochastic rounding of the bf16 stores
                  (optimizer=bf16_adamw stochastic_rounding=True kahan_summation=False)
    bf16_kahan    BF16AdamW with Kahan-compensated params, the moments rounded stochastically
                  (optimizer=bf16_adamw stochastic_rounding=True kahan_summation=True): the
                  alternative to (c) for the params, at 2 more bytes per parameter

The seed's optimizer settings (SEED below): lr 3e-4, weight decay 0.01, beta2 0.999, warm-up 100
steps then a constant lr, dropout 0.2, no gradient clipping. train.py's decay_lr=False skips the
warm-up too (nanoGPT's semantics: lr = learning_rate from step 0), so "no decay, warm-up 100" is
written as decay_lr=True with min_lr = learning_rate: linear warm-up, then a "cosine" from lr to lr.

Scales:
    gpu  config/train_shakespeare_char.py as it is (6 layers, 6 heads, 384 wide, block 256,
         batch 64, compile=True, kernels=auto): 5000 steps, eval every 250 over 200 batches.
    cpu  config/train_shakespeare_char_cpu.py (4 layers, 128 wide, block 64, batch 12, no
         compile) with kernels=torch: the Triton interpreter is for tests, not speed. 5000 steps
         (--max-iters to shorten), eval every 250 over 50 batches: 38,400 predicted characters,
         about a third of the 111,540-character val split, the same windows at every evaluation
         and in every variant (gpt.data.Batches.eval_batches), so the variants are compared on
         one sample (nanoGPT's CPU recipe takes 20 batches).

Each variant runs train.py in a subprocess (`sys.executable train.py ...`): a fresh process per
run, so no seed, compiled graph, Dynamo cache or backend flag carries from one run to the next.
--jobs N runs N of them at once on the same device: the baby GPT leaves most of a large GPU idle,
and sharing it changes no run's inputs (each run is its own seeded process): only ms/step and the
wall time, which the table marks, are then shared-device figures. (On a GPU two runs of one
variant agree statistically, not bit for bit: some of torch's kernels sum in no fixed order.)
Its out_dir is DIR/<variant>, where train.py writes log.jsonl; this script writes the run's start
record {"event": "start", ...} (device, versions, the train.py arguments) to start.json beside it
as the run starts (a fresh train.py run starts its log afresh), appends {"event": "end", "wall_s", "returncode"}
to the log when it ends, and deletes the checkpoints train.py saved (only the logs are kept).
`tidy` leaves each run folder its log alone, the start record folded in (what a GPU session
brings back: a run cut off by the session's time limit left its checkpoints and console output).
`plot` reads those logs alone: the PNG of val loss (solid) and train loss (light) per variant
against the step, and a markdown table (written without matplotlib too).
"""
import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import described, listed, markdown_table, positive, shown
from gpt.files import log_record

ROOT = Path(__file__).resolve().parents[1]
TAIL_LINES = 15  # of a concurrent run's output, printed when it ends

VARIANTS = {
    "adamw": ("(a) torch AdamW, fp32 master weights", ["--optimizer=adamw"]),
    "bf16_nearest": ("(b) bf16 AdamW, round to nearest",
                     ["--optimizer=bf16_adamw", "--stochastic_rounding=False", "--kahan_summation=False"]),
    "bf16_sr": ("(c) bf16 AdamW, stochastic rounding",
                ["--optimizer=bf16_adamw", "--stochastic_rounding=True", "--kahan_summation=False"]),
    "bf16_kahan": ("(d) bf16 AdamW, Kahan-compensated params",
                   ["--optimizer=bf16_adamw", "--stochastic_rounding=True", "--kahan_summation=True"]),
}
SEED = dict(learning_rate=3e-4, weight_decay=0.01, beta2=0.999, warmup_iters=100, decay_lr=True, min_lr=3e-4,
            dropout=0.2, grad_clip=0.0, dtype="bfloat16")
SCALES = {
    "gpu": dict(config="config/train_shakespeare_char.py",
                settings=dict(max_iters=5000, eval_interval=250, eval_iters=200, log_interval=10,
                              always_save_checkpoint=False)),
    "cpu": dict(config="config/train_shakespeare_char_cpu.py",
                settings=dict(max_iters=5000, eval_interval=250, eval_iters=50, log_interval=25,
                              always_save_checkpoint=False, kernels="torch", compile=False, device="cpu")),
}


def train_args(scale: str, variant: str, out_dir: Path, max_iters: int | None = None,
               eval_iters: int | None = None, extra: list[str] = ()) -> list[str]:
    """train.py's arguments for one run: the scale's config file, the seed's settings, the
    scale's settings, the variant's optimizer, then `extra` (--key=value, last so they win)."""
    settings = dict(SEED, **SCALES[scale]["settings"])
    if max_iters is not None:
        settings["max_iters"] = max_iters
    if eval_iters is not None:
        settings["eval_iters"] = eval_iters
    # Constant lr after warm-up: min_lr = learning_rate, so the length of the "decay" is immaterial
    settings["lr_decay_iters"] = settings["max_iters"]
    args = [SCALES[scale]["config"], *(f"--{k}={v}" for k, v in settings.items()), *VARIANTS[variant][1],
            f"--out_dir={out_dir}"]
    return [*args, *extra]


def device_name(scale: str) -> str:
    if scale == "gpu":
        from bench.hardware import detect

        device = detect()
        if device is not None:
            return device.name
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu} ({len(os.sched_getaffinity(0))} cores)"


START = "start.json"  # beside each run's log.jsonl: its start record


def append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@dataclass
class _Run:
    variant: str
    log: Path
    proc: subprocess.Popen
    start: float
    output: Path | None  # where a concurrent run's console output goes, else None (the console)


def _launch(run_dir: Path, variant: str, args: list[str], header: dict) -> _Run:
    """Start train.py with `args` in its own process; its start record (START) is `header` (scale,
    device, jobs, versions) with the variant and the arguments."""
    log = run_dir / "log.jsonl"
    if "--init_from=resume" not in args:  # a resumed run continues its log (train.py appends)
        log.unlink(missing_ok=True)  # a rerun that fails before train.py writes its log leaves no old one
    start = dict(event="start", variant=variant, label=VARIANTS[variant][0], train_args=args, **header)
    (run_dir / START).write_text(json.dumps(start) + "\n")
    jobs = header["jobs"]
    print(f"== {variant}: {VARIANTS[variant][0]}\n   python train.py {' '.join(args)}", flush=True)
    output = run_dir / "train.out" if jobs > 1 else None
    env = dict(os.environ)
    # The runs share the cores rather than oversubscribe them: CPU threads, and Inductor's compile
    # workers (by default one per core in each run).
    for name in ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
        if jobs > 1 and name not in env:
            env[name] = str(max(1, len(os.sched_getaffinity(0)) // jobs))
    with open(output, "w") if output else contextlib.nullcontext() as sink:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT if sink else None)
    return _Run(variant, log, proc, time.perf_counter(), output)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _print_tail(variant: str, output: Path) -> None:
    """The last lines of a concurrent run's console output, then the file deleted."""
    lines = output.read_text(errors="replace").splitlines()
    output.unlink()
    print(f"== {variant}: the last lines of its output\n" + "\n".join(lines[-TAIL_LINES:]), flush=True)


def _finish(r: _Run) -> int:
    """Close a finished run: its end record, its checkpoints deleted (only the log is kept), the
    tail of a concurrent run's output, a summary line. Its exit status."""
    wall = time.perf_counter() - r.start
    append(r.log, dict(event="end", variant=r.variant, wall_s=round(wall, 1), returncode=r.proc.returncode))
    for ckpt in ("ckpt.pt", "ckpt.dcp"):
        _remove(r.log.parent / ckpt)
    if r.output:
        _print_tail(r.variant, r.output)
    evals = [x for x in read_log(r.log) if "val_loss" in x]
    last = f"val loss {evals[-1]['val_loss']:.4f} at step {evals[-1]['iter']}" if evals else "no evaluation"
    print(f"== {r.variant}: {last}, {wall:.0f} s, exit status {r.proc.returncode}", flush=True)
    return r.proc.returncode


def run(out: Path, scale: str, variants: list[str], max_iters: int | None, eval_iters: int | None,
        extra: list[str], jobs: int = 1) -> int:
    """Train `variants`, `jobs` of them at a time (each its own train.py process; with more than
    one, their console output goes to a file and its tail is printed when the run ends)."""
    import torch

    from bench.measure import provenance

    if scale == "gpu" and not torch.cuda.is_available():
        raise SystemExit("bench.adamw_curves: --scale gpu needs a CUDA GPU (use --scale cpu on a CPU)")
    out.mkdir(parents=True, exist_ok=True)
    jobs = min(jobs, len(variants))
    header = dict(scale=scale, device=device_name(scale), jobs=jobs, **provenance())
    queue, running, failed = list(variants), [], []
    while queue or running:
        while queue and len(running) < jobs:
            variant = queue.pop(0)
            run_dir = out / variant
            run_dir.mkdir(parents=True, exist_ok=True)
            args = train_args(scale, variant, run_dir.resolve(), max_iters, eval_iters, extra)
            running.append(_launch(run_dir, variant, args, header))
        done = [r for r in running if r.proc.poll() is not None]
        if not done:
            time.sleep(0.2)
        for r in done:
            running.remove(r)
            if _finish(r):
                failed.append(r.variant)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _run_dirs(out: Path) -> set[Path]:
    """The run folders under `out`: those with a log or a start record (a run cut short before
    train.py wrote its log has only the latter)."""
    return {p.parent for name in ("log.jsonl", START) for p in out.glob(f"*/{name}")}


def tidy(out: Path) -> int:
    """Each run folder under `out` (one with a log or a start record) down to its log.jsonl, the
    start record folded in at its head: a cut-off run's console output shown (its tail) and
    deleted, its checkpoints and half-written files deleted."""
    for d in sorted(_run_dirs(out)):
        if (d / "train.out").exists():
            _print_tail(d.name, d / "train.out")
        parts = [d / START, d / "log.jsonl"]
        text = "".join(p.read_text() for p in parts if p.exists())
        for path in d.iterdir():
            _remove(path)
        (d / "log.jsonl").write_text(text)
        print(f"== {d.name}: its log alone kept, {sum(1 for line in text.splitlines() if line.strip())} records")
    return 0


# --- reading the logs -------------------------------------------------------------------------

def read_log(path: Path) -> list[dict]:
    """The records of a run's log.jsonl, after its start record (START, where there is one). A line
    torn by a killed write (a run the GPU session's limit cut) is left out, as train.py's resume
    leaves it out."""
    paths = [p for p in (path.parent / START, path) if p.exists()]
    return [record for p in paths for record in map(log_record, p.read_text().splitlines()) if record is not None]


def summarize(records: list[dict]) -> dict:
    """One run's numbers, all read from its log: the start/end records this script wrote, train.py's
    evaluation records (val_loss) and step records (step_ms)."""
    start = next((r for r in records if r.get("event") == "start"), {})
    end = next((r for r in records if r.get("event") == "end"), {})
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "step_ms" in r]  # train.py does not time a run's first step
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    # The steps planned: the last --max_iters of its train.py arguments wins, as in train.py.
    planned = [a.split("=", 1)[1] for a in start.get("train_args", []) if a.startswith("--max_iters=")]
    return dict(variant=start.get("variant"), label=start.get("label"), scale=start.get("scale"),
                device=start.get("device"), evals=evals, steps=steps,
                provenance={k: start.get(k) for k in ("date", "git_sha", "git_dirty", "torch", "triton", "cuda")},
                planned_iters=int(planned[-1]) if planned else None,
                iters=evals[-1]["iter"] if evals else None,
                final_val=evals[-1]["val_loss"] if evals else None,
                final_train=evals[-1]["train_loss"] if evals else None,
                best_val=best["val_loss"] if best else None, best_iter=best["iter"] if best else None,
                jobs=start.get("jobs", 1),
                step_ms=statistics.median(r["step_ms"] for r in steps) if steps else None,
                wall_s=end.get("wall_s"), returncode=end.get("returncode"))


def load(out: Path) -> list[dict]:
    """The runs under `out` (out/<variant>/, with a log.jsonl or a start record: a run cut short
    before train.py wrote its log has only the latter), in VARIANTS order, then any others."""
    dirs = sorted(_run_dirs(out),
                  key=lambda d: (list(VARIANTS).index(d.name) if d.name in VARIANTS else len(VARIANTS), d.name))
    runs = []
    for d in dirs:
        summary = summarize(read_log(d / "log.jsonl"))
        summary["variant"] = summary["variant"] or d.name
        summary["label"] = summary["label"] or VARIANTS.get(d.name, (d.name,))[0]
        runs.append(summary)
    return runs


def status(r: dict) -> str:
    """What keeps a run's last evaluation from being its planned end, or "" (none)."""
    if r["returncode"] is None:
        return " (cut short: no end record)"
    if r["returncode"]:
        return f" (exit status {r['returncode']})"
    if r["planned_iters"] is not None and r["iters"] != r["planned_iters"]:
        return f" (evaluated to step {shown(r['iters'], 'd')} of {r['planned_iters']})"
    return ""


def table(runs: list[dict]) -> str:
    header = ["variant", "steps", "final val loss", "best val loss (step)", "final train loss", "ms/step", "wall (s)",
              "device"]
    rows = [[f"{r['label']}{status(r)}", shown(r["iters"], "d"), shown(r["final_val"], ".4f"),
             "n/a" if r["best_val"] is None else f"{r['best_val']:.4f} ({r['best_iter']})",
             shown(r["final_train"], ".4f"), shown(r["step_ms"], ".1f"), shown(r["wall_s"], ".0f"),
             r["device"] or "n/a"]
            for r in runs]
    return markdown_table(header, rows, align="lrrrrrrl") + "\n"


def measured(runs: list[dict]) -> str:
    """When and with what the runs were made, from their start records."""
    def values(key: str, width: int | None = None) -> str:
        found = sorted({str(r["provenance"][key])[:width] for r in runs if r["provenance"].get(key) is not None})
        return "/".join(found) or "n/a"

    dirty = " (uncommitted changes)" if any(r["provenance"].get("git_dirty") for r in runs) else ""
    return (f"measured {values('date', 10)}, git {values('git_sha', 10)}{dirty}, torch {values('torch')}, "
            f"triton {values('triton')}, CUDA {values('cuda')}")


def caption(runs: list[dict]) -> str:
    scales = sorted({r["scale"] for r in runs if r["scale"]})
    return (f"shakespeare-char, scale {'/'.join(scales) or 'n/a'}: lr {SEED['learning_rate']:g} constant after "
            f"{SEED['warmup_iters']} warm-up steps, weight decay {SEED['weight_decay']:g}, beta2 {SEED['beta2']:g}, "
            f"dropout {SEED['dropout']:g}, no clipping, dtype bfloat16. Losses are train.py's evaluations; "
            f"ms/step is the median of the logged step times (evaluation excluded, first step excluded); "
            f"wall is the whole train.py process (start-up, compilation and evaluations included)"
            + (f"; {max(r['jobs'] for r in runs)} runs shared the device at a time, so ms/step and wall are "
               f"not single-run figures" if any(r["jobs"] > 1 for r in runs) else "") + f"; {measured(runs)}.\n")


def plot(out: Path, png: Path, md: Path | None) -> int:
    """The table (printed, and written to `md`), then the PNG, which needs matplotlib."""
    every = load(out)
    if not every:
        raise SystemExit(f"bench.adamw_curves plot: no runs in {out} (no */log.jsonl)")
    text = caption(every) + "\n" + table(every)  # every run, failed ones too
    if md:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text)
    print(text)
    runs = [r for r in every if r["evals"]]  # the curves
    if not runs:
        raise SystemExit(f"bench.adamw_curves plot: no evaluations in {out}/*/log.jsonl to draw")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("bench.adamw_curves plot: the PNG needs matplotlib: pip install matplotlib "
                         "(or pip install -e '.[plot]')") from None
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    # Curves that coincide stay visible: each later one drawn thinner, with its own marker, on top.
    for r in runs:
        # Each variant its own colour and marker wherever it is drawn, whichever others are there.
        i = list(VARIANTS).index(r["variant"]) if r["variant"] in VARIANTS else len(VARIANTS)
        color, width = f"C{i}", max(3.5 - 1.2 * i, 1.0)
        iters = [e["iter"] for e in r["evals"]]
        ax.plot(iters, [e["train_loss"] for e in r["evals"]], color=color, alpha=0.35, linewidth=width / 2,
                linestyle="--")
        ax.plot(iters, [e["val_loss"] for e in r["evals"]], color=color, linewidth=width, marker="os^Dv"[i % 5],
                markersize=2 + width, markerfacecolor="none",
                label=f"{r['label']}: val {r['final_val']:.4f} at step {r['iters']}{status(r)}")
    # Show the part where the variants differ: from the lowest loss up to the highest after step 0.
    later = [e[k] for r in runs for e in r["evals"] if e["iter"] > 0 for k in ("val_loss", "train_loss")]
    if later:
        low, high = min(later), max(later)
        pad = 0.05 * max(high - low, 0.1)
        ax.set_ylim(low - pad, high + pad)
    devices = sorted({r["device"] for r in runs if r["device"]})
    scales = sorted({r["scale"] for r in runs if r["scale"]})
    ax.set_title(f"shakespeare-char, {'/'.join(scales) or '?'} scale, {'; '.join(devices) or 'unknown device'}\n"
                 f"{measured(runs)}\nval loss (solid), train loss (dashed, light)", fontsize=9)
    first = [e[k] for r in runs for e in r["evals"] if e["iter"] == 0 for k in ("val_loss", "train_loss")]
    above = later and first and max(first) > ax.get_ylim()[1]
    ax.set_xlabel("step" + (f" (step 0, loss {min(first):.2f} to {max(first):.2f}, is above the plot)" if above else ""))
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    print(f"wrote {png}" + (f" and {md}" if md else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.adamw_curves", description=described(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train the variants, one train.py process each")
    p.add_argument("--out", type=Path, required=True, help="one out_dir per variant under it")
    p.add_argument("--scale", choices=SCALES, default="gpu")
    p.add_argument("--max-iters", type=positive(int), help="override the scale's 5000 steps")
    p.add_argument("--eval-iters", type=positive(int), help="override the scale's evaluation batches")
    p.add_argument("--variants", type=listed, default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (to split the runs between calls)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any further train.py setting, applied last (repeatable)")
    p.add_argument("--jobs", type=positive(int), default=1,
                   help="variants trained at once, sharing the device (the losses do not depend on it; "
                        "ms/step and wall time do)")
    q = sub.add_parser("plot", help="the PNG and the markdown table from the logs under --out")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--png", type=Path, help="default: OUT/adamw_curves.png")
    q.add_argument("--md", type=Path, help="also write the table (with its caption) here")
    t = sub.add_parser("tidy", help="each run folder under --out down to its log (start record folded in)")
    t.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "run":
        variants = args.variants
        if unknown := [v for v in variants if v not in VARIANTS]:
            parser.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
        extra = [f"--{kv.removeprefix('--')}" for kv in args.set]
        if args.out.exists() and not args.out.is_dir():
            parser.error(f"--out {args.out} is a file: name a folder for the runs")
        import train  # the repository's own: its settings refused now, not by each run in turn

        for variant in variants:
            config, *settings = train_args(args.scale, variant, args.out / variant, args.max_iters, args.eval_iters,
                                           extra)
            try:  # (the runs start in ROOT: the config file's path is the root's)
                train.parse_config([str(ROOT / config), *settings])
            except (ValueError, OSError) as e:
                parser.error(f"{variant}: train.py {e}")
        return run(args.out, args.scale, variants, args.max_iters, args.eval_iters, extra, args.jobs)
    if not args.out.is_dir():  # (a run that failed before it made one: nothing to do, and said)
        raise SystemExit(f"bench.adamw_curves {args.command}: --out {args.out}: no such folder of runs")
    if args.command == "tidy":
        return tidy(args.out)
    return plot(args.out, args.png or args.out / "adamw_curves.png", args.md)


if __name__ == "__main__":
    sys.exit(main())
