"""Long checks that run in processes of their own (tests/sm_compile.py, tests/inductor_graph.py),
started as soon as the session's tests are collected, one after another on a thread of their
own: on a 2-core machine they take the core the other tests leave idle, instead of running on
it alone at their turn. A test marked `background(argv)` then takes its run's result.

conftest.py starts the runs of the tests it collected (and does not skip), and stops what is
left of them when the session ends."""
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # a run's own limit, from its start

_runs: dict[tuple[str, ...], "_Run"] = {}
_lock = threading.Lock()


class _Run:
    def __init__(self, argv: tuple[str, ...]):
        self.argv = argv
        self.done = threading.Event()
        self.process: subprocess.Popen | None = None
        self.result: subprocess.CompletedProcess | None = None
        self.stopped = False

    def run(self) -> None:
        with _lock:
            if self.stopped:
                self.done.set()
                return
            # A session of its own: stopped, its children (a script's programs) go with it.
            self.process = subprocess.Popen(self.argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True, start_new_session=True)
        try:
            stdout, stderr = self.process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            stdout, stderr = self.process.communicate()
            stderr += f"\n{' '.join(self.argv)}: killed after {TIMEOUT_S} s"
        self.result = subprocess.CompletedProcess(self.argv, self.process.returncode, stdout, stderr)
        self.done.set()

    def kill(self) -> None:
        """The run and every process it started."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # all gone
            pass


def start(argvs) -> None:
    """Run each argv (a tuple), once, in the order given, on one background thread."""
    new = []
    for argv in argvs:
        if argv not in _runs:
            _runs[argv] = _Run(argv)
            new.append(_runs[argv])
    if new:
        threading.Thread(target=lambda: [run.run() for run in new], daemon=True).start()


def result(argv: tuple[str, ...]) -> subprocess.CompletedProcess:
    """argv's run: waited for if it was started, else run now."""
    start([argv])
    run = _runs[argv]
    run.done.wait()
    if run.result is None:
        raise RuntimeError(f"{' '.join(argv)} was stopped before it ran")
    return run.result


def last_json(argv: tuple[str, ...]):
    """What the last line of argv's run prints, as JSON (a probe's findings); the run must succeed."""
    run = result(argv)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(run.stdout.splitlines()[-1])


def stop() -> None:
    """Kill the run in progress and cancel those not started."""
    with _lock:
        for run in _runs.values():
            run.stopped = True
            if run.process is not None and run.process.poll() is None:
                run.kill()
