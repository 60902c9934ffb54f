"""Processes that die with their parent (Linux PR_SET_PDEATHSIG), so a server never outlives its launcher.

The chain is `make serve` -> `python -m pipeline serve` -> `bentoml serve` (the circus arbiter) ->
the BentoML worker. Circus starts each worker in a session of its own (os.setsid), so a `kill -9`
of the launcher's process group used to leave the worker serving the port ("address in use" at the
next start). Now:
- the launcher starts `bentoml serve` with `preexec_fn=parent_death_preexec(SIGTERM)`: when the
  launcher dies, however it dies, the arbiter gets SIGTERM and stops its workers in order;
- each worker asks for SIGKILL when the arbiter dies (die_with_parent at the service's import): with
  the arbiter gone there is nobody left to stop it cleanly, and the port must be freed.
Elsewhere (macOS, Windows) these are no-ops and the arbiter's own signal handling is all there is.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def _prctl_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def parent_death_preexec(sig: int = signal.SIGTERM):
    """A subprocess preexec_fn: the child gets `sig` when the process that starts it dies.

    The parent's pid is taken before the fork; if the parent died before prctl took effect the child
    has already been re-parented, so it exits at once instead of running orphaned.
    """
    parent = os.getpid()

    def preexec():
        _prctl_pdeathsig(sig)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """From inside a running process (a BentoML worker, at the service's import): get `sig` when the
    parent dies. Only a parent death after this call is covered: an arbiter killed during the
    worker's first seconds of imports leaves it to its own shutdown logic (documented in docs/serve.md).
    """
    parent = os.getppid()
    if not _prctl_pdeathsig(sig):
        return False
    if os.getppid() != parent:   # died between the two lines: we are already someone else's child
        os.kill(os.getpid(), sig)
    return True
