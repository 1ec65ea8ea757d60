"""User-facing errors: one sentence naming the bad value and what is allowed."""

EXIT_USER_ERROR = 2  # bad input: fix the command or the files it names
EXIT_PREEMPTED = 3  # stopped by SIGUSR1/SIGTERM/SIGINT with a checkpoint saved: rerun to resume
EXIT_INTERRUPTED = 130  # Ctrl-C twice: stopped at once (128 + SIGINT, the shell's convention)


class UserError(Exception):
    """Bad input from the user (config value, path, checkpoint). ``bench.run`` prints the message
    alone -- no traceback -- and exits with status 2."""
