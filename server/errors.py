"""Errors that the `factorkv` CLI reports as one line (`factorkv: error: ...`), no traceback."""


class CLIError(Exception):
    """A user-caused error: printed as one line, exit status ``code`` (2 = usage error)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code
