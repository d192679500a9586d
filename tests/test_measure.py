"""bench.measure.median_ms on a stand-in for the GPU: calls queued in batches behind a sleep
longer than the host takes to queue them, a batch the GPU reached early queued again."""
import subprocess

import pytest
import torch

from bench import measure


class FakeGPU:
    """torch.cuda's events and sleep as median_ms uses them: every call `gpu_ms` long, and the GPU
    reaching the first call of a batch before the host had queued them all `caught_up` times."""

    def __init__(self, gpu_ms: float, caught_up: int):
        self.gpu_ms, self.caught_up, self.sleeps = gpu_ms, caught_up, []
        gpu = self

        class Event:
            def __init__(self, enable_timing=False):
                self.recorded = False

            def record(self):
                self.recorded = True

            def synchronize(self):
                pass

            def query(self):
                if gpu.caught_up:
                    gpu.caught_up -= 1
                    return True
                return False

            def elapsed_time(self, end):
                assert self.recorded and end.recorded
                return gpu.gpu_ms

        self.Event = Event

    def sleep(self, cycles: int):
        self.sleeps.append(cycles)


@pytest.fixture
def fake(monkeypatch):
    def install(gpu_ms, caught_up=0):
        gpu = FakeGPU(gpu_ms, caught_up)
        monkeypatch.setattr(torch.cuda, "Event", gpu.Event)
        monkeypatch.setattr(torch.cuda, "_sleep", gpu.sleep)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(measure, "L2_FLUSH_BYTES", 64)
        return gpu
    return install


def doubling(slept: list[int]) -> list:
    """Each sleep twice the one before, as whole cycles: int() truncates each of them, so the
    k-th may sit up to 2**k cycles from 2**k times the first."""
    return [slept[0]] + [pytest.approx(2**k * slept[0], abs=2**k) for k in range(1, len(slept))]


def test_times_the_gpus_work_in_whole_batches_behind_a_sleep(fake):
    gpu = fake(gpu_ms=0.25)
    calls = []
    assert measure.median_ms(lambda: calls.append(1), warmup_ms=1, rep_ms=20) == 0.25
    timed = measure.calls_for(0.25, 20)
    assert timed == measure.BATCH * 4  # 80 calls of 0.25 ms: 20 ms
    # the untimed first call, the estimate's 3, one warm-up batch, the timed calls
    assert len(calls) == 1 + 3 + measure.BATCH + timed
    # the clock's calibration (2), the estimate unslept, then every batch asleep alike
    assert len(gpu.sleeps) == 3 + 1 + 4 and len(set(gpu.sleeps[3:])) == 1 and gpu.sleeps[3] > 0


def test_a_batch_the_gpu_reached_early_is_queued_again_asleep_longer(fake):
    gpu = fake(gpu_ms=1.0, caught_up=3)  # the estimate's batch (unslept), then the first two batches
    calls = []
    measure.median_ms(lambda: calls.append(1), warmup_ms=1, rep_ms=1)
    slept = gpu.sleeps[3:]
    assert slept[:3] == doubling(slept[:3])
    # each batch again with half the calls, then a quarter of BATCH a batch for the warm-up and the
    # BATCH timed calls (calls_for's least)
    b = measure.BATCH
    assert len(slept) == 2 + 1 + 4
    assert len(calls) == 1 + 3 + b + b // 2 + b // 4 + b


def test_a_pass_that_waits_for_the_gpu_is_timed_unslept_after_its_tries(fake):
    gpu = fake(gpu_ms=1.0, caught_up=10**6)  # never ahead: the host waits inside each call
    assert measure.median_ms(lambda: None, warmup_ms=1, rep_ms=1) == 1.0
    slept = gpu.sleeps[3:]
    assert slept[:measure.TRIES] == doubling(slept[:measure.TRIES])
    assert set(slept[measure.TRIES:]) == {0}  # the warm-up and the timed batches


def test_a_pass_slow_to_issue_gets_batches_its_sleep_can_cover(fake):
    gpu = fake(gpu_ms=1.0)
    clock = iter(range(0, 10**9, 100))  # every perf_counter call 100 s later: a slow host
    measure.time.perf_counter, saved = (lambda: next(clock) / 1e3), measure.time.perf_counter
    try:
        calls = []
        measure.median_ms(lambda: calls.append(1), warmup_ms=1, rep_ms=1)
    finally:
        measure.time.perf_counter = saved
    assert max(gpu.sleeps[3:]) <= measure.MAX_SLEEP_MS * measure._sleep_cycles_per_ms() * 1.01


def test_calls_for_keeps_between_one_batch_and_the_cap():
    assert measure.calls_for(100.0, 500) == measure.BATCH
    assert measure.calls_for(0.001, 500) == measure.MAX_CALLS
    assert measure.calls_for(1.0, 50) == 50


def test_the_l2_is_flushed_before_every_timed_call_by_a_read(fake, monkeypatch):
    """A read leaves the cache's lines clean (a zeroed buffer would leave them dirty, for the timed
    kernel to write back): the flush changes nothing in its buffer, and comes before every call."""
    fake(gpu_ms=0.25)  # and a 64-byte flush buffer
    buffer = torch.randint(-100, 100, (measure.L2_FLUSH_BYTES,), dtype=torch.int8)
    before = buffer.clone()
    measure.flush_l2(buffer)
    assert torch.equal(buffer, before)
    order = []
    monkeypatch.setattr(measure, "flush_l2", lambda b: order.append("flush"))
    measure.median_ms(lambda: order.append("call"), warmup_ms=1, rep_ms=5)
    assert order[0] == "call"  # the first, untimed call compiles
    assert order[1:] == ["flush", "call"] * ((len(order) - 1) // 2)


def test_an_error_cell_is_cut_to_its_width():
    cell = measure.error_cell("RuntimeError: " + "x" * 200, 60)
    assert cell == "error: RuntimeError: " + "x" * 46 and len(cell) == len("error: ") + 60
    assert measure.error_cell("RuntimeError: " + "x" * 200) == "error: RuntimeError: " + "x" * 200  # printed whole


def test_one_line_names_the_exception_not_a_line_that_counts_errors():
    """Only a word ending in Error or Exception names one: "Errors: 3" in an error's text is detail."""
    failed = "AssertionError: outputs differ\nMismatched elements: 3 / 1024\nErrors: 3 beyond the tolerance"
    assert measure.one_line(failed) == "AssertionError: outputs differ"
    worker = ("InductorError: SubprocException: An exception occurred in a subprocess:\nTraceback (most recent call "
              "last):\n  File \"x.py\", line 1, in f\nNameError: name 'runtime' is not defined\nErrors: 1")
    assert measure.one_line(worker) == ("InductorError: SubprocException: An exception occurred in a subprocess: ... "
                                        "NameError: name 'runtime' is not defined")


def test_provenance_without_git_leaves_the_revision_and_its_changes_unknown(monkeypatch):
    """No git (a copied tree, no git installed): whether it had uncommitted changes is unknown, not "no"."""
    def no_git(*args, **kwargs):
        raise OSError("git: not found")
    monkeypatch.setattr(measure.subprocess, "run", no_git)
    p = measure.provenance()
    assert p["git_sha"] is None and p["git_dirty"] is None


def test_calls_for_counts_only_whole_calls_within_the_budget():
    assert measure.calls_for(0.3, 20) == 66  # 66.7 calls fit: 66, not 67


def test_one_line_ignores_a_word_that_only_begins_with_an_error_name():
    assert measure.one_line("RuntimeError: boom\n2 ValueErrors were counted") == "RuntimeError: boom"


def test_one_line_skips_blank_lines():
    assert measure.one_line("\n   \nValueError: bad\n\n") == "ValueError: bad"
    assert measure.one_line("") == ""


def test_an_error_cell_is_the_errors_one_line():
    assert measure.error_cell("compile failed\n  File x.py\nValueError: bad") == (
        "error: compile failed ... ValueError: bad")


def test_provenance_outside_a_git_repository_leaves_the_revision_unknown(monkeypatch):
    def not_a_repo(args, **kwargs):
        raise subprocess.CalledProcessError(128, args, stderr="fatal: not a git repository")
    monkeypatch.setattr(measure.subprocess, "run", not_a_repo)
    p = measure.provenance()
    assert p["git_sha"] is None and p["git_dirty"] is None


def test_provenance_dirty_means_tracked_changes_only(monkeypatch):
    def git(args, **kwargs):
        if "status" in args:
            out = "" if "--untracked-files=no" in args else "?? scratch.txt\n"
        else:
            out = "abc123\n"
        return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")
    monkeypatch.setattr(measure.subprocess, "run", git)
    p = measure.provenance()
    assert p["git_sha"] == "abc123" and p["git_dirty"] is False


def test_a_rows_dict_names_its_pass_pass():
    d = measure.Row("op", "1 x 2", "fwd", "torch", 1.0, 2.0, "GB/s", 0.5).as_dict()
    assert d["pass"] == "fwd" and "pass_" not in d


def test_printed_rows_mark_host_bound_passes_and_failed_checks(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    rows = [measure.Row("op", "s", "fwd", "slow", 1.0, 2.0, "GB/s", 0.5, verified=False, host_ms=0.9),
            measure.Row("op", "s", "fwd", "fast", 1.0, 2.0, "GB/s", 0.5, verified=True, host_ms=0.1)]
    measure.print_rows(rows, "t")
    out = capsys.readouterr().out
    slow, fast = (next(line for line in out.splitlines() if name in line) for name in ("slow", "fast"))
    assert "host-bound" in slow and "NO" in slow
    assert "host-bound" not in fast and "yes" in fast
