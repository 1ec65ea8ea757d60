"""Stop signals: a scheduler's warning that the job will be killed becomes a clean stop.

SLURM, submitit and most schedulers send SIGUSR1, SIGUSR2 or SIGTERM some time before they kill
a job; Ctrl-C (SIGINT) is treated the same way (a second Ctrl-C stops at once). ``Preemption`` turns them into a request that the watching loop (a training step, an
evaluation budget) acts on at its next boundary: save what a rerun needs, raise ``Preempted``.
``bench.run`` then marks the run KILLED (``bench.record``) and exits 3, and the same command
resumes it. A signal that arrives while no loop watches has the effect it would have had without
us, and a handler installed before ours (submitit's requeue) is kept and called last.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading


class Preempted(RuntimeError):
    """A stop signal arrived; what the next start needs to resume is saved."""

    def __init__(self, signal_name: str, step: int | None, saved: str):
        when = "during the set-up" if step is None else f"at step {step}"
        super().__init__(
            f"preempted by {signal_name} {when}; {saved}; run the same command again to resume"
        )
        self.signal_name, self.step, self.when = signal_name, step, when


class Preemption:
    """``with Preemption() as p:`` turns SIGUSR1, SIGUSR2 and SIGTERM (what SLURM, submitit and most
    schedulers send before they kill a job) and SIGINT (Ctrl-C) into a request to stop. The handler only records the
    signal -- no I/O inside a handler; the trainer checks ``p.requested`` after each optimizer step.
    Handlers are installed only in the main thread (Python allows no other) and restored on exit.

    A handler that was installed before ours (submitit's: on its signal, SIGUSR2 by default, it
    requeues the job and exits) is kept: ``forward()`` calls it once our checkpoint is saved, so a
    job at its time limit saves first and is requeued second."""

    SIGNALS = tuple(
        getattr(signal, n)
        for n in ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")
        if hasattr(signal, n)
    )

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self.armed = 0  # how many watching loops are active
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.armed and signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without waiting for the step
        if self.armed:
            self.signum = signum  # acted on at the end of the step / budget
        else:  # no loop is watching (setup, a teacher's evaluation): what would have happened
            self._pass_on(signum, frame)

    def _pass_on(self, signum, frame) -> None:
        previous = self._previous.get(signum)
        if callable(previous):  # submitit's: requeue and exit on its signal, log SIGTERM
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default action: terminate
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    @contextlib.contextmanager
    def watching(self):
        """``with p.watching():`` around a loop that checks ``requested`` often (training, the
        evaluation budgets); outside one, a signal takes the effect it would have had without
        us, so a time-limit signal during setup still gets submitit's requeue."""
        self.armed += 1
        try:
            yield self
        finally:
            self.armed -= 1

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():  # None: installed outside Python
            signal.signal(s, signal.SIG_DFL if previous is None else previous)
        # _previous is kept: ``forward`` runs after the ``with`` block has restored the handlers.

    def check(self, step: int | None, saved: str) -> None:
        """Raise ``Preempted`` now if a stop signal has arrived (at a boundary with nothing new
        to save: before the run is opened, the start of training)."""
        if self.requested:
            raise Preempted(self.signal_name, step, saved)

    def forward(self) -> None:
        """Hand the recorded signal to the Python handler that was installed before ours, if any
        (submitit's requeue-and-exit); default actions (terminate) are not replayed."""
        previous = self._previous.get(self.signum) if self.signum is not None else None
        if callable(previous) and previous not in (signal.default_int_handler,):
            previous(self.signum, None)
