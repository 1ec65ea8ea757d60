"""One job per run directory at a time: an exclusive lock held for the whole job.

Two jobs with the same identity (the same command started twice, a sweep that lists a config
twice, a job resubmitted while the first still runs) would train the same run directory at once:
both write ``checkpoint.pt`` and ``state.json``, and -- when the first has not yet recorded its
MLflow run id -- log two MLflow runs for one identity, which a report would count as two seeds.
``RunLock`` takes ``fcntl.flock`` on ``<run dir>/.job.lock`` (non-blocking) before the MLflow run
is opened and keeps it until the job ends; the kernel releases it when the process dies, however
it dies, so a crash never leaves a stale lock.

The second job exits at once with one sentence naming the holder (host and pid, written into the
lock file) instead of waiting. Why not wait: a duplicate's only possible outcome is the first
job's result, and waiting would hold its allocation (a GPU node) idle for the whole training of
the other job; exiting frees it, and the same command run after the first ends prints the stored
results. The one place where waiting is the point -- several students of one sweep needing the
same teacher -- already waits on the teacher's own lock (``bench.teacher``), and takes this one
only once the teacher is free.

Known: ``flock`` is not reliable on some network filesystems (docs/FAILURES.md); there, keep
duplicates out of a sweep.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from bench.errors import UserError

LOCK = ".job.lock"


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory for this process, or raises a
    ``UserError`` naming the job that holds it. A run directory this lock had to create and that
    is still empty but for the lock when the job ends (the store could not be reached) is removed
    again, so a refused job leaves nothing behind."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK
        self.file = None
        self.created = False

    def __enter__(self) -> RunLock:
        self.created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # never truncated before the lock is ours
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(
                f"run directory {self.dir} is in use by another job ({holder}); one job per run "
                "at a time: wait for it to end, then run the same command again for its results"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self.file = f
        return self

    def __exit__(self, *exc) -> None:
        f, self.file = self.file, None
        if f is None:
            return
        try:
            f.truncate(0)
            if self.created and {p.name for p in self.dir.iterdir()} == {LOCK}:
                # Still holding the lock: nobody else can be using the folder we made.
                self.path.unlink()
                with contextlib.suppress(OSError):
                    self.dir.rmdir()
        finally:
            f.close()  # releases the lock
