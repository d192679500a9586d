"""bench.adamw_curves on CPU at a few steps: the four variants train through train.py (one
subprocess each, two at a time), their logs hold what `plot` reads, and `plot` writes the PNG and
the table."""
import importlib.util
import json
import sys

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


def test_train_args_constant_lr_after_warmup(monkeypatch):
    import train

    monkeypatch.chdir(adamw_curves.ROOT)  # the runs start there: their config paths are the repo's
    args = adamw_curves.train_args("gpu", "bf16_sr", "out-x")
    c, _ = train.read_config(args)
    assert (c["n_layer"], c["n_embd"], c["block_size"], c["batch_size"]) == (6, 384, 256, 64)
    assert (c["max_iters"], c["eval_interval"], c["eval_iters"]) == (5000, 250, 200)
    assert c["optimizer"] == "bf16_adamw" and c["stochastic_rounding"] is True and c["dropout"] == 0.2
    assert [train.lr_at(it, c) for it in (100, 2500, 4999, 5000)] == [3e-4] * 4
    assert train.lr_at(0, c) == pytest.approx(3e-4 / 101)


def test_a_variant_named_twice_is_trained_once(monkeypatch, tmp_path):
    """(Two runs of it at once would share one folder.)"""
    started = []
    monkeypatch.setattr(adamw_curves, "run", lambda out, scale, variants, *rest: started.append(variants) or 0)
    args = ["run", "--out", str(tmp_path), "--scale", "cpu", "--variants", "adamw,bf16_sr,adamw,"]
    assert adamw_curves.main(args) == 0
    assert started == [["adamw", "bf16_sr"]]


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


def _write_run(d, records, start=None):
    d.mkdir(parents=True)
    if start is not None:
        (d / adamw_curves.START).write_text(json.dumps(start) + "\n")
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


START = dict(event="start", variant="adamw", label="(a) x", scale="gpu", device="NVIDIA H100 80GB HBM3", jobs=4,
             train_args=["config/train_shakespeare_char.py", "--max_iters=5000", "--out_dir=x", "--max_iters=300"],
             date="2026-12-05T10:00:00+00:00", git_sha="0123456789abcdef", git_dirty=False, torch="2.11.0+cu130",
             triton="3.6.0", cuda="13.0")


def test_tidy_leaves_each_run_its_log_alone(tmp_path, capsys):
    """What a GPU session brings back of a run its time limit cut: the log, with the start record
    folded in at its head; its checkpoints, a half-written one and its console output deleted
    (the output's tail shown first). Tidying twice changes nothing."""
    evaluation = dict(iter=0, train_loss=4.2, val_loss=4.3, lr=1e-4)
    _write_run(tmp_path / "adamw", [evaluation], start=START)
    d = tmp_path / "adamw"
    (d / "ckpt.pt").write_bytes(b"x")
    (d / ".ckpt.pt.123.abc.tmp").write_bytes(b"x")
    (d / "ckpt.dcp").mkdir()
    (d / "ckpt.dcp" / "shard").write_bytes(b"x")
    (d / "train.out").write_text("step 10: loss 3.1\nKilled\n")
    before = adamw_curves.load(tmp_path)
    assert adamw_curves.main(["tidy", "--out", str(tmp_path)]) == 0
    assert "Killed" in capsys.readouterr().out
    assert sorted(p.name for p in d.iterdir()) == ["log.jsonl"]
    assert adamw_curves.read_log(d / "log.jsonl") == [START, evaluation]
    assert adamw_curves.load(tmp_path) == before
    adamw_curves.tidy(tmp_path)
    assert adamw_curves.read_log(d / "log.jsonl") == [START, evaluation]


def test_a_run_that_ended_before_its_planned_steps_says_so(tmp_path):
    """The last --max_iters of the run's arguments is its plan (300 here): a run whose last
    evaluation is short of it is marked in the table and the legend, and the caption says when
    and with what the runs were made."""
    evals = [dict(iter=i, train_loss=4.0, val_loss=4.1, lr=1e-4) for i in (0, 250)]
    _write_run(tmp_path / "adamw", [*evals, dict(event="end", wall_s=9.0, returncode=0)], start=START)
    runs = adamw_curves.load(tmp_path)
    assert runs[0]["planned_iters"] == 300
    assert adamw_curves.status(runs[0]) == " (evaluated to step 250 of 300)"
    assert "| (a) x (evaluated to step 250 of 300) | 250 |" in adamw_curves.table(runs)
    assert ("measured 2026-12-05, git 0123456789, torch 2.11.0+cu130, triton 3.6.0, CUDA 13.0"
            in adamw_curves.caption(runs))
    evals.append(dict(iter=300, train_loss=4.0, val_loss=4.0, lr=1e-4))
    _write_run(tmp_path / "bf16_sr", [*evals, dict(event="end", wall_s=9.0, returncode=0)],
               start=dict(START, variant="bf16_sr"))
    assert adamw_curves.status(adamw_curves.load(tmp_path)[1]) == ""


def test_a_line_torn_by_a_killed_write_is_left_out(tmp_path):
    evaluation = dict(iter=0, train_loss=4.2, val_loss=4.3, lr=1e-4)
    _write_run(tmp_path / "adamw", [evaluation], start=START)
    with open(tmp_path / "adamw" / "log.jsonl", "a") as f:
        f.write('\n{"iter": 10, "train_lo')  # a blank line, then the write the kill cut (a JSONDecodeError once)
    assert adamw_curves.read_log(tmp_path / "adamw" / "log.jsonl") == [START, evaluation]


def test_plot_writes_the_table_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    _write_run(tmp_path / "adamw", [dict(iter=0, train_loss=4.2, val_loss=4.3, lr=1e-4)], start=START)
    md = tmp_path / "t.md"
    with pytest.raises(SystemExit, match="the PNG needs matplotlib"):
        adamw_curves.main(["plot", "--out", str(tmp_path), "--md", str(md)])
    assert "| (a) x (cut short: no end record) | 0 | 4.3000 |" in md.read_text()


def test_a_resumed_run_keeps_its_log(tmp_path, monkeypatch):
    """--set init_from=resume continues a run: train.py appends to its log, which the launch
    must not delete first (a fresh run's it does: a failed start leaves no old log behind)."""
    monkeypatch.setattr(adamw_curves.subprocess, "Popen", lambda *a, **k: None)
    header = dict(scale="cpu", device="CPU", jobs=1)
    for resume, kept in [(False, False), (True, True)]:
        (tmp_path / "log.jsonl").write_text('{"iter": 0, "val_loss": 4.3}\n')
        args = adamw_curves.train_args("cpu", "adamw", tmp_path, extra=["--init_from=resume"] if resume else [])
        adamw_curves._launch(tmp_path, "adamw", args, header)
        assert (tmp_path / "log.jsonl").exists() == kept
