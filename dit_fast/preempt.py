"""Save on preemption: SIGTERM, SIGUSR1 or SIGINT end a training run with a checkpoint, not a loss.

Schedulers warn before they kill: SLURM sends SIGTERM (or, with ``#SBATCH --signal=USR1@120``,
SIGUSR1 two minutes ahead), Kubernetes and spot instances SIGTERM. The handler only sets a flag;
at every optimizer-step boundary the ranks agree on it (one all-reduce of one int on a CPU gloo
group: no GPU sync), so all ranks stop after the same step -- even when only one of them was
signalled -- write a complete checkpoint through the usual atomic path and exit with
``PREEMPTED_EXIT`` (75, sysexits' EX_TEMPFAIL: "try again"), which a requeue script tests.

A second signal kills the process at once, by the signal's default action (exit 128 + signal
number), even inside a collective or a write where no Python handler could run: the previous
complete checkpoint stays, and the half-written ``.tmp`` is ignored by resume. A repeat within
``REPEAT_WINDOW_S`` of the first counts as the same request: launchers forward one signal to every
rank (the deepspeed launcher's SIGTERM follows the scheduler's, a terminal's Ctrl-C reaches the
launcher and the ranks alike), so a rank often receives it twice.
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: a requeue script tests `[ $? -eq 75 ]`
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REPEAT_WINDOW_S = 2.0


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; train.py exits PREEMPTED_EXIT."""


class PreemptionFlag:
    """The signal handlers of one training process and the ranks' agreement on stopping."""

    def __init__(self):
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._pid = os.getpid()
        self._previous: dict = {}
        self._group = None
        self._timer: threading.Timer | None = None

    def install(self) -> "PreemptionFlag":
        """Catch SIGNALS (from the main thread only; elsewhere Python cannot install handlers)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: its training process decides
            return
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self._first_at = signal.Signals(signum).name, now
            # From then on the next signal must act even while the main thread sits in C (a gloo
            # barrier, a torch.save) where Python handlers wait: restore the kernel's default.
            self._timer = threading.Timer(REPEAT_WINDOW_S, _default_action_in_c)
            self._timer.daemon = True
            self._timer.start()
        elif now - self._first_at >= REPEAT_WINDOW_S:  # the timer did not run yet: same outcome
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def join_group(self, world: int) -> None:
        """Collective (every rank, once): a gloo group for the flag, so NCCL runs never sync the GPU."""
        if world > 1:
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    def agreed(self, world: int) -> bool:
        """Collective at a step boundary: True on every rank when any rank was signalled."""
        return bool(self.max_over_ranks(int(self.signal_name is not None), world))

    def max_over_ranks(self, value: int, world: int) -> int:
        """Collective (after join_group): the largest ``value`` of all ranks, through the CPU group."""
        if world == 1:
            return value
        most = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self._group)
        return int(most.item())


def _default_action_in_c() -> None:
    """SIG_DFL for SIGNALS through libc (any thread may call it; Python's signal.signal is main-
    thread only). Python's own handler table is untouched: uninstall() reinstalls handlers."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    for sig in SIGNALS:
        libc.signal(int(sig), None)  # SIG_DFL is the null handler


def worker_ignores_stop_signals(_worker_id: int) -> None:
    """DataLoader worker_init_fn: schedulers and launchers signal the whole process tree, and a
    worker killed by SIGTERM (torch's worker handler re-raises it) fails the step the training
    process is finishing; the training process decides, and ends its workers itself
    (data.close_workers; a worker also exits when its parent dies)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
