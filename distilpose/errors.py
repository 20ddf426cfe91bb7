"""The error a job reports as the user's mistake: one line on stderr, exit code 2, no traceback."""


class UserError(ValueError):
    """Something the user asked for cannot work as given; the message names it and the fix.
    A ValueError, so code that checks inputs keeps catching it as one."""
