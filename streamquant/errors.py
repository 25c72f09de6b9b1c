"""The one exception type the CLI turns into a single error line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (paths, configs, options, corrupt files): reported as one line, never a traceback."""
