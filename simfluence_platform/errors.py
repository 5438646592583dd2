"""The platform's one base class for bad input (imports nothing heavy)."""


class UserError(Exception):
    """Bad input or state the user can fix (a file, field, id or name): the command line
    reports it in one line with exit status 2, never as a traceback."""
