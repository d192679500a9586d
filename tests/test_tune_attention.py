"""bench.tune_attention's smoke run, in process: the GPU tuner's code path at tiny shapes (on CPU in
the Triton interpreter), with one candidate of each backward pass broken on purpose."""
import json

import torch
from triton.runtime.errors import OutOfResources

from bench import tune_attention
from bench.tune_attention import PASSES
from kernels.attention import _Config


def test_smoke_run_verifies_candidates_and_picks_a_winner_per_pass(monkeypatch, tmp_path, capsys):
    # dkdv's second candidate fails as a configuration too large for shared memory fails; dq's
    # returns one head wrong, a head the float64 check does not sample: only the whole-tensor
    # comparison sees it.
    launch = tune_attention.launch

    def broken(which, p, cfg):
        if which == "dkdv" and cfg != p.defaults[which]:
            raise OutOfResources(262144, 232448, "shared memory")
        outs = launch(which, p, cfg)
        if which == "dq" and cfg != p.defaults[which]:
            outs["dq"][0, 1] *= 1.5
        return outs

    monkeypatch.setattr(tune_attention, "launch", broken)
    path = tmp_path / "tune.json"
    assert tune_attention.main(["--smoke", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["smoke"] and result["provenance"]["torch"] == torch.__version__
    entry = result["head_dims"]["32"]
    for which in PASSES:
        records = entry["passes"][which]["candidates"]
        assert len(records) == 3 and records[0]["default"] and not records[1]["default"]
        # The third: the TMA twin of the fastest verified pointer-load candidate.
        assert records[2]["config"][4] and not any(r["config"][4] for r in records[:2])
        assert records[2]["config"][:4] in [r["config"][:4] for r in records[:2] if r.get("verified")]
        chosen = [r for r in records if r["config"] == entry["passes"][which]["winner"]]
        assert chosen and chosen[0]["verified"] and chosen[0]["ms"] > 0, (which, records)
    fwd = entry["passes"]["fwd"]["candidates"]
    assert all(r["verified"] for r in fwd), fwd
    for dkdv, dq in zip(entry["passes"]["dkdv"]["candidates"][1:], entry["passes"]["dq"]["candidates"][1:]):
        assert dkdv["skipped"].startswith("OutOfResources") and "verified" not in dkdv
        assert not dq["verified"] and "a head" in dq["check"]
    assert entry["passes"]["dkdv"]["winner"] == entry["passes"]["dkdv"]["current"]
    assert entry["passes"]["dq"]["winner"] == entry["passes"]["dq"]["current"]
    # The winners against the current configuration at the tuning T and another, both verified.
    assert [c["T"] for c in entry["compare"]] == [40, 64]
    assert all(c[pass_]["verified"] for c in entry["compare"] for pass_ in ("fwd", "bwd"))
    out = capsys.readouterr().out
    assert "not a speed figure" in out and "skipped: OutOfResources" in out
    assert "    32: _pass_configs(" in out and result["table"] in out


def test_compiling_ahead_launches_each_candidate_in_a_worker(capsys):
    """The workers launch every candidate at the problem's shapes; one that cannot launch (a tile
    that is not a power of two) is counted, not fatal."""
    p = tune_attention.inputs(1, 2, 24, 32, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    work = [("fwd", _Config(16, 16, 4, 1)), ("dq", _Config(32, 16, 4, 1)), ("dkdv", _Config(16, 24, 4, 1))]
    with tune_attention.compile_pool(2) as pool:
        tune_attention.compile_ahead(pool, p, work)
    out = capsys.readouterr().out
    assert "compiled ahead: 3 candidates" in out and "(1 failed there" in out


def test_problems_keep_no_more_than_they_compare():
    """A compiling worker's inputs hold no gradients; the sweep's problem holds its own dk, dv
    and dq, not views that keep whole (B, T, 3H, D) gradient buffers."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert set(tune_attention.inputs(1, 2, 24, 32, device).base) == {"o", "lse", "delta"}
    p = tune_attention.problem(1, 2, 24, 32, device)
    assert all(p.base[name]._base is None for name in ("dq", "dk", "dv"))


def test_without_a_gpu_it_says_what_to_run(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tune_attention.main([]) == 0
    assert "python -m bench.tune_attention" in capsys.readouterr().out


def test_a_head_dim_named_twice_is_tuned_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tuned = []
    monkeypatch.setattr(tune_attention, "tune", lambda head_dims, *rest: tuned.append(head_dims))
    assert tune_attention.main(["--d", "64,128,64", "--compile-jobs", "1"]) == 0
    assert tuned == [[64, 128]]
