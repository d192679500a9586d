"""bench.adamw_curves on CPU at a few steps: the four variants train through train.py (one
subprocess each, two at a time), their logs hold what `plot` reads, and `plot` writes the PNG and
the table."""
import importlib.util
import json

import pytest

from bench import adamw_curves

# A tiny evaluation: every 2 steps over 2 batches, every step logged.
TINY = ["--max-iters", "4", "--eval-iters", "2", "--set", "eval_interval=2", "--set", "log_interval=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("curves")
    data = tmp_path_factory.mktemp("data")
    assert adamw_curves.main(["run", "--out", str(out), "--scale", "cpu", *TINY, "--set", f"data_dir={data}",
                              "--jobs", "2"]) == 0
    return out


def test_run_writes_one_log_per_variant_and_no_checkpoint(runs):
    assert sorted(p.name for p in runs.iterdir()) == sorted(adamw_curves.VARIANTS)
    for variant, (label, optimizer_args) in adamw_curves.VARIANTS.items():
        assert sorted(p.name for p in (runs / variant).iterdir()) == ["log.jsonl", adamw_curves.START]
        records = adamw_curves.read_log(runs / variant / "log.jsonl")
        start, end = records[0], records[-1]
        assert start["event"] == "start" and start["variant"] == variant and start["scale"] == "cpu"
        assert start["jobs"] == 2  # and each run's console output, in a file meanwhile, is gone
        assert start["device"].startswith("CPU")
        args = start["train_args"]
        assert args[0] == "config/train_shakespeare_char_cpu.py"
        for setting in ("--learning_rate=0.0003", "--weight_decay=0.01", "--beta2=0.999", "--grad_clip=0.0",
                        "--dropout=0.2", "--dtype=bfloat16", "--kernels=torch", *optimizer_args):
            assert setting in args
        assert end["event"] == "end" and end["returncode"] == 0 and end["wall_s"] > 0
        assert [r["iter"] for r in records if "val_loss" in r] == [0, 2, 4]
        steps = [r for r in records if "loss" in r]
        assert [r["iter"] for r in steps] == [0, 1, 2, 3]
        assert [r["iter"] for r in steps if "step_ms" in r] == [1, 2, 3]  # the first step is not timed
        # warm-up from lr/101, linear: the seed's 100 warm-up steps
        assert steps[0]["lr"] == pytest.approx(3e-4 / 101) and steps[3]["lr"] == pytest.approx(3e-4 * 4 / 101)


def test_train_args_constant_lr_after_warmup():
    import train

    args = adamw_curves.train_args("gpu", "bf16_sr", "out-x")
    c, _ = train.read_config(args)
    assert (c["n_layer"], c["n_embd"], c["block_size"], c["batch_size"]) == (6, 384, 256, 64)
    assert (c["max_iters"], c["eval_interval"], c["eval_iters"]) == (5000, 250, 200)
    assert c["optimizer"] == "bf16_adamw" and c["stochastic_rounding"] is True and c["dropout"] == 0.2
    assert [train.lr_at(it, c) for it in (100, 2500, 4999, 5000)] == [3e-4] * 4
    assert train.lr_at(0, c) == pytest.approx(3e-4 / 101)


def test_plot_writes_the_png_and_the_table(runs, tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install -e '.[plot]')")
    png, md = tmp_path / "curves.png", tmp_path / "curves.md"
    assert adamw_curves.main(["plot", "--out", str(runs), "--png", str(png), "--md", str(md)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 runs shared the device at a time" in md.read_text()
    rows = [line for line in md.read_text().splitlines() if line.startswith("| (")]
    assert [row.split(" | ")[0][2:] for row in rows] == [label for label, _ in adamw_curves.VARIANTS.values()]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == "4" and all(float(x) > 0 for x in (cells[2], cells[4], cells[5], cells[6]))
        assert cells[3].endswith(")") and cells[7].startswith("CPU")


def test_runs_cut_short_are_listed(tmp_path):
    """A run killed before train.py wrote its log (only its start record), one that failed
    before its first evaluation, and one cut off with the script (no end record) are all in the
    table, marked, not dropped."""
    def write(variant, *records, start=True):
        d = tmp_path / variant
        d.mkdir()
        if start:
            (d / adamw_curves.START).write_text(json.dumps(dict(event="start", variant=variant, label=variant)))
        if records:
            (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    evaluation = dict(iter=0, train_loss=4.2, val_loss=4.3, lr=1e-4)
    write("adamw")
    write("bf16_nearest", dict(event="end", variant="bf16_nearest", wall_s=3.0, returncode=-9))
    write("bf16_sr", evaluation)
    runs = adamw_curves.load(tmp_path)
    assert [r["variant"] for r in runs] == ["adamw", "bf16_nearest", "bf16_sr"]
    rows = adamw_curves.table(runs).splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| adamw (cut short: no end record)",
                                                     "| bf16_nearest (exit status -9)",
                                                     "| bf16_sr (cut short: no end record)"]
    assert runs[2]["final_val"] == 4.3
