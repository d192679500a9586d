"""bench.sweep on CPU: its path through bench.backends (timed by the no_gpu stand-in, in Triton's
interpreter) at a tiny shape, and its sweeps' constants as the kernel modules have them."""
import json
import math
import types

import pytest
import torch

from bench import sweep
from bench.cases import Shapes
from gpt.model import GPTConfig
from kernels import norm
from tests.devices import H100, interpreter_only
from tests.test_bench_smoke import no_gpu  # noqa: F401  (its fixture, autouse: timings without a GPU)


@pytest.mark.parametrize("name", list(sweep.SWEEPS))
def test_each_sweep_starts_from_the_committed_constants(name):
    s = sweep.SWEEPS[name]
    first, *rest = sweep.settings(s)
    assert first == {c: getattr(s.module, c) for c in s.values}
    for c, values in s.values.items():
        assert getattr(s.module, c) in values, f"{name}: the committed {c} is not among the values tried"
    assert len(rest) + 1 == len({tuple(x.values()) for x in [first, *rest]})
    changed = [sum(x[c] != first[c] for c in first) for x in rest]
    assert changed == sorted(changed) and changed[0] == 1  # one constant at a time first


@interpreter_only
def test_sweep_measures_each_setting_restores_the_constants_and_picks(monkeypatch, tmp_path, capsys):
    tiny = sweep.Sweep(norm, {"_TILE": (4096, 512)}, "rms_norm",
                               (Shapes(GPTConfig(n_embd=771, n_head=1), batch_size=1, seq_len=5),))
    seen = []
    launch = norm._tile

    def spy(n, tile):  # the tile the launch code derives from the constants in force
        seen.append(norm._TILE)
        return launch(n, tile)

    monkeypatch.setattr(norm, "_tile", spy)
    path = tmp_path / "sweep.json"
    result = sweep.run(["tiny"], "cpu", path, sweeps={"tiny": tiny})
    assert norm._TILE == 4096 and set(seen) == {4096, 512}
    records = result["sweeps"]["tiny"]["records"]
    assert [r["setting"] for r in records] == [{"_TILE": 4096}, {"_TILE": 512}]
    for r in records:
        (m,) = r["shapes"].values()
        assert m["verified"] and m["ms"] > 0 and m["unit"] == "GB/s"
    assert result["sweeps"]["tiny"]["pick"] in ({"_TILE": 4096}, {"_TILE": 512})
    assert json.loads(path.read_text())["sweeps"]["tiny"]["records"] == records
    out = capsys.readouterr().out
    assert "pick for kernels.norm: _TILE = " in out and "committed" in out


@interpreter_only
def test_a_norm_sweep_with_the_residual_times_the_fused_op():
    fused = sweep.Sweep(norm, {"_BWD_STAGES": (1, 2)}, "layer_norm",
                        (Shapes(GPTConfig(n_embd=64, n_head=1), batch_size=1, seq_len=3),), residual=True)
    result = sweep.run(["fused"], "cpu", None, sweeps={"fused": fused})
    assert norm._BWD_STAGES == 1
    for r in result["sweeps"]["fused"]["records"]:
        ((shape, m),) = r["shapes"].items()
        assert shape == "3x64 +bias +residual" and m["verified"]


@interpreter_only
def test_the_cross_entropy_sweep_times_the_loss_at_each_setting():
    ce = sweep.Sweep(sweep.SWEEPS["cross_entropy"].module, {"_TILE": (4096, 64)}, "cross_entropy",
                     (Shapes(GPTConfig(vocab_size=100), batch_size=1, seq_len=5),))
    result = sweep.run(["ce"], "cpu", None, sweeps={"ce": ce})
    assert [r["setting"] for r in result["sweeps"]["ce"]["records"]] == [{"_TILE": 4096}, {"_TILE": 64}]
    assert all(m["verified"] for r in result["sweeps"]["ce"]["records"] for m in r["shapes"].values())


@interpreter_only
def test_a_setting_that_cannot_run_is_reported_and_never_picked(tmp_path, capsys):
    broken = sweep.Sweep(norm, {"_ELEMS_PER_THREAD": (16, 0)}, "rms_norm",  # 0: no warps to launch
                         (Shapes(GPTConfig(n_embd=64, n_head=1), batch_size=1, seq_len=3),))
    result = sweep.run(["broken"], "cpu", None, sweeps={"broken": broken})
    ok, failed = result["sweeps"]["broken"]["records"]
    (m,) = failed["shapes"].values()
    assert "error" in m and m["error"].startswith("ZeroDivisionError")
    assert result["sweeps"]["broken"]["pick"] == {"_ELEMS_PER_THREAD": 16} == ok["setting"]
    assert "ZeroDivisionError" in capsys.readouterr().out


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(sweep, "detect", lambda: None)
    assert sweep.main(["--sweeps", "norm"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_the_winners_of_each_constant_alone_are_combined_next(monkeypatch):
    """After the settings that change one constant, the one that sets each constant to its fastest
    value alone comes next, before the other combinations (a sweep cut short reaches it)."""
    values = {"_TILE": (4096, 1024, 2048), "_BWD_STAGES": (1, 2), "_ELEMS_PER_THREAD": (16, 8)}
    ms = {"_TILE": {4096: 3.0, 1024: 2.0, 2048: 2.5}, "_BWD_STAGES": {1: 3.0, 2: 1.0},
          "_ELEMS_PER_THREAD": {16: 1.0, 8: 2.0}}
    order = []

    def fake(sweep_, setting, device):  # an additive cost: each constant's value adds its ms
        order.append(setting)
        return {"s": dict(ms=sum(ms[k][v] for k, v in setting.items()), rate=1.0, unit="GB/s", roofline=0.5,
                          verified=True, check={})}
    monkeypatch.setattr(sweep, "measure", fake)
    grid = sweep.Sweep(norm, values, "rms_norm", ())
    result = sweep.run(["grid"], "cpu", None, sweeps={"grid": grid})
    singles = 1 + 2 + 1 + 1  # the committed, then each constant's other values alone
    assert all(sweep._changes(s, order[0]) <= 1 for s in order[:singles])
    assert order[singles] == {"_TILE": 1024, "_BWD_STAGES": 2, "_ELEMS_PER_THREAD": 16}
    assert len(order) == 3 * 2 * 2 and len({tuple(s.values()) for s in order}) == len(order)
    assert result["sweeps"]["grid"]["pick"] == order[singles]
    # Committed values off their lists: the first setting is then not the committed one, and the
    # winners may have been measured already; every setting is still measured once.
    order.clear()
    off_list = types.SimpleNamespace(__name__="m", _TILE=99, _BWD_STAGES=99, _ELEMS_PER_THREAD=99)
    values = {"_TILE": (1024, 2048, 4096), "_BWD_STAGES": (2, 1, 3), "_ELEMS_PER_THREAD": (8, 16)}
    ms.update(_TILE={1024: 2.0, 2048: 1.0, 4096: 3.0}, _BWD_STAGES={2: 2.0, 1: 1.0, 3: 3.0},
              _ELEMS_PER_THREAD={8: 1.0, 16: 2.0})
    sweep.run(["off"], "cpu", None, sweeps={"off": sweep.Sweep(off_list, values, "rms_norm", ())})
    assert len(order) == 3 * 3 * 2 and len({tuple(s.values()) for s in order}) == len(order)


def test_the_pick_weighs_each_shape_the_same(monkeypatch):
    """The geometric mean of the shapes' times decides: a setting 20% faster at the widest shape
    (whose ms would decide a sum) but 40% slower at the narrowest is not picked."""
    ms = {"_TILE": {4096: {"narrow": 1.0, "wide": 10.0}, 1024: {"narrow": 1.4, "wide": 8.0}}}

    def fake(sweep_, setting, device):
        return {shape: dict(ms=t, rate=1.0, unit="GB/s", roofline=0.5, verified=True, check={})
                for shape, t in ms["_TILE"][setting["_TILE"]].items()}
    monkeypatch.setattr(sweep, "measure", fake)
    result = sweep.run(["g"], "cpu", None, sweeps={"g": sweep.Sweep(norm, {"_TILE": (4096, 1024)}, "rms_norm", ())})
    assert result["sweeps"]["g"]["pick"] == {"_TILE": 4096}
    assert sweep._mean_ms(result["sweeps"]["g"]["records"][1]) == pytest.approx((1.4 * 8.0) ** 0.5)
    # A shape timed at no time at all (a broken timer) is no mean, and no pick; a sum took it.
    ms["_TILE"][1024]["narrow"] = 0.0
    result = sweep.run(["g"], "cpu", None, sweeps={"g": sweep.Sweep(norm, {"_TILE": (4096, 1024)}, "rms_norm", ())})
    assert result["sweeps"]["g"]["pick"] == {"_TILE": 4096}
    assert math.isnan(sweep._mean_ms(result["sweeps"]["g"]["records"][1]))


def test_a_budget_shares_the_time_among_the_sweeps_and_reports_the_cut(monkeypatch, capsys):
    """Each sweep stops starting settings at its share of the time left; the committed one is
    always measured, and the report says how many were not."""
    clock = [0.0]
    monkeypatch.setattr(sweep.time, "monotonic", lambda: clock[0])

    def fake(sweep_, setting, device):  # each setting takes 10 s
        clock[0] += 10.0
        return {"s": dict(ms=1.0, rate=1.0, unit="GB/s", roofline=0.5, verified=True, check={})}
    monkeypatch.setattr(sweep, "measure", fake)
    grid = sweep.Sweep(norm, {"_TILE": (4096, 1024, 2048, 8192), "_BWD_STAGES": (1, 2, 3)}, "rms_norm", ())
    small = sweep.Sweep(norm, {"_BWD_STAGES": (1, 2)}, "rms_norm", ())
    result = sweep.run(["grid", "small", "late"], "cpu", None, sweeps={"grid": grid, "small": small, "late": grid},
                       budget_s=90)
    measured = {name: len(r["records"]) for name, r in result["sweeps"].items()}
    # grid: a third of 90 s; small: its 2 settings, 20 s of its 30; late: the 40 s left.
    assert measured == {"grid": 3, "small": 2, "late": 4}
    assert [r["unmeasured"] for r in result["sweeps"].values()] == [9, 0, 8]
    out = capsys.readouterr().out
    assert out.count("cut at its share of the budget") == 2 and "4 settings measured, at least 8 not" in out
    clock[0] = 1e6  # past the end: the committed setting still runs
    late = sweep.run(["small"], "cpu", None, sweeps={"small": small}, budget_s=0)
    assert len(late["sweeps"]["small"]["records"]) == 1


def fake_measure(ms: dict, unverified: set = frozenset()):
    """A stand-in for sweep.measure: each _TILE's training-pass ms per shape, unverified at the
    (tile, shape) pairs of `unverified`."""
    def fake(sweep_, setting, device):
        tile = setting["_TILE"]
        return {shape: dict(ms=t, rate=1.0, unit="GB/s", roofline=0.5, verified=(tile, shape) not in unverified,
                            check={}) for shape, t in ms[tile].items()}
    return fake


def test_a_setting_unverified_at_one_shape_is_not_picked(monkeypatch, capsys):
    """The pick is committed for every width: a setting that fails its check at any shape is out,
    however fast."""
    ms = {4096: {"narrow": 2.0, "wide": 2.0}, 1024: {"narrow": 1.0, "wide": 1.0}}
    monkeypatch.setattr(sweep, "measure", fake_measure(ms, unverified={(1024, "wide")}))
    result = sweep.run(["g"], "cpu", None, sweeps={"g": sweep.Sweep(norm, {"_TILE": (4096, 1024)}, "rms_norm", ())})
    assert result["sweeps"]["g"]["pick"] == {"_TILE": 4096}
    assert "pick for kernels.norm: _TILE = 4096  (1.00x the committed)" in capsys.readouterr().out


def test_the_report_says_how_much_faster_the_pick_is_than_the_committed(monkeypatch, capsys):
    ms = {4096: {"narrow": 1.25, "wide": 2.5}, 1024: {"narrow": 1.0, "wide": 2.0}}
    monkeypatch.setattr(sweep, "measure", fake_measure(ms))
    sweep.run(["g"], "cpu", None, sweeps={"g": sweep.Sweep(norm, {"_TILE": (4096, 1024)}, "rms_norm", ())})
    assert "pick for kernels.norm: _TILE = 1024  (1.25x the committed)" in capsys.readouterr().out


def fake_entry(monkeypatch) -> list:
    """bench.backends.entry made up: a verified 1 ms; the (timed, checked) cases it was given,
    in the list returned."""
    cases = []

    def entry(timed, checked, impls, peak, device):
        cases.append((timed, checked))
        (pass_,) = timed.passes
        return {"backends": {"triton": {"ms": {pass_: 1.0}, "rate": {pass_: 1.0}, "roofline": {pass_: 0.5},
                                        "verified": True, "check": "ok"}}}
    monkeypatch.setattr(sweep.backends, "entry", entry)
    return cases


def test_a_sweep_times_the_training_pass_alone(monkeypatch):
    """What a setting is picked by is the pass a training step runs (the case's last: fwd+bwd),
    not the forward that comes first."""
    cases = fake_entry(monkeypatch)
    tiny = sweep.Sweep(norm, {"_TILE": (4096,)}, "rms_norm",
                       (Shapes(GPTConfig(n_embd=64, n_head=1), batch_size=1, seq_len=3),))
    (m,) = sweep.measure(tiny, {"_TILE": 4096}, "cpu").values()
    assert [timed.passes for timed, _ in cases] == [("fwd+bwd",)] and m["ms"] == 1.0 and m["verified"]


def test_a_sweep_times_the_norm_in_the_form_it_checks(monkeypatch):
    """With the residual add or without, as the sweep says, in the timed case and the checked."""
    cases = fake_entry(monkeypatch)
    shapes = (Shapes(GPTConfig(n_embd=64, n_head=1), batch_size=1, seq_len=3),)  # a pre-norm model
    for residual in (False, True):
        sweep.measure(sweep.Sweep(norm, {"_TILE": (4096,)}, "rms_norm", shapes, residual=residual), {"_TILE": 4096},
                      "cpu")
    (plain, plain_checked), (fused, fused_checked) = [(t.shape, c.shape) for t, c in cases]
    assert plain == plain_checked and "+residual" not in plain
    assert fused == fused_checked and "+residual" in fused


def test_main_runs_every_sweep_by_default_and_passes_on_its_json_and_budget(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(sweep, "detect", lambda: H100)
    monkeypatch.setattr(sweep, "run", lambda names, device, json_path, budget_s=None:
                        calls.append((names, device, json_path, budget_s)))
    assert sweep.main([]) == 0
    assert sweep.main(["--sweeps", "rope,adamw,rope,", "--json", str(tmp_path / "s.json"), "--budget-s", "60"]) == 0
    assert calls == [(list(sweep.SWEEPS), "cuda", None, None), (["rope", "adamw"], "cuda", tmp_path / "s.json", 60.0)]


def test_a_sweep_cut_short_keeps_what_it_measured_in_its_json(monkeypatch, tmp_path):
    measured = fake_measure({4096: {"s": 1.0}, 1024: {"s": 2.0}})

    def fake(sweep_, setting, device):  # stopped (a GPU session's time limit) in the second setting
        if setting["_TILE"] == 1024:
            raise KeyboardInterrupt
        return measured(sweep_, setting, device)
    monkeypatch.setattr(sweep, "measure", fake)
    path = tmp_path / "sweep.json"
    with pytest.raises(KeyboardInterrupt):
        sweep.run(["g"], "cpu", path, sweeps={"g": sweep.Sweep(norm, {"_TILE": (4096, 1024)}, "rms_norm", ())})
    saved = json.loads(path.read_text())["sweeps"]["g"]
    assert [r["setting"] for r in saved["records"]] == [{"_TILE": 4096}]
    assert saved["pick"] == {"_TILE": 4096} and saved["unmeasured"] == 1


def test_the_report_marks_the_committed_row_unverified_cells_and_each_shape_s_fastest(monkeypatch, capsys):
    ms = {4096: {"narrow": 2.0, "wide": 1.0}, 1024: {"narrow": 1.0, "wide": 2.0}, 2048: {"narrow": 0.5, "wide": 0.5}}
    monkeypatch.setattr(sweep, "measure", fake_measure(ms, unverified={(2048, "wide")}))
    sweep.run(["g"], "cpu", None, sweeps={"g": sweep.Sweep(norm, {"_TILE": (4096, 1024, 2048)}, "rms_norm", ())})
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split(" | ")[0]: line for line in lines if line.startswith("_TILE=")}
    assert rows["_TILE=4096"].endswith("  committed") and not rows["_TILE=1024"].endswith("committed")
    assert rows["_TILE=2048"].split(" | ")[1:3] == ["1", "1 x"] and " x" not in rows["_TILE=1024"]
    # the pick (equal means: the committed, first) and each shape's own fastest verified setting
    assert "pick for kernels.norm: _TILE = 4096  (1.00x the committed)" in lines
    assert "  narrow: fastest _TILE=2048 (4.00x the pick)" in lines
    assert "  wide: fastest _TILE=4096 (1.00x the pick)" in lines


def test_the_report_says_when_no_setting_verified_at_every_shape(monkeypatch, capsys):
    monkeypatch.setattr(sweep, "measure", fake_measure({4096: {"s": 1.0}, 1024: {"s": 2.0}},
                                                      unverified={(4096, "s"), (1024, "s")}))
    result = sweep.run(["g"], "cpu", None, sweeps={"g": sweep.Sweep(norm, {"_TILE": (4096, 1024)}, "rms_norm", ())})
    assert result["sweeps"]["g"]["pick"] is None
    out = capsys.readouterr().out
    assert "no setting verified at every shape" in out and "pick for" not in out


def test_a_pick_beside_a_committed_setting_that_failed_says_so(monkeypatch, capsys):
    """Not "nanx the committed"."""
    measured = fake_measure({1024: {"s": 1.0}})
    monkeypatch.setattr(sweep, "measure", lambda sweep_, setting, device: (
        {"s": {"error": "OutOfResources"}} if setting["_TILE"] == 4096 else measured(sweep_, setting, device)))
    sweep.run(["g"], "cpu", None, sweeps={"g": sweep.Sweep(norm, {"_TILE": (4096, 1024)}, "rms_norm", ())})
    assert "pick for kernels.norm: _TILE = 1024  (the committed failed at a shape)" in capsys.readouterr().out


def test_a_sweep_result_says_what_it_ran_with(monkeypatch):
    monkeypatch.setattr(sweep, "measure", fake_measure({4096: {"s": 1.0}}))
    result = sweep.run(["g"], "cpu", None, sweeps={"g": sweep.Sweep(norm, {"_TILE": (4096,)}, "rms_norm", ())})
    assert result["torch"] == torch.__version__ and result["date"] and "git_sha" in result
    assert result["device"] == "cpu"


def test_each_constant_s_winner_is_of_the_settings_that_change_it_alone():
    def rec(setting: dict, ms: float) -> dict:
        return dict(setting=setting, shapes={"s": dict(ms=ms, rate=1.0, unit="GB/s", roofline=0.5, verified=True,
                                                       check={})})
    records = [rec({"_TILE": 4096, "_BWD_STAGES": 1}, 3.0), rec({"_TILE": 1024, "_BWD_STAGES": 1}, 2.0),
               rec({"_TILE": 4096, "_BWD_STAGES": 2}, 4.0), rec({"_TILE": 2048, "_BWD_STAGES": 2}, 1.0)]
    assert sweep.winners(records) == {"_TILE": 1024, "_BWD_STAGES": 1}
