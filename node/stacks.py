"""Every thread's stack on demand, for a process that seems stuck.

``kill -USR1 <pid>`` of ``mednode serve`` or of one of its listener processes writes the stack of
each of its threads to the process's standard error (its log): which association thread waits,
and on what — a database lock, a disk sync, the network. The dump is written by
:mod:`faulthandler` from the signal handler itself, so it comes even when every thread is blocked
or one holds the GIL. Celery's workers (``mednode worker`` and the embedded ones) already answer
SIGUSR1 the same way.
"""

from __future__ import annotations

import faulthandler
import signal
import sys


def dump_stacks_on_sigusr1() -> None:
    """Have SIGUSR1 write every thread's stack to standard error (where the signal exists)."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
