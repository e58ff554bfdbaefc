"""A command stopped by SIGTERM (``timeout``, a batch scheduler, a Kubernetes pod stop,
``ray job stop``) or Ctrl-C ends in one line that says what was stopped, what is kept
and how to resume, with exit status 143 or 130, instead of Ray's own lines.

The handler prints that line and ends the process at once (``os._exit``). Raising from
a signal handler would unwind through Ray's C++ waits, which is not safe: the exception
can surface inside Ray's Cython code as a SystemError. Ending the process is what the
driver's work survives by design: what is committed (checkpoints, complete shards) is
on storage, and Ray ends the tasks and actors a driver owns when it disconnects, so no
worker keeps holding resources (tests/test_faults.py checks the cluster's CPUs come
back). ``ray.init`` installs a handler of Ray's core worker for SIGTERM that prints
``*** SIGTERM received ... PC: @ ...`` lines, so ``pipeline.ray_setup.init_ray`` puts
ours back after it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_line: str | None = None


def install(line: str) -> None:
    """From now on SIGTERM or SIGINT print ``catkd ...: stopped by SIGNAL; <line>`` and end
    the process with 128 + the signal's number (143, 130), as a shell reports it."""
    global _line
    if threading.current_thread() is not threading.main_thread():
        return  # Python runs signal handlers in the main thread only
    _line = line
    for signum in SIGNALS:
        signal.signal(signum, _stop)


def reinstall() -> None:
    """Take the stop signals back after a library (Ray) installed its own handlers."""
    if _line is not None:
        install(_line)


def _stop(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    message = _line.replace("{signal}", name) if _line else f"stopped by {name}"
    try:
        sys.stdout.flush()
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    finally:
        os._exit(128 + signum)
