"""User-facing errors: one sentence naming the bad value and what is allowed."""


class UserError(Exception):
    """Bad input from the user (config value, path, checkpoint). ``bench.run`` prints the message
    alone -- no traceback -- and exits with status 2."""
