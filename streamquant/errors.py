"""The one exception type the CLI turns into a single error line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (paths, configs, options, corrupt files): reported as one line, never a traceback."""


class Stopped(Exception):
    """A run stopped at a safe point on request (first Ctrl-C): blocks before `done` are written, none after."""

    def __init__(self, done: int, total: int):
        super().__init__(f"stopped after {done} of {total} blocks")
        self.done, self.total = done, total
