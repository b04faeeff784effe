"""Fault injection for the crash/hang/NaN tests (a test hook, not a feature).

Unset (the normal case) it costs one dict lookup per named point. The tests set

    DIT_FAST_FAULT="ACTION:POINT:STEP[:RANK][,...]"      e.g. "kill:save.after_ema:6"

read once, at import. When the run reaches POINT at optimizer step STEP on rank RANK (any rank if
omitted), ACTION happens:

    kill   SIGKILL this process (no cleanup, no atexit: what a power cut or the OOM killer does)
    hang   sleep for an hour (a rank stuck in or before a collective)
    nan    ``poison(point, step, x)`` returns x * NaN (a rank whose loss went non-finite)
    term   send this process SIGTERM (a scheduler's preemption notice; usr1: SIGUSR1)
    fsize  limit this process's files to FSIZE_LIMIT bytes (RLIMIT_FSIZE: "File too large" from then on)

Named points (dit_fast.train): step.mid (after an optimizer step, before it is counted),
epoch.boundary (a new epoch, before its loader iterator starts), save.after_engine,
save.after_rng, save.after_ema, save.after_state, save.before_publish (files fsynced, not yet
renamed), publish.between_renames (the old step dir moved aside, the new one not yet in place),
save.before_prune; sync (a log/checkpoint sync point; use with hang); loss (use with nan).
In dit_fast.sampling: sample.batch (sample_ddp's batch STEP written, before the next round).
"""
from __future__ import annotations

import os
import signal
import time

ENV = "DIT_FAST_FAULT"
ACTIONS = ("kill", "hang", "nan", "term", "usr1", "fsize")
FSIZE_LIMIT = 200_000
_SIGNALS = {"term": signal.SIGTERM, "usr1": signal.SIGUSR1}


def _parse(spec: str | None, rank: int) -> dict[tuple[str, int], str]:
    """{(point, step): action} for this rank."""
    out: dict[tuple[str, int], str] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4) or parts[0] not in ACTIONS:
            raise ValueError(f"{ENV}={spec!r}: each item is ACTION:POINT:STEP[:RANK] with ACTION "
                             f"in {ACTIONS}")
        if len(parts) == 4 and int(parts[3]) != rank:
            continue
        out[(parts[1], int(parts[2]))] = parts[0]
    return out


_FAULTS = _parse(os.environ.get(ENV), int(os.environ.get("RANK", 0)))


def maybe_fault(point: str, step: int) -> None:
    """Kill or hang here if the test asked for it at (point, step) on this rank."""
    if not _FAULTS:
        return
    action = _FAULTS.get((point, step))
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        time.sleep(3600)
    elif action in _SIGNALS:
        os.kill(os.getpid(), _SIGNALS[action])
    elif action == "fsize":
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def poison(point: str, step: int, x):
    """x, or x * NaN if the test asked for a non-finite value at (point, step) on this rank."""
    wants_nan = bool(_FAULTS) and _FAULTS.get((point, step)) == "nan"
    return x * float("nan") if wants_nan else x
