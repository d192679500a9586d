"""bench/gpu_session.sh's own logic on a CPU (GPU_SESSION_ON_CPU=1): what a short GPU session
loses when a stage misbehaves is its device time, so the stopping and reporting are tried here.

The tests stage runs in a copy of the script beside a suite of its own (a test that passes, one
that sleeps past the deadline, one stuck in a C call that no signal interrupts), split in two
parts, with a deadline a few seconds away."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import background
from tests.test_helpers import suite_copy

ROOT = Path(__file__).resolve().parents[1]

# Every second test to each part: the first gets test_passes and the sleeper, the second the
# C call (no signal reaches Python inside it) and a test that starts after the deadline.
MINI_SUITE = '''
import time
def test_passes(): pass
def test_stuck_in_c(): sum(range(10**11))
def test_sleeps_past_the_deadline(): time.sleep(60)
def test_after_the_deadline(): pass
'''


# The stage stops its parts two thirds of this past the deadline and kills them at its end: the
# third between leaves a stopped part time to print its counts on a loaded machine (3 s did not
# always, nor did 5: beside a helper and other suites on 2 cores).
GRACE_S = 24


def _stage_copy(tmp_path: Path, suite: str = MINI_SUITE) -> Path:
    (tmp_path / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "gpu_session.sh", tmp_path / "bench")
    return suite_copy(tmp_path, suite) / "bench" / "gpu_session.sh"


def _run_tests_stage(script: Path, out: Path, deadline_s: int) -> tuple[subprocess.CompletedProcess, float]:
    """The stage in two parts, its output read through a pipe (as first's tee and the device
    call read it), with TEST_DEADLINE deadline_s away and GRACE_S of grace."""
    env = dict(os.environ, GPU_SESSION_ON_CPU="1", OUT=str(out), TEST_SHARDS="2", TESTS_GRACE_S=str(GRACE_S),
               TEST_DEADLINE=str(int(time.time()) + deadline_s))
    env.pop("TEST_SHARD", None)
    t0 = time.monotonic()
    done = subprocess.run(["bash", str(script), "tests"], env=env, capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - t0


@pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash")
def test_tests_stage_reports_every_part_by_its_deadline(tmp_path):
    """Past TEST_DEADLINE the stage stops its parts (pytest then prints its counts) and kills one
    that a C call keeps from stopping, and reports both before its grace time is out."""
    out = tmp_path / "out"
    # 25 s: pytest's start in each part (torch's import) on a loaded 2-core machine took over 8,
    # and over 15 beside two other suites
    done, took = _run_tests_stage(_stage_copy(tmp_path), out, deadline_s=25)
    lines = done.stdout.splitlines()
    assert done.returncode == 1, done.stdout + done.stderr  # the parts stopped early count as failed
    assert took < 25 + GRACE_S + 15, f"{took:.0f} s"  # by the deadline, its grace, and pytest's start
    sleepy = next(line for line in lines if line.startswith("TEST_SHARD=0/2: "))
    stuck = next(line for line in lines if line.startswith("TEST_SHARD=1/2: "))
    assert "1 passed" in sleepy, sleepy  # its counts, though it was stopped
    assert "no summary (killed while stuck?)" in stuck, stuck
    assert "tests: 2 of 2 parts failed" in done.stdout
    assert (out / "tests.log").exists()


@pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash")
def test_tests_stage_done_early_returns_at_once(tmp_path):
    """Parts that all end well before the deadline: the stage returns then, its stopper gone with
    it (its sleep, left holding the output, kept a reader waiting until its time)."""
    done, took = _run_tests_stage(_stage_copy(tmp_path, "def test_a(): pass\ndef test_b(): pass\n"), tmp_path / "out",
                                  deadline_s=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert took < 30, f"{took:.0f} s"
    assert "tests: 0 of 2 parts failed" in done.stdout


@pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash")
def test_a_stage_without_cuda_says_so_and_fails(tmp_path):
    """Without GPU_SESSION_ON_CPU, on a machine whose torch sees no GPU, a stage measures nothing
    and must not look done: exit status 2 and the reason."""
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    env.pop("GPU_SESSION_ON_CPU", None)
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "mfu"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "torch sees no CUDA GPU here" in done.stdout


@pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash")
def test_an_unknown_stage_gets_the_usage_on_any_machine(tmp_path):
    """A misspelt stage is told the stages (it was told there was no GPU, on a CPU), and writes nothing."""
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    env.pop("GPU_SESSION_ON_CPU", None)
    for args in (["bogus"], []):
        done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.startswith("usage: bash bench/gpu_session.sh first|"), args
    assert not (tmp_path / "out").exists()


def accepted_stages() -> list[str]:
    """The stages gpu_session.sh takes (its first check, before the GPU's)."""
    script = (ROOT / "bench" / "gpu_session.sh").read_text()
    return re.search(r"case \$\{1:-\} in.*?\n\s+([a-z|]+)\) ;;", script, re.S).group(1).split("|")


def test_every_stage_it_accepts_it_runs_and_its_usage_names():
    """The stage names are written three times (the check before the GPU's, the usage, the
    stages themselves): a stage accepted but not run would end "0 step(s) failed"."""
    script = (ROOT / "bench" / "gpu_session.sh").read_text()
    accepted = accepted_stages()
    usage = re.search(r'^usage="usage: bash bench/gpu_session.sh (.*)"$', script, re.M).group(1)
    ran = re.findall(r"^  ([a-z]+)\)", script, re.M)
    assert sorted(accepted) == sorted(ran) == sorted(s.split()[0] for s in usage.split("|"))


# Every stage on a CPU with the suite and train.py stood in for (a python on PATH that answers
# `-m pytest` with a pass, and reads train.py's config without training): each command line a
# stage runs must be one its program takes, which then says there is no GPU. A usage error or a
# traceback there would cost a GPU session a call. In a process of its own, at collection.
_DRY_RUN_CODE = r'''
import json, os, subprocess, sys, tempfile
from pathlib import Path
from tests.test_gpu_session import accepted_stages
script = Path("bench/gpu_session.sh").resolve()
stages = accepted_stages()
with tempfile.TemporaryDirectory() as where:
    shim = Path(where) / "python"
    shim.write_text("""#!/bin/sh
case "$1 $2" in
  "-m pytest") echo "1 passed in 0.01s"; exit 0 ;;
  "train.py "*) shift; exec "$REAL_PYTHON" -c 'import sys, train; train.read_config(sys.argv[1:])' "$@" ;;
esac
exec "$REAL_PYTHON" "$@"
""")
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TEST_SHARD", "TEST_DEADLINE")}
    env |= dict(GPU_SESSION_ON_CPU="1", OUT=str(Path(where) / "out"), REAL_PYTHON=sys.executable, BUDGET_S="400",
                TEST_SHARDS="2", PATH=f"{where}:{os.environ['PATH']}")
    logs = {}
    for stage in stages:
        subprocess.run(["bash", str(script), stage], env=env, capture_output=True, timeout=400)
        logs[stage] = (Path(where) / "out" / f"{stage}.log").read_text()
print(json.dumps(logs))
'''
DRY_RUN = (sys.executable, "-c", _DRY_RUN_CODE)


@pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run of the stages: on a GPU they would measure for real")
@pytest.mark.background(DRY_RUN)
def test_every_stage_s_command_lines_are_ones_their_programs_take():
    logs = background.last_json(DRY_RUN)
    assert set(logs) == {"first", "tests", "tune", "profiles", "ops", "mfu", "sweep", "train", "curves"}
    for stage, log in logs.items():
        assert "Traceback" not in log and "usage:" not in log and "error:" not in log, (stage, log[-3000:])
        steps = re.findall(r"^== (.+): exit \d+", log, re.M)
        assert len(steps) == {"first": 3, "tests": 0, "profiles": 2, "ops": 7, "mfu": 2, "train": 2}.get(stage, 1), \
            (stage, steps)
    assert "TEST_SHARD=1/2: 1 passed" in logs["first"]  # its tests stage, with the stand-in suite
    # a step's cap, or the stage's time left where that is less (BUDGET_S=400); first's share of
    # what its tests left (394 to 400 s here: their stand-in takes a second or two at most)
    first_gpt2 = int(re.search(r"^== mfu gpt2: at most (\d+) s$", logs["first"], re.M)[1])
    assert 236 <= first_gpt2 <= 240 and "== mfu gpt2: at most 300 s" in logs["mfu"]
    assert f"--budget-s {first_gpt2 - 75} " in logs["first"] and "--budget-s 225 " in logs["mfu"]
    assert re.search(r"^== op_norm: at most (399|400) s$", logs["ops"], re.M), logs["ops"][:2000]


@pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash")
def test_a_step_with_under_45_s_left_is_skipped_and_fails_the_stage(tmp_path):
    env = dict(os.environ, GPU_SESSION_ON_CPU="1", OUT=str(tmp_path), BUDGET_S="44")
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "tune"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and re.search(r"== tune: skipped, 4[34] s left", done.stdout), done.stdout
    assert "stage tune: " in done.stdout and "1 step(s) failed, cut or skipped" in done.stdout
