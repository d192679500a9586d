import io
import os
import random
import signal
import sys
import time
import zlib

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import background  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Fresh random inputs every run; TEST_SEED=<n> replays a run.
SEED = int(os.environ.get("TEST_SEED", random.randrange(2**31)))


# TEST_SHARD=i/n keeps every n-th test from the i-th: bench/gpu_session.sh runs n such parts side by
# side, so that the GPU machine's cores compile the kernels in parallel. The tests marked bigmem
# (tens of GB of GPU memory each) all go to part 0, so that no two of them run at once.
SHARD = os.environ.get("TEST_SHARD")
# TEST_DEADLINE=<unix time>: tests not started by then skip, so a run cut short by a device call's
# time limit still ends with pytest's summary (bench/gpu_session.sh first sets it); the CUDA
# cases then run first.
DEADLINE = float(os.environ.get("TEST_DEADLINE", "inf"))


def _interrupted(signum, frame):
    # Once: the stage that stops the parts may signal again, which would cut the summary short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt  # pytest then prints its summary, the failures so far included


if DEADLINE != float("inf"):  # a run a time limit may stop (SIGTERM, from timeout)
    signal.signal(signal.SIGTERM, _interrupted)


def pytest_report_header(config):
    # CPU sums split over torch's threads: their order, and so a result's last bits, follow the count.
    header = (f"TEST_SEED={SEED} (set it to replay these random inputs; with {torch.get_num_threads()} "
              f"torch threads, OMP_NUM_THREADS)")
    return header + (f", TEST_SHARD={SHARD}" if SHARD else "")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # The header names the seed too, but -q prints none (bench/gpu_session.sh's parts each draw one).
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        terminalreporter.write_line(f"TEST_SEED={SEED} replays these random inputs (with the same OMP_NUM_THREADS)")


def _on_cuda(item) -> bool:
    """A CUDA case: device="cuda", or a test marked cuda (tests.devices.cuda_only, two_gpus)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("device") == "cuda":
        return True
    return item.get_closest_marker("cuda") is not None


def pytest_collection_modifyitems(config, items):
    if DEADLINE != float("inf"):
        # A run cut short by its deadline (a GPU machine's limited time) spends it on the CUDA
        # cases first: their CPU twins run in CI anyway.
        items.sort(key=lambda item: not _on_cuda(item))
    if not SHARD:
        return
    part, parts = (int(x) for x in SHARD.split("/"))
    if not 0 <= part < parts:  # 2/2 once ran a part overlapping another's
        raise pytest.UsageError(f"TEST_SHARD={SHARD}: want i/n with 0 <= i < n")
    big = [item for item in items if item.get_closest_marker("bigmem")]
    small = [item for item in items if not item.get_closest_marker("bigmem")]
    mine = set(small[part::parts] + (big if part == 0 else []))
    config.hook.pytest_deselected(items=[item for item in items if item not in mine])
    items[:] = [item for item in items if item in mine]


@pytest.fixture
def one_process_group():
    """A gloo process group of this process alone."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of its own")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def pytest_collection_finish(session):
    """The subprocess checks of the tests to run (marked background) start now, in the background."""
    def skipped(item):  # marked skip, or skipif with a condition already True
        conditions = (c for m in item.iter_markers("skipif") for c in (*m.args, m.kwargs.get("condition")))
        return item.get_closest_marker("skip") is not None or any(c is True for c in conditions)
    # Under a deadline (a GPU session's short run) they would compile for tests it may never reach,
    # beside the CUDA cases that come first: such a test runs its check when its turn comes.
    if session.config.option.collectonly or DEADLINE != float("inf"):
        return
    background.start(m.args[0] for item in session.items if not skipped(item) for m in item.iter_markers("background"))


def pytest_sessionfinish(session):
    background.stop()


def pytest_runtest_setup(item):
    if time.time() > DEADLINE:
        pytest.skip("TEST_DEADLINE passed before this test started")


@pytest.fixture
def ascii_stdout(monkeypatch):
    """A call that makes sys.stdout as PYTHONIOENCODING=ascii (or a C locale without UTF-8 mode)
    does, and returns the bytes written to it: made in the test itself, where pytest's capture
    has set its own."""
    def install() -> io.BytesIO:
        out = io.BytesIO()
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="ascii", write_through=True))
        return out
    return install


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _cuda_memory_returned():
    """What a test's tensors took goes back to the GPU after it: the GPU session runs the suite in
    14 processes side by side, and each one's caching allocator would otherwise keep the most it
    ever reserved (an H100 has half an H200's memory)."""
    yield
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _no_tf32_leaks():
    """Each test starts with torch's default fp32 matmuls: train.py turns TF32 on for the process
    (as nanoGPT does), which would otherwise reach the tests that run after it."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """train.py's data_dir for a test module's runs: the datasets it prepares from the committed
    text, once a module."""
    return str(tmp_path_factory.mktemp("data"))
