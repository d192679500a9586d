"""SIGTERM, a scheduler taking the machine back (SLURM at a job's time limit or scancel, a spot
instance's shutdown, `timeout`, `kill`), lets a training run end the step (or evaluation) in
progress, save a checkpoint where it stands and stop, rather than lose every step since its
last evaluation.

Schedulers follow SIGTERM with SIGKILL (SLURM after KillWait, 30 s by default; torchrun kills
its workers 30 s after passing the signal on), so a step and a save must fit in that. A repeated
SIGTERM changes nothing (under SLURM, torchrun's workers get the scheduler's and torchrun's own);
Ctrl-C still stops at once.
"""
import signal
import sys
import threading

import torch
import torch.distributed as dist


class Preemption:
    """A context manager: while inside, a SIGTERM is noted, not fatal. `requested()` says whether
    one came, agreed by every rank: each asks at the same point of each iteration and all stop at
    the first where any rank had one (ranks get the signal at slightly different moments, and one
    that stopped alone would leave the others waiting in a collective). A process that already
    handles SIGTERM itself (a test harness's deadline) keeps its handler, and so does a run in a
    thread other than the main one (where Python delivers signals, and alone may set handlers)."""

    def __init__(self, parallel: bool):
        self.signaled = False
        self.parallel = parallel
        # The flag goes over gloo, on the host: an NCCL all-reduce would wait for the GPU's queue.
        # (new_group is a collective: every rank makes it, whichever handler it keeps.)
        self.group = dist.new_group(backend="gloo") if parallel and dist.get_backend() != "gloo" else None
        self.previous = None

    def __enter__(self) -> "Preemption":
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return self
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._note)
        else:
            print("this run is in a thread other than the main one, where Python sets no signal handler: a "
                  "SIGTERM ends the process without saving", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _note(self, signum, frame) -> None:
        self.signaled = True

    def requested(self) -> bool:
        if not self.parallel:
            return self.signaled
        flag = torch.tensor([int(self.signaled)], device="cpu")  # whatever torch.set_default_device says
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
