"""Exceptions of the core: misuse and broken invariants only.

Expected outcomes (a full queue, an unmeetable deadline, no pool for a task) are commands,
never exceptions. An exception from the core means the driver did something it must not, or
the core found its own state inconsistent; each carries an HTTP status hint for the shell.
"""


class CoreError(Exception):
    http_status = 500


class UsageError(CoreError):
    """The caller broke the core's API contract (bad value, illegal transition)."""

    http_status = 400

    def __init__(self, message: str, *, http_status: int = 400) -> None:
        super().__init__(message)
        self.http_status = http_status


class InvariantViolation(CoreError):
    """The core's own bookkeeping is inconsistent: a bug, never a client's fault."""

    http_status = 500
