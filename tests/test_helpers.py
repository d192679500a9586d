"""The suite's own helpers: conftest.py's TEST_SHARD split (bigmem tests to part 0), TEST_DEADLINE's
skip and CUDA-first order and background runs, background.py's contract (each in a suite or a
process of its own: stop() would stop this session's own runs; the GPU session's few minutes depend
on them: bench/gpu_session.sh, test_gpu_session.py), devices.py's marks and skips, and
memory.py's peak. (numerics.py's checks: test_numerics.py.)"""
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from kernels import runtime
from tests import background, devices, memory

ROOT = Path(__file__).resolve().parents[1]


def suite_copy(tmp_path: Path, source: str) -> Path:
    """A root holding tests/test_mini.py of `source` beside copies of conftest.py and background.py."""
    (tmp_path / "tests").mkdir()
    for name in ("conftest.py", "background.py"):
        (tmp_path / "tests" / name).write_bytes((ROOT / "tests" / name).read_bytes())
    (tmp_path / "tests" / "test_mini.py").write_text(textwrap.dedent(source))
    return tmp_path


def _pytest(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("TEST_SHARD", "TEST_DEADLINE")} | env
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_mini.py", *args],
                          cwd=root, env=environ, capture_output=True, text=True, timeout=120)


def _collected(root: Path, **env: str) -> list[str]:
    out = _pytest(root, "--collect-only", **env)
    assert out.returncode == 0, out.stdout + out.stderr
    return [line.split("::")[1] for line in out.stdout.splitlines() if "::" in line]


SHARDED = '''
    import pytest
    def test_s0(): pass
    @pytest.mark.bigmem
    def test_b0(): pass
    def test_s1(): pass
    def test_s2(): pass
    @pytest.mark.bigmem
    def test_b1(): pass
    def test_s3(): pass
    def test_s4(): pass
'''


def test_shards_split_the_small_tests_and_give_part_0_every_bigmem_one(tmp_path):
    root = suite_copy(tmp_path, SHARDED)
    parts = [_collected(root, TEST_SHARD=f"{i}/3") for i in range(3)]
    assert parts == [["test_s0", "test_b0", "test_b1", "test_s3"], ["test_s1", "test_s4"], ["test_s2"]]
    for bad in ("3/3",):
        out = _pytest(root, "--collect-only", TEST_SHARD=bad)
        assert out.returncode == 4 and "want i/n with 0 <= i < n" in out.stderr, (bad, out.stdout + out.stderr)


def test_a_failing_run_names_its_seed_even_under_q(tmp_path):
    """The header names TEST_SEED, but -q prints no header: a failure in a GPU session's log
    (bench/gpu_session.sh runs its parts so, each drawing a seed) could not be replayed."""
    root = suite_copy(tmp_path, "def test_fails(): assert False\ndef test_passes(): pass\n")
    failed = _pytest(root, TEST_SEED="1234")
    assert failed.returncode == 1 and "TEST_SEED=1234 replays these random inputs" in failed.stdout
    passed = _pytest(root, "-k", "passes", TEST_SEED="1234")
    assert passed.returncode == 0 and "TEST_SEED" not in passed.stdout


ORDERED = '''
    import pytest
    def test_first(): pass
    @pytest.mark.parametrize("device", ["cpu", "cuda"])
    def test_on(device): pass
    def test_middle(): pass
    @pytest.mark.cuda
    def test_marked(): pass
'''


def test_under_a_deadline_the_cuda_cases_come_first_and_only_then(tmp_path):
    root = suite_copy(tmp_path, ORDERED)
    assert _collected(root) == ["test_first", "test_on[cpu]", "test_on[cuda]", "test_middle", "test_marked"]
    assert _collected(root, TEST_DEADLINE=str(int(time.time()) + 3600)) == \
        ["test_on[cuda]", "test_marked", "test_first", "test_on[cpu]", "test_middle"]


def test_tests_not_started_by_the_deadline_skip(tmp_path):
    root = suite_copy(tmp_path, "def test_a(): pass\ndef test_b(): pass\n")
    out = _pytest(root, "-rs", TEST_DEADLINE=str(int(time.time()) - 1))
    assert "2 skipped" in out.stdout and "TEST_DEADLINE passed before this test started" in out.stdout, out.stdout


TERMINATED = """
    import os, signal, time
    def test_a_term_interrupts_once():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:  # how pytest, interrupted, still prints its summary
            pass
        # a second TERM (the stage that stops the parts may send more) would cut the summary short
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
"""


def test_under_a_deadline_a_term_interrupts_once(tmp_path):
    out = _pytest(suite_copy(tmp_path, TERMINATED), TEST_DEADLINE=str(int(time.time()) + 3600))
    assert "1 passed" in out.stdout, out.stdout + out.stderr


BACKGROUND = '''
    import sys, time
    import pytest
    from tests import background
    PID_FILE = {pid_file!r}
    # A run that starts a program of its own (as gpu_session.sh does): the pid file holds the program's.
    PROGRAM = f"import os, time; open({{PID_FILE!r}}, 'w').write(str(os.getpid())); time.sleep(60)"
    SLOW = (sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {{PROGRAM!r}}])")
    QUICK = (sys.executable, "-c", "print('quick')")
    SKIPPED = (sys.executable, "-c", "print('skipped')")

    def test_started_at_collection():
        assert QUICK in background._runs
        assert SLOW in background._runs
        assert SKIPPED not in background._runs  # its test skips: not started

    @pytest.mark.background(QUICK)
    def test_quick():
        assert background.result(QUICK).stdout == "quick\\n"

    @pytest.mark.background(SLOW)
    def test_slow_left_running():
        import os
        for _ in range(600):  # its process is up (QUICK's, before it, is done)
            if os.path.exists(PID_FILE) and open(PID_FILE).read():
                break
            time.sleep(0.05)

    @pytest.mark.skipif(True, reason="skipped")
    @pytest.mark.background(SKIPPED)
    def test_skipped(): pass
'''


def test_background_runs_start_at_collection_and_stop_at_the_end(tmp_path):
    """The runs of the tests to run start as the session's tests are collected (not a skipped
    test's, nor under a deadline), and one still running when the session ends is killed, with the
    programs it started."""
    pid_file = tmp_path / "slow.pid"
    root = suite_copy(tmp_path, BACKGROUND.format(pid_file=str(pid_file)))
    out = _pytest(root, "-k", "started or slow or quick or skipped")
    pid = int(pid_file.read_text())
    try:
        assert out.returncode == 0 and "3 passed, 1 skipped" in out.stdout, out.stdout + out.stderr
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid), "the session left its background run running"
    finally:
        if _alive(pid):
            os.kill(pid, 9)
    # Under a deadline nothing starts at collection: a test runs its check when its turn comes.
    pid_file.unlink()
    out = _pytest(root, "-k", "started or quick", TEST_DEADLINE=str(int(time.time()) + 3600))
    assert "1 failed, 1 passed" in out.stdout, out.stdout
    assert ">       assert QUICK in background._runs" in out.stdout, out.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead: its parent (the session's pytest) has exited, and init reaps it
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_result_runs_an_argv_not_started_and_keeps_its_exit_status():
    run = background.result((sys.executable, "-c", "import sys; print('out'); sys.exit(3)", "not started"))
    assert (run.returncode, run.stdout) == (3, "out\n")


def test_an_argv_runs_once():
    argv = (sys.executable, "-c", "pass", "once")
    background.start([argv])
    first = background._runs[argv]
    background.start([argv])
    assert background._runs[argv] is first and background.result(argv) is first.result


STOP = textwrap.dedent('''
    import sys, time
    from tests import background
    SLOW = (sys.executable, "-c", "import time; time.sleep(60)")
    NEXT = (sys.executable, "-c", "print('next')")
    CWD = (sys.executable, "-c", "import os; print(os.getcwd())")
    print(background.result(CWD).stdout.strip())
    background.start([SLOW, NEXT])
    while background._runs[SLOW].process is None:
        time.sleep(0.01)
    t0 = time.monotonic()
    background.stop()
    background._runs[SLOW].done.wait(10)
    print(background._runs[SLOW].result.returncode, round(time.monotonic() - t0))
    try:
        background.result(NEXT)
        print("NEXT ran")
    except RuntimeError as e:
        print(e)
''')


def test_stop_kills_the_run_in_progress_and_cancels_the_rest(tmp_path):
    """And each run starts in the repository's root (`python -m tests.sm_compile` from anywhere)."""
    out = subprocess.run([sys.executable, "-c", STOP], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=90)
    cwd, killed, cancelled = out.stdout.splitlines()
    assert cwd == str(ROOT)
    assert killed == "-9 0", out.stdout
    assert cancelled.endswith("print('next') was stopped before it ran"), out.stdout


SKIPPED_BACKGROUND = '''
    import sys
    import pytest
    from tests import background
    MARKED_SKIP = (sys.executable, "-c", "print(1)", "skip")
    KEYWORD_SKIPIF = (sys.executable, "-c", "print(1)", "skipif")

    def test_not_started():
        assert MARKED_SKIP not in background._runs
        assert KEYWORD_SKIPIF not in background._runs

    @pytest.mark.skip(reason="skipped")
    @pytest.mark.background(MARKED_SKIP)
    def test_marked_skip(): pass

    @pytest.mark.skipif(condition=True, reason="skipped")
    @pytest.mark.background(KEYWORD_SKIPIF)
    def test_keyword_skipif(): pass
'''


def test_no_skipped_tests_background_run_starts(tmp_path):
    """Marked skip, or skipif(condition=True): its run (minutes of a core for sm_compile) would
    start though the test never takes its result."""
    out = _pytest(suite_copy(tmp_path, SKIPPED_BACKGROUND))
    assert "1 passed, 2 skipped" in out.stdout, out.stdout


def _marks(decorate) -> dict:
    def test():
        pass
    return {m.name: m for m in decorate(test).pytestmark}


def test_cuda_only_marks_cuda_and_skips_only_without_a_gpu():
    marks = _marks(devices.cuda_only)
    assert set(marks) == {"cuda", "skipif"} and marks["skipif"].args == (not torch.cuda.is_available(),)


@pytest.mark.parametrize("count, skips", [(0, True), (1, True), (2, False), (8, False)])
def test_two_gpus_marks_cuda_and_skips_with_fewer_than_two(monkeypatch, count, skips):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    marks = _marks(devices.two_gpus)
    assert set(marks) == {"cuda", "skipif"} and marks["skipif"].args == (skips,)


@devices.cuda_only
def test_no_host_syncs_is_torch_s_error_mode_and_restores_the_mode_before():
    before = torch.cuda.get_sync_debug_mode()
    with devices.no_host_syncs():
        assert torch.cuda.get_sync_debug_mode() == 2  # "error"
    assert torch.cuda.get_sync_debug_mode() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="without a GPU the interpreter is on")
def test_interpreter_only_runs_without_a_gpu():
    assert devices.interpreter_only.args == (False,)


def _does_not_skip(fn, *args):
    try:
        fn(*args)
    except pytest.skip.Exception as e:
        pytest.fail(f"skipped: {e}")


def test_skip_unless_triton_runs_skips_only_the_triton_backend_on_cpu_without_cpu_tensors(monkeypatch):
    for cpu_tensors in (True, False):
        monkeypatch.setattr(runtime, "CPU_TENSORS", cpu_tensors)
        for backend, device in (("triton", "cpu"), ("torch", "cpu"), ("triton", "cuda")):
            skips = backend == "triton" and device == "cpu" and not cpu_tensors
            if skips:
                with pytest.raises(pytest.skip.Exception):
                    devices.skip_unless_triton_runs(backend, device)
            else:
                _does_not_skip(devices.skip_unless_triton_runs, backend, device)


def test_skip_unless_interpreter_runs_skips_only_with_a_problem(monkeypatch):
    monkeypatch.setattr(runtime, "interpreter_problem", lambda triton_version, numpy_version: None)
    _does_not_skip(devices.skip_unless_interpreter_runs)
    monkeypatch.setattr(runtime, "interpreter_problem", lambda triton_version, numpy_version: "numpy too new")
    with pytest.raises(pytest.skip.Exception, match="numpy too new"):
        devices.skip_unless_interpreter_runs()


def test_compiled_dynamic_traces_sizes_as_symbols():
    """dynamic=True: one graph for two sizes (else a second compile, automatic dynamic)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    fn = devices.compiled(lambda x: x * 2 + 1, "cpu", dynamic=True)
    for n in (3, 5, 7):
        torch.testing.assert_close(fn(torch.ones(n)), torch.full((n,), 3.0))
    assert counters["stats"]["unique_graphs"] - before == 1


def test_a_reading_taken_before_a_peak_never_lowers_it(monkeypatch):
    """peak_malloc_mib's sampling thread may read glibc's count before an allocation and store it
    after an op's own sample saw the allocation (on a loaded machine, 64 MiB tensors went unseen):
    the peak is the largest reading, whatever order the readings land in."""
    level, taken, release, returned = [0], threading.Event(), threading.Event(), threading.Event()

    def in_use():
        if threading.current_thread() is threading.main_thread() or release.is_set():
            return level[0]
        reading = level[0]  # the sampling thread's first reading, before the allocation...
        taken.set()
        release.wait(5)
        returned.set()  # ...returned after the op's sample
        return reading

    def fn():
        taken.wait(5)
        level[0] = 2**30
        torch.zeros(1)  # an op: its sample sees the GiB
        release.set()
        returned.wait(5)
        level[0] = 0
    monkeypatch.setattr(memory, "_malloc_in_use", lambda: in_use)
    assert memory.peak_malloc_mib(fn) == 1024


def test_a_peak_between_two_ops_is_seen_without_the_thread(monkeypatch):
    """A tensor that lives from one op to the next is seen by the sample after each op: here the
    sampling thread, its first reading taken, sleeps through fn."""
    if memory.peak_malloc_mib(lambda: None) is None:
        pytest.skip("glibc 2.33+ only")
    sleep = time.sleep
    monkeypatch.setattr(memory.time, "sleep", lambda s: sleep(0.5))

    def fn():
        sleep(0.05)  # the thread's first reading is taken by then
        torch.ones(2**24).sum()  # 64 MiB from ones to sum
    assert memory.peak_malloc_mib(fn) >= 63


def test_peak_malloc_mib_sees_a_tensor_made_and_freed_inside():
    if memory.peak_malloc_mib(lambda: torch.ones(4).sum()) is None:  # what a first call sets up is not counted
        pytest.skip("glibc 2.33+ only")
    assert 63 <= memory.peak_malloc_mib(lambda: torch.ones(2**24).sum()) <= 72  # 64 MiB, freed before it returns
    x = torch.ones(2**24)  # in use before: not counted
    assert -1 <= memory.peak_malloc_mib(lambda: x.sum()) <= 4
